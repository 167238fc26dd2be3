"""Random-weight autoencoders, and checkpoints written in the layouts real files use."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sd_vae import AutoencoderKL, AutoencoderKLConfig

# What sits beside the autoencoder in an SD 1.x single file (shapes of the real first keys).
UNRELATED = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": (320,),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (64, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    "model_ema.decay": (),
}


def random_vae(config: AutoencoderKLConfig | None = None, seed: int = 0) -> AutoencoderKL:
    """An autoencoder with random weights, GroupNorm affines included (they default to 1, 0)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(config or AutoencoderKLConfig.tiny()).eval()
        with torch.no_grad():
            for name, p in vae.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return vae


def sd_single_file(vae: AutoencoderKL, path: Path, *, wrapped: bool = True) -> Path:
    """An SD single-file checkpoint: the VAE under first_stage_model., among other weights.

    ``.safetensors`` files are flat; pickles (``.ckpt``) have the ``state_dict`` wrapper (and a
    ``global_step``) when ``wrapped``, as the original CompVis checkpoints do.
    """
    state = {"first_stage_model." + k: v.clone() for k, v in vae.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    state |= {k: torch.randn(shape, generator=g) for k, shape in UNRELATED.items()}
    return write_weights(state, path, wrapped=wrapped)


def write_weights(state: dict, path: Path, *, wrapped: bool = False) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 840000} if wrapped else state, path)
    return path


def images(batch: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth test images in [-1, 1] (a random image upsampled, so it has structure)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")


@pytest.fixture(scope="session")
def tiny_vae() -> AutoencoderKL:
    return random_vae()


def assert_same_weights(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
