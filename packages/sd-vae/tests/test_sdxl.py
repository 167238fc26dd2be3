"""SDXL's autoencoder: the SD shapes with another scaling factor (which only a caller or a
diffusers config.json can give), and half precision, which it overflows."""

import copy
import dataclasses
import logging

import pytest
import torch
from conftest import images, random_vae, sd_single_file

from sd_vae import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")

SDXL_FACTOR = 0.13025  # SGM's sd_xl_base.yaml scale_factor


def tiny_sdxl() -> AutoencoderKLConfig:
    return dataclasses.replace(AutoencoderKLConfig.tiny(), scaling_factor=SDXL_FACTOR)


def test_sdxl_preset_is_the_sd_shape_with_sdxls_factor():
    with torch.device("meta"):
        sd = AutoencoderKL(AutoencoderKLConfig.sd15()).state_dict()
        xl = AutoencoderKL(AutoencoderKLConfig.sdxl()).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in xl.items()}
    assert AutoencoderKLConfig.sdxl().scaling_factor == SDXL_FACTOR
    # diffusers' config for stabilityai/stable-diffusion-xl-base-1.0's vae/ says the same
    assert diffusers.AutoencoderKL(scaling_factor=SDXL_FACTOR).config.scaling_factor == SDXL_FACTOR


def test_sdxl_single_file_takes_the_factor_from_the_caller(tmp_path):
    vae = random_vae()
    path = sd_single_file(vae, tmp_path / "sdxl.safetensors")
    assert AutoencoderKL.from_checkpoint(path).config == AutoencoderKLConfig.tiny()  # SD's
    ours = AutoencoderKL.from_checkpoint(path, scaling_factor=SDXL_FACTOR)
    assert ours.config == tiny_sdxl()
    with_config = AutoencoderKL.from_checkpoint(path, config=AutoencoderKLConfig.tiny(),
                                                scaling_factor=SDXL_FACTOR)  # fmt: skip
    assert with_config.config == tiny_sdxl()
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(),
                                                  ours.state_dict().values()))  # fmt: skip


def test_diffusers_sdxl_folder_gives_its_factor_both_ways(tmp_path):
    c = AutoencoderKLConfig.tiny()
    levels = len(c.channel_mult)
    theirs = diffusers.AutoencoderKL(
        block_out_channels=[c.base_channels * m for m in c.channel_mult],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=c.num_res_blocks,
        scaling_factor=SDXL_FACTOR,
        force_upcast=True,
    ).eval()
    theirs.save_pretrained(tmp_path / "model" / "vae")
    ours = AutoencoderKL.from_checkpoint(tmp_path / "model")
    assert ours.config == tiny_sdxl()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)
    ours.save_diffusers(tmp_path / "back")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "back")
    assert back.config.scaling_factor == SDXL_FACTOR


def test_save_keeps_the_factor(tmp_path):
    vae = random_vae(tiny_sdxl())
    vae.save(tmp_path / "vae.safetensors")
    assert AutoencoderKL.from_checkpoint(tmp_path / "vae.safetensors").config == tiny_sdxl()


@pytest.mark.parametrize("factor", [0.0, -0.13, float("nan"), float("inf")])
def test_a_factor_that_is_not_positive_is_refused(factor, tmp_path):
    with pytest.raises(ValueError, match="scaling_factor must be a positive number"):
        AutoencoderKLConfig(scaling_factor=factor)
    path = sd_single_file(random_vae(), tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="scaling_factor"):
        AutoencoderKL.from_checkpoint(path, scaling_factor=factor)


def overflowing(part: str) -> AutoencoderKL:
    """A float16 model whose encoder or decoder overflows float16 (not float32) as SDXL's does:
    the first convolution's weights scaled up (they still fit), its outputs past 65504."""
    vae = random_vae(tiny_sdxl())
    with torch.no_grad():
        if part == "decoder":
            vae.post_quant_conv.weight.mul_(100)
            vae.decoder.conv_in.weight.mul_(1000)
        else:
            vae.encoder.conv_in.weight.mul_(1e5)
    return vae.half()


@pytest.mark.parametrize("tile_size", [None, 32])
def test_float16_decode_that_overflows_falls_back_to_float32(tile_size, caplog):
    vae = overflowing("decoder")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        assert not torch.isfinite(vae._decode(z)).all()  # the overflow is real
        reference = copy.deepcopy(vae).float().decode(z.float(), tile_size=tile_size)
        with caplog.at_level(logging.WARNING, logger="sd_vae.autoencoder"):
            out = vae.decode(z, tile_size=tile_size)
    assert "retrying in float32" in caplog.text
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    # (tiles are blended in float16: a rounding step of float16 apart from float32's blend)
    tolerance = {} if tile_size is None else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out, reference.half(), **tolerance)
    assert all(p.dtype == torch.float16 for p in vae.parameters())


def test_float16_encode_that_overflows_falls_back_to_float32(caplog):
    vae = overflowing("encoder")
    x = images(size=32).half()
    with torch.no_grad():
        assert not torch.isfinite(vae._moments(x)).all()  # the overflow is real
        reference = copy.deepcopy(vae).float().encode(x.float())
        with caplog.at_level(logging.WARNING, logger="sd_vae.autoencoder"):
            posterior = vae.encode(x)
    assert "half-precision encode gave non-finite values" in caplog.text
    assert torch.isfinite(posterior.mean).all() and posterior.mean.dtype == torch.float16
    torch.testing.assert_close(posterior.mean, reference.mean.half())
    assert all(p.dtype == torch.float16 for p in vae.parameters())


def test_bfloat16_decode_that_gives_nan_falls_back_to_float32(monkeypatch):
    """bfloat16 has float32's range, so it seldom overflows; where its decode is not finite (here
    made so) it is retried in float32 all the same."""
    vae = random_vae(tiny_sdxl()).to(torch.bfloat16)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        reference = copy.deepcopy(vae).float().decode(z.float()).bfloat16()
        decode = vae._decode

        def nan_in_bfloat16(latents, banded=False):
            out = decode(latents, banded)
            return out * float("nan") if latents.dtype == torch.bfloat16 else out

        monkeypatch.setattr(vae, "_decode", nan_in_bfloat16)
        out = vae.decode(z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference)
