"""The model on its own: shapes, the posterior, input checks, tiling, half precision."""

import copy
import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import images, random_vae

from sd_vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from sd_vae.autoencoder import tiled_apply


def test_shapes(tiny_vae):
    x = images(batch=2, size=64)
    with torch.no_grad():
        posterior = tiny_vae.encode(x)
        assert isinstance(posterior, DiagonalGaussianDistribution)
        assert posterior.mean.shape == posterior.std.shape == (2, 4, 8, 8)
        assert tiny_vae.decode(posterior.mean).shape == (2, 3, 64, 64)
        assert tiny_vae.decode(torch.randn(1, 4, 5, 7)).shape == (1, 3, 40, 56)


def test_sd15_matches_diffusers_parameter_count():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    with torch.device("meta"):
        ours = AutoencoderKL(AutoencoderKLConfig.sd15())
        theirs = DiffusersAutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 83_653_863
    assert ours.config.scaling_factor == 0.18215
    assert ours.config.downscale == 8


def test_config_is_frozen_and_checked():
    config = AutoencoderKLConfig.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.base_channels = 64
    with pytest.raises(ValueError, match="multiple of norm_groups=32"):
        AutoencoderKLConfig(base_channels=48)


def test_posterior_moments_and_clamp():
    moments = torch.cat([torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), -100.0)], 1)
    moments[:, 4:, 0, 0] = 2.0
    p = DiagonalGaussianDistribution(moments)
    assert torch.equal(p.mode(), p.mean) and torch.all(p.mean == 0.5)
    assert p.logvar.min() == -30.0  # clamped as the original
    assert torch.allclose(p.std[:, :, 0, 0], torch.exp(torch.tensor(1.0)))
    assert torch.allclose(p.var[:, :, 0, 0], torch.exp(torch.tensor(2.0)))


