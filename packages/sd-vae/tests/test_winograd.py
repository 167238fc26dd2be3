"""The banded decoder's and encoder's 3x3 convolutions by Winograd's F(4x4, 3x3): the plain
path's numbers to float32 rounding, and only where the thresholds let it run."""

import pytest
import torch
import torch.nn.functional as F
from conftest import images, random_vae

from sd_vae import AutoencoderKLConfig, _winograd, banded
from sd_vae.autoencoder import Decoder, Encoder

WIDE = AutoencoderKLConfig(base_channels=32, channel_mult=(1, 2, 2), norm_groups=8)


@pytest.fixture
def winograd_calls(monkeypatch):
    """Thresholds low enough for tiny models; records the shape of every Winograd call."""
    monkeypatch.setattr(banded, "WINOGRAD_MIN_CHANNELS", 32)
    monkeypatch.setattr(banded, "WINOGRAD_MIN_PIXELS", 16)
    calls, real = [], _winograd.conv3x3

    def counted(x, weight, *args, **kwargs):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(_winograd, "conv3x3", counted)
    return calls


def relative_error(y, reference):
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("config", [AutoencoderKLConfig.tiny(), WIDE], ids=["tiny", "wide"])
@pytest.mark.parametrize("band_bytes", [1, 100_000, 1 << 30], ids=["row", "bands", "whole"])
def test_winograd_decode_equals_the_plain_decode(config, band_bytes, winograd_calls):
    vae = random_vae(config)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = vae.post_quant_conv(z)
        exact = vae.double().decoder(latents.double())  # float64, plain modules: the reference
        vae.float()
        direct = vae.decoder(latents)  # float32, plain modules (oneDNN's direct convolutions)
        fast = vae.decoder.forward_banded(latents, band_bytes=band_bytes)
    assert winograd_calls, "Winograd never ran"
    assert all(w[0] >= 32 and w[1] >= 32 for _, w in winograd_calls)
    assert fast.shape == direct.shape
    # float32 rounding through the whole decoder: direct 2.5e-6 of the largest value here,
    # Winograd 2.4e-6 to 6.3e-6 (its transforms' coefficients run up to 8 and 1/24)
    assert relative_error(direct, exact) < 1e-5
    assert relative_error(fast, exact) < 2e-5


def test_winograd_encode_equals_the_plain_encode(winograd_calls):
    vae = random_vae(WIDE)
    x = images(batch=1, size=32)[..., :24, :]
    with torch.no_grad():
        exact = vae.double().encoder(x.double())
        vae.float()
        fast = vae.encoder.forward_banded(x, band_bytes=50_000)
    assert winograd_calls
    assert relative_error(fast, exact) < 2e-5


def test_winograd_is_off_where_it_does_not_apply(winograd_calls, monkeypatch):
    vae = random_vae(WIDE)
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vae.decode(z, banded=True)
        assert winograd_calls
        winograd_calls.clear()
        monkeypatch.setattr(Decoder, "winograd", False)
        monkeypatch.setattr(Encoder, "winograd", False)
        vae.decode(z, banded=True)
        vae.encode(images(batch=1, size=32), banded=True)
        monkeypatch.setattr(Decoder, "winograd", True)
        vae.double().decode(z.double(), banded=True)  # float64: direct
        vae.float()
        vae.decode(z, banded=False)  # not banded: the plain modules
    assert not winograd_calls


def test_default_thresholds_keep_narrow_convolutions_direct(monkeypatch):
    """At the real thresholds: the 3-channel output and 128-channel convolutions stay direct,
    the 256- and 512-channel ones of a large band go through Winograd."""
    calls = []
    monkeypatch.setattr(_winograd, "conv3x3", lambda x, w, *a, **k: calls.append(w.shape))
    x = torch.zeros(1, 256, 10, 256)
    for c_in, c_out, winograd in [(128, 128, False), (128, 3, False), (256, 256, True),
                                  (512, 256, True)]:  # fmt: skip
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        band = x[:, :1].expand(1, c_in, 10, 256)
        with torch.no_grad():
            out = banded.conv3x3_band(band, conv, _winograd.Workspace())
        assert (calls[-1:] == [conv.weight.shape]) == winograd, (c_in, c_out)
        if not winograd:
            torch.testing.assert_close(out, F.conv2d(band, conv.weight, conv.bias, padding=(0, 1)))
