"""Parity with diffusers' AutoencoderKL: the same random weights, moved between the two
implementations through the real file layouts, in both directions."""

import pytest
import torch
from conftest import images, random_vae, sd_single_file
from safetensors.torch import load_file

from sd_vae import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402


def diffusers_vae(config: AutoencoderKLConfig, seed: int = 0):
    """diffusers' model with random weights, GroupNorm affines included."""
    levels = len(config.channel_mult)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = diffusers.AutoencoderKL(
            block_out_channels=[config.base_channels * m for m in config.channel_mult],
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=config.num_res_blocks,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_groups,
        ).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Max abs difference over the reference's largest magnitude."""
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_same_outputs(ours: AutoencoderKL, theirs, size: int) -> None:
    x = images(size=size)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
        decoded, reference_decoded = ours.decode(z), theirs.decode(z).sample
    assert relative_error(posterior.mean, reference.mean) < 1e-5
    assert relative_error(posterior.logvar, reference.logvar) < 1e-5
    assert relative_error(decoded, reference_decoded) < 1e-5


def test_diffusers_model_root_to_ours(tmp_path):
    theirs = diffusers_vae(AutoencoderKLConfig.tiny())
    theirs.save_pretrained(tmp_path / "model" / "vae")  # diffusers' own writer
    ours = AutoencoderKL.from_checkpoint(tmp_path / "model")
    assert ours.config == AutoencoderKLConfig.tiny()
    assert_same_outputs(ours, theirs, size=64)


def test_ours_through_an_sd_single_file_to_diffusers(tmp_path):
    """Our state_dict, as first_stage_model.* in an SD file, read by diffusers' own converter."""
    ours = random_vae()
    path = sd_single_file(ours, tmp_path / "sd.safetensors")
    theirs = diffusers_vae(ours.config, seed=1)
    converted = convert_ldm_vae_checkpoint(load_file(path), dict(theirs.config))
    theirs.load_state_dict(converted, strict=True)
    assert_same_outputs(ours, theirs, size=64)


def test_ours_through_save_diffusers_to_diffusers(tmp_path):
    ours = random_vae()
    ours.save_diffusers(tmp_path / "vae")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert theirs.config.scaling_factor == ours.config.scaling_factor
    assert_same_outputs(ours, theirs, size=64)


@pytest.mark.slow
def test_full_size_parity(tmp_path):
    """SD 1.5 size, both directions, on 256x256 images (the model is full size; smaller images
    keep the CPU time reasonable)."""
    theirs = diffusers_vae(AutoencoderKLConfig.sd15())
    theirs.save_pretrained(tmp_path / "vae")
    ours = AutoencoderKL.from_checkpoint(tmp_path / "vae")
    assert ours.config == AutoencoderKLConfig.sd15()
    assert_same_outputs(ours, theirs, size=256)

    path = tmp_path / "sd.safetensors"
    sd_single_file(ours, path)
    converted = convert_ldm_vae_checkpoint(load_file(path), dict(theirs.config))
    state = theirs.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