def test_sample_is_deterministic_under_a_generator(tiny_vae):
    with torch.no_grad():
        posterior = tiny_vae.encode(images())
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, posterior.mean + posterior.std * noise)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 60, 64), "multiples of 8; got 60x64 .*56x64 or 64x64"),
        ((1, 4, 64, 64), r"\(batch, 3, height, width\); got shape \(1, 4, 64, 64\)"),
        ((3, 64, 64), r"\(batch, 3, height, width\)"),
    ],
)
def test_bad_image_shapes(tiny_vae, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_vae.encode(torch.zeros(shape))


def test_images_far_outside_the_range(tiny_vae):
    with pytest.raises(ValueError, match=r"in \[-1, 1\]; found values in \[0, 255\]"):
        tiny_vae.encode(torch.linspace(0, 255, 3 * 64 * 64).reshape(1, 3, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        tiny_vae.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with torch.no_grad():
        tiny_vae.encode(images() * 1.05)  # a little overshoot (resampling) is fine


def test_bad_latents(tiny_vae):
    with pytest.raises(ValueError, match=r"latents must be \(batch, 4, height, width\)"):
        tiny_vae.decode(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------- tiling


@pytest.mark.parametrize(
    ("fn", "shape", "tile", "overlap", "scale"),
    [
        (lambda t: 2 * F.interpolate(t, scale_factor=8) + 1, (1, 4, 40, 72), 16, 4, 8),
        (lambda t: F.avg_pool2d(t, 8), (2, 3, 320, 584), 128, 32, 1 / 8),
    ],
)
def test_tile_blending_is_seamless_for_local_functions(fn, shape, tile, overlap, scale):
    """A function that does not look beyond a pixel's neighbourhood tiles exactly: the blend
    weights sum to one everywhere, including the last (shifted) row and column of tiles."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiled_apply(fn, x, tile, overlap, scale), fn(x))


def test_tiles_as_large_as_the_image_change_nothing(tiny_vae):
    x = images(size=64)
    with torch.no_grad():
        z = tiny_vae.encode(x).mean
        assert torch.equal(tiny_vae.encode(x, tile_size=64).mean, z)
        assert torch.equal(tiny_vae.decode(z, tile_size=64), tiny_vae.decode(z))


def test_tiled_vs_untiled_on_random_weights(tiny_vae):
    """Measured at 128x128 with 64-pixel tiles (16-pixel overlap) on the random tiny model:
    decode differs from untiled by 0.25 mean abs (output std 0.35), encode by 0.095 (latent std
    0.28). GroupNorm statistics and the mid attention see one tile only, and this random
    model has one channel per group at full resolution, so it is far more tile-sensitive than a
    trained one. diffusers' tiling of the same weights, same tile size, is farther off (0.30
    and 0.12), which this test checks."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from sd_vae.weights import diffusers_config, to_diffusers

    config = diffusers_config(tiny_vae.config) | {"sample_size": 64}
    config.pop("_class_name")
    reference = DiffusersAutoencoderKL(**config).eval()
    reference.load_state_dict(to_diffusers(tiny_vae.state_dict(), 4))
    reference.enable_tiling()
    x = images(size=128)
    with torch.no_grad():
        z = tiny_vae.encode(x).mean
        untiled = tiny_vae.decode(z)
        decode_error = (tiny_vae.decode(z, tile_size=64) - untiled).abs().mean()
        encode_error = (tiny_vae.encode(x, tile_size=64).mean - z).abs().mean()
        reference_decode_error = (reference.decode(z).sample - untiled).abs().mean()
        reference_encode_error = (reference.encode(x).latent_dist.mean - z).abs().mean()
    assert decode_error < 0.27 and encode_error < 0.1
    assert decode_error < reference_decode_error and encode_error < reference_encode_error


# ---------------------------------------------------------------------------- banded decode

GROUPED = AutoencoderKLConfig(base_channels=32, channel_mult=(1, 2, 2), norm_groups=8)


@pytest.mark.parametrize("config", [AutoencoderKLConfig.tiny(), GROUPED], ids=["tiny", "grouped"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_banded_decode_is_the_plain_decode(config, channels_last):
    """In float64 the banded decoder computes the plain one's numbers (to rounding), whatever
    the band: one row, a few rows with a short last band, or the whole image; batch of 2, odd
    sides, 1 and 4 channels per GroupNorm group."""
    vae = random_vae(config).double()
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        latents = vae.post_quant_conv(z.contiguous(memory_format=layout))
        plain = vae.decoder(latents)
        f = config.downscale
        assert plain.shape == (2, 3, 5 * f, 7 * f)
        for band_bytes in (1, 100_000, 1 << 30):  # 1 row; 3 rows at full size (and a short last)
            banded = vae.decoder.forward_banded(latents, band_bytes=band_bytes)
            torch.testing.assert_close(banded, plain, rtol=0, atol=1e-11)


@pytest.mark.parametrize("config", [AutoencoderKLConfig.tiny(), GROUPED], ids=["tiny", "grouped"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_banded_encode_is_the_plain_encode(config, channels_last):
    """The encoder's banded path (ResNet blocks and the asymmetric-padding downsampling) in
    float64, against the plain one: one row, a few rows, the whole image; odd sizes."""
    vae = random_vae(config).double()
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    f = config.downscale
    x = images(batch=2, size=8 * f).double()[..., : 5 * f, : 7 * f].contiguous(memory_format=layout)
    with torch.no_grad():
        plain = vae.encoder(x)
        assert plain.shape == (2, 8, 5, 7)
        for band_bytes in (1, 100_000, 1 << 30):
            banded = vae.encoder.forward_banded(x, band_bytes=band_bytes)
            torch.testing.assert_close(banded, plain, rtol=0, atol=1e-11)


def test_banded_decode_in_float32_and_bfloat16():
    vae = random_vae(GROUPED)
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = vae.double().decode(z.double(), banded=False)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
            vae = vae.to(dtype)
            banded = vae.decode(z.to(dtype), banded=True)
            assert banded.dtype == dtype
            error = (banded.double() - reference).abs().max() / reference.abs().max()
            assert error < tolerance, (dtype, error.item())


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_banded_without_autograd_on_the_cpu(tiny_vae, monkeypatch, part):
    calls = []
    forward_banded = getattr(tiny_vae, part).forward_banded
    monkeypatch.setattr(getattr(tiny_vae, part), "forward_banded",
                        lambda t: calls.append(t.shape) or forward_banded(t))  # fmt: skip
    x = torch.randn(1, 4, 4, 4) if part == "decoder" else images(size=32)
    run = tiny_vae.decode if part == "decoder" else lambda x, **kw: tiny_vae.encode(x, **kw).mean
    with torch.no_grad():
        banded = run(x)
        assert len(calls) == 1
        assert run(x, banded=False).shape == banded.shape and len(calls) == 1
    with torch.inference_mode():
        run(x)
        assert len(calls) == 2
    out = run(x)  # autograd on: the plain path, which gradients flow through
    assert len(calls) == 2 and out.requires_grad
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        run(x).sum().backward()


def test_upsample_is_nearest_then_conv():
    """Upsample runs as one transposed convolution; it is nearest 2x, then the 3x3 conv."""
    from sd_vae.autoencoder import Upsample

    upsample = Upsample(8).double()
    x = torch.randn(2, 8, 7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        expected = upsample.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        torch.testing.assert_close(upsample(x), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- half precision


def overflowing_half_vae() -> AutoencoderKL:
    """A half-precision model whose decoder overflows float16 (not float32): post_quant_conv
    and decoder.conv_in scaled up (their weights still fit in float16), so that conv_in's
    outputs pass 65504 before the first GroupNorm brings them back."""
    vae = random_vae()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(100)
        vae.decoder.conv_in.weight.mul_(1000)
    return vae.half()


def test_half_precision_overflow_is_retried_in_float32(caplog):
    vae = overflowing_half_vae()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        assert not torch.isfinite(vae._decode(z)).all()  # the overflow is real
        reference = copy.deepcopy(vae).float().decode(z.float())
        with caplog.at_level(logging.WARNING, logger="sd_vae.autoencoder"):
            out = vae.decode(z)
    assert "retrying in float32" in caplog.text
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.half())
    assert all(p.dtype == torch.float16 for p in vae.parameters())  # put back afterwards


def test_force_float32_decodes_in_float32():
    vae = random_vae().half()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    with torch.no_grad():
        reference = copy.deepcopy(vae).float().decode(z.float()).half()
        assert not torch.equal(vae.decode(z), reference)  # float16 arithmetic differs...
        vae.force_float32 = True
        assert torch.equal(vae.decode(z), reference)  # ...and is not used when forced
    assert vae.dtype == torch.float16
