import pytest
import torch
import torch.nn.functional as F
from conftest import inputs, random_unet

from sd_unet import UNetConfig, winograd
from sd_unet.unet import Conv3x3


def exact(x, weight, bias):
    """The convolution in float64: the reference both float32 results are held to."""
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), weight.double(), b, padding=1)


def relative_error(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w",
    [(1, 3, 5, 8, 8), (2, 7, 4, 10, 13), (1, 16, 8, 4, 4), (1, 2, 3, 1, 1), (3, 32, 24, 17, 6)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_matches_the_exact_convolution(n, c_in, c_out, h, w, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g)
    b = torch.randn(c_out, generator=g) if bias else None
    ref = exact(x, weight, b)
    y = winograd.conv3x3(x, weight, b)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    # float32 rounding: a direct convolution is at ~2e-7 here, Winograd's transforms ~1e-6
    assert relative_error(y, ref) < 2e-5
    assert relative_error(F.conv2d(x, weight, b, padding=1), ref) < 2e-6


def test_winograd_takes_any_input_layout_and_weight_layout():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 8, 12, 24, generator=g)
    x = wide[..., ::2].contiguous()
    weight = torch.randn(6, 8, 3, 3, generator=g)
    ref = winograd.conv3x3(x, weight, None)
    last = torch.channels_last
    for xs, ws in [(x.contiguous(memory_format=last), weight),
                   (x, weight.contiguous(memory_format=last)),
                   (wide[..., ::2], weight)]:  # fmt: skip
        y = winograd.conv3x3(xs, ws, None)  # the same up to the order of float32 sums
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_the_workspace_is_reused_and_never_aliased_by_a_result(monkeypatch):
    # a few output channels and tile rows at a time: slices and blocks, uneven last ones too
    monkeypatch.setattr(winograd, "_FILTER_BYTES", 36 * 4 * 10 * 3)
    monkeypatch.setattr(winograd, "_TILE_BYTES", 36 * 4 * 10 * 4 * 2)
    g = torch.Generator().manual_seed(2)
    workspace = winograd.Workspace()
    cases = [(2, 10, 7, 9, 12), (1, 10, 7, 4, 4), (2, 5, 11, 16, 16), (1, 10, 7, 4, 4)]
    results = []
    for n, c_in, c_out, h, w in cases:
        x = torch.randn(n, c_in, h, w, generator=g)
        weight = torch.randn(c_out, c_in, 3, 3, generator=g)
        bias = torch.randn(c_out, generator=g)
        y = winograd.conv3x3(x, weight, bias, workspace)
        assert relative_error(y, exact(x, weight, bias)) < 2e-5
        results.append((y, y.clone()))
    for y, copy in results:  # later calls wrote into the workspace, not into earlier results
        assert torch.equal(y, copy)
    sizes = {name: b.numel() for name, b in workspace._buffers.items()}
    assert set(sizes) == {"pixels", "a", "b", "y", "filters"}
    assert sizes["filters"] <= 36 * 10 * 3  # one slice of output channels at a time
    assert sizes["b"] <= 36 * 10 * 4 * 2  # one block of tile rows at a time
    workspace.clear()
    assert not workspace._buffers


def _count_winograd_calls(monkeypatch):
    calls = []
    real = winograd.conv3x3

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(winograd, "conv3x3", spy)
    return calls


def test_conv3x3_uses_winograd_only_where_it_pays_and_applies(monkeypatch):
    calls = _count_winograd_calls(monkeypatch)
    conv = Conv3x3(8, 4)
    big, small = torch.randn(2, 8, 32, 32), torch.randn(1, 8, 8, 8)  # 2048 and 64 pixels
    with torch.no_grad():
        fast = conv(big)
        assert len(calls) == 1
        conv(small)
        conv.double()(big.double())
        conv.float()
    conv(big)  # autograd on: the direct convolution, for its backward pass
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(big).dtype == torch.bfloat16  # autocast's dtype, through its kernels
    assert len(calls) == 1
    with torch.no_grad():
        torch.testing.assert_close(fast, F.conv2d(big, conv.weight, conv.bias, padding=1),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    monkeypatch.setattr(Conv3x3, "winograd_min_pixels", None)
    with torch.inference_mode():
        conv(big)
    assert len(calls) == 1


def test_a_unet_through_winograd_matches_its_direct_convolutions(monkeypatch):
    unet = random_unet(UNetConfig.tiny())
    x, t, c = inputs(unet.config)
    with torch.no_grad():
        monkeypatch.setattr(Conv3x3, "winograd_min_pixels", None)
        monkeypatch.setattr(Conv3x3, "product_pixels_per_channel", None)
        direct = unet(x, t, c)
        calls = _count_winograd_calls(monkeypatch)
        monkeypatch.setattr(Conv3x3, "winograd_min_pixels", 1)
        fast = unet(x, t, c)
    n_convs = sum(isinstance(m, Conv3x3) for m in unet.modules())
    assert len(calls) == n_convs
    assert all(m.workspace is unet.workspace for m in unet.modules() if isinstance(m, Conv3x3))
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-4 * direct.abs().max().item())


@pytest.mark.parametrize("padding", [(0, 1), (1, 0), (0, 0)])
@pytest.mark.parametrize("n, c_in, c_out, h, w", [(1, 5, 6, 10, 9), (2, 8, 3, 3, 14)])
def test_winograd_with_less_padding(padding, n, c_in, c_out, h, w):
    """Rows or columns unpadded (a band of rows that carries its own context, as sd-vae's)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g)
    bias = torch.randn(c_out, generator=g)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=padding)
    y = winograd.conv3x3(x, weight, bias, winograd.Workspace(), padding=padding)
    assert y.shape == ref.shape
    assert relative_error(y, ref) < 2e-5
    with pytest.raises(ValueError, match="padding must be 0 or 1"):
        winograd.conv3x3(x, weight, bias, padding=(2, 1))


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w", [(2, 64, 24, 4, 4), (1, 40, 8, 3, 5), (1, 8, 3, 1, 1)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_the_product_matches_the_exact_convolution(n, c_in, c_out, h, w, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g)
    b = torch.randn(c_out, generator=g) if bias else None
    ref = exact(x, weight, b)
    workspace = winograd.Workspace()
    for layout in (torch.contiguous_format, torch.channels_last):
        w_ = weight.contiguous(memory_format=layout)
        for xs in (x, x.contiguous()):
            y = winograd.conv3x3_product(xs, w_, b, workspace)
            assert y.shape == ref.shape
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert relative_error(y, ref) < 2e-6  # a direct convolution's rounding


def test_conv3x3_takes_the_product_for_small_images_with_many_channels(monkeypatch):
    calls = []
    real = winograd.conv3x3_product
    monkeypatch.setattr(
        winograd, "conv3x3_product", lambda *a: calls.append(a[0].shape) or real(*a)
    )
    conv = Conv3x3(64, 16).to(memory_format=torch.channels_last)
    small = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)  # 32 pixels
    with torch.no_grad():
        fast = conv(small)
        assert len(calls) == 1
        conv(torch.randn(2, 64, 8, 8))  # 128 pixels: more than 0.5 per input channel
        assert len(calls) == 1
        torch.testing.assert_close(fast, F.conv2d(small, conv.weight, conv.bias, padding=1),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        conv.weight.data = conv.weight.data.contiguous()
        conv(small)  # a weight that is not channels_last would be copied each call: direct
        assert len(calls) == 1
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    conv(small)  # autograd: the direct convolution
    monkeypatch.setattr(Conv3x3, "product_pixels_per_channel", None)
    with torch.inference_mode():
        conv(small)
    assert len(calls) == 1
