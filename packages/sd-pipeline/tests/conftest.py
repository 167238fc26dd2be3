"""Tiny random-weight Stable Diffusion checkpoints in the real single-file layout, and the same
weights as diffusers components (converted with diffusers' own single-file converters)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from sd_clip import CLIPTextConfig, CLIPTextModel
from sd_unet import UNet, UNetConfig
from sd_vae import AutoencoderKL, AutoencoderKLConfig

# The machine is shared and small: one thread per test process is much faster than two
# fighting other processes for the same cores.
torch.set_num_threads(1)

PREFIXES = {
    "vae": "first_stage_model.",
    "text": "cond_stage_model.transformer.",
    "unet": "model.diffusion_model.",
}


def tiny_configs(in_channels: int = 4):
    """Each package's tiny() config, joined: the UNet's context is the text model's width, and
    its head count is SD 1.x's 8 (a single file does not record it, so loading assumes 8)."""
    text = CLIPTextConfig.tiny()
    unet = dataclasses.replace(
        UNetConfig.tiny(), context_dim=text.width, in_channels=in_channels, num_heads=8
    )
    return AutoencoderKLConfig.tiny(), text, unet


def tiny_components(in_channels: int = 4, seed: int = 0):
    """VAE, text encoder and UNet with random weights: no parameter left at zero (the UNet's
    zero-initialised output layers would make every prediction 0), and the VAE posterior's
    log-variance pinned to -30 so that sampling it equals its mean (diffusers samples it)."""
    vae_config, text_config, unet_config = tiny_configs(in_channels)
    parts = AutoencoderKL(vae_config), CLIPTextModel(text_config), UNet(unet_config)
    return randomize(parts, seed)


def randomize(parts, seed: int = 0):
    """``parts`` (VAE, text encoder, UNet) given random weights in place, as
    :func:`tiny_components` describes; returns them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in parts:
            for name, p in part.named_parameters():
                if p.ndim > 1:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
                elif name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        vae = parts[0]
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -30.0
    return parts


def checkpoint_state(in_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    vae, text, unet = tiny_components(in_channels, seed)
    state = {}
    for key, part in (("vae", vae), ("text", text), ("unet", unet)):
        state.update({PREFIXES[key] + k: v.contiguous() for k, v in part.state_dict().items()})
    return state


def write_checkpoint(path, in_channels: int = 4, seed: int = 0):
    save_file(checkpoint_state(in_channels, seed), str(path))
    return path


def write_diffusers_root(root, sample_size=4):
    """The tiny components as a diffusers model root (vae/, unet/, text_encoder/), each written
    by its own package's saver or in diffusers' key layout; returns the components."""
    import json

    from sd_unet.weights import diffusers_config, to_diffusers
    from sd_vae.weights import save_diffusers_folder

    vae, text, unet = tiny_components()
    save_diffusers_folder(vae, root / "vae")
    (root / "unet").mkdir(parents=True)
    cfg = {**diffusers_config(unet.config), "sample_size": sample_size}
    (root / "unet" / "config.json").write_text(json.dumps(cfg))
    save_file(
        to_diffusers(unet.state_dict(), unet.config),
        str(root / "unet" / "diffusion_pytorch_model.safetensors"),
    )
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps({
        "hidden_size": text.config.width, "intermediate_size": text.config.mlp_width,
        "num_hidden_layers": text.config.layers, "num_attention_heads": text.config.heads,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
    }))  # fmt: skip
    save_file(text.state_dict(), str(root / "text_encoder" / "model.safetensors"))
    return vae, text, unet


@pytest.fixture(scope="session")
def _cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _private_cache(_cache_home, monkeypatch):
    """Tests never write into the user's ~/.cache (the model-hash cache lives there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_cache_home))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_inpaint_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-inpainting.safetensors"
    return write_checkpoint(path, in_channels=9, seed=1)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint):
    from sd_pipeline import StableDiffusion

    return StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
