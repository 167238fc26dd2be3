"""Banded inference for the autoencoder (``Encoder.forward_banded``, ``Decoder.forward_banded``):
each (GroupNorm, SiLU, 3x3 conv) step runs a band of rows at a time, so that a ResNet block holds
its input and one other full-size tensor. Every step writes its band of output rows only after
it has read its band of input rows, so a step may write into its input.

The 3x3 convolutions of a band run by Winograd's F(4x4, 3x3) (``_winograd``, a checked copy of
sd-unet's) when a ``Workspace`` is given, in float32 on the CPU, where the band is large enough
(``WINOGRAD_MIN_PIXELS`` output pixels) and the convolution wide enough
(``WINOGRAD_MIN_CHANNELS`` in and out: the transforms' cost is per channel, the saving per pair
of channels; measured on a 2-core EPYC, the 128-channel convolutions of the 512x512 level were
slower than oneDNN's direct ones, the 512-channel ones faster, so those below 256 stay direct). It gives the direct
convolution's result to float32 rounding (about 1e-5 of the largest value) with 4 times fewer
multiply-adds: the decoder's convolutions are over images large next to their weights (64x64 to
512x512 pixels at 512-128 channels), where it pays in the UNet too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sd_vae import _winograd

if TYPE_CHECKING:
    from sd_vae.autoencoder import Downsample, ResnetBlock

WINOGRAD_MIN_PIXELS = 2048  # output pixels of a band (batch x rows x width), as sd-unet's
WINOGRAD_MIN_CHANNELS = 256


def layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``x`` is in: channels_last (the CPU's fast layout) or contiguous."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def conv3x3_band(band: torch.Tensor, conv: nn.Conv2d,
                 workspace: _winograd.Workspace | None) -> torch.Tensor:  # fmt: skip
    """``conv`` (3x3) over a band that carries its own row of context above and below: no
    padding of rows, one column each side. By Winograd where it applies (module docstring)."""
    n, c_in, h, w = band.shape
    if (
        workspace is not None
        and n * (h - 2) * w >= WINOGRAD_MIN_PIXELS
        and min(c_in, conv.out_channels) >= WINOGRAD_MIN_CHANNELS
        and band.device.type == "cpu"
        and band.dtype == conv.weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    ):
        return _winograd.conv3x3(band, conv.weight, conv.bias, workspace, padding=(0, 1))
    return F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))


def resnet_block(block: ResnetBlock, x: torch.Tensor, band_bytes: int,
                 workspace: _winograd.Workspace | None = None) -> torch.Tensor:  # fmt: skip
    """``block(x)``, holding ``x`` and one other full-size tensor; ``x`` is overwritten when
    the channels stay the same."""
    h = norm_silu_conv(block.norm1, block.conv1, x, band_bytes, workspace=workspace)
    if not hasattr(block, "nin_shortcut"):
        return norm_silu_conv(block.norm2, block.conv2, h, band_bytes, out=x, workspace=workspace,
                              residual=lambda r0, r1: x[:, :, r0:r1])  # fmt: skip
    # the channels change: conv2's output and the shortcut's 1x1 conv of x go into h itself
    shortcut = block.nin_shortcut
    return norm_silu_conv(block.norm2, block.conv2, h, band_bytes, out=h, workspace=workspace,
                          residual=lambda r0, r1: shortcut(x[:, :, r0:r1]))  # fmt: skip


def norm_silu_conv(
    norm: nn.GroupNorm,
    conv: nn.Conv2d,
    x: torch.Tensor,
    band_bytes: int,
    out: torch.Tensor | None = None,
    residual: Callable[[int, int], torch.Tensor] | None = None,
    workspace: _winograd.Workspace | None = None,
) -> torch.Tensor:
    """``conv(silu(norm(x))) [+ residual]`` (a 3x3 conv, padding 1), band by band, into
    ``out`` (new if not given); Winograd's convolution where ``workspace`` is given and it
    applies (``conv3x3_band``).

    ``residual(r0, r1)`` gives rows ``r0 .. r1 - 1`` of what is added. ``out`` may be ``x``
    itself: a band is written after the rows it reads are in the buffer, and the one row the
    next band needs from above is kept aside.
    """
    B, C, H, W = x.shape
    rows = max(1, band_bytes // (B * C * W * x.element_size()))
    scale, shift = group_norm_affine(norm, x, rows)
    if out is None:
        out = empty(x, conv.out_channels, H, W)
    buffer = empty(x, C, rows + 3, W)  # a band, a row of context each side, one spare
    above = buffer[:, :, -1]  # the normalised row just above the current band
    above.zero_()  # zero padding at the top edge
    for r0, r1 in bands(H, rows):
        n, below = r1 - r0, int(r1 < H)
        band = buffer[:, :, : n + 2]
        inner = band[:, :, 1 : n + 1 + below]
        torch.addcmul(shift, x[:, :, r0 : r1 + below], scale, out=inner)
        F.silu(inner, inplace=True)
        band[:, :, 0] = above
        if not below:
            band[:, :, n + 1] = 0  # zero padding at the bottom edge
        above.copy_(band[:, :, n])
        y = conv3x3_band(band, conv, workspace)
        if residual is not None:
            y += residual(r0, r1)
        out[:, :, r0:r1] = y
    return out


def downsample(down: Downsample, x: torch.Tensor, band_bytes: int) -> torch.Tensor:
    """``down(x)`` a band of output rows at a time: output row o reads rows 2o .. 2o + 2 of the
    input padded by one zero row and column at the bottom and right."""
    B, C, H, W = x.shape
    height, width = (H - 2) // 2 + 1, (W - 2) // 2 + 1
    out = empty(x, down.conv.out_channels, height, width)
    rows = max(1, band_bytes // (2 * B * C * W * x.element_size()))  # 2 input rows per output
    for o0, o1 in bands(height, rows):
        r0, r1 = 2 * o0, 2 * o1 + 1
        out[:, :, o0:o1] = down.conv(F.pad(x[:, :, r0:r1], (0, 1, 0, max(0, r1 - H))))
    return out


def group_norm_affine(
    norm: nn.GroupNorm, x: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale`` and ``shift`` of shape (B, C, 1, 1) with ``norm(x) == x * scale + shift``.

    Two passes over ``x`` in float32 at least: the group means, then the mean squared deviation
    from them, ``rows`` rows at a time (as stable as GroupNorm's own statistics, no full-size
    temporary, and several times faster than ``var_mean`` over channels_last groups).
    """
    _, C, H, W = x.shape
    G = norm.num_groups
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean = x.mean((2, 3), dtype=dtype).unflatten(1, (G, C // G)).mean(2)  # (B, G)
    centre = mean.repeat_interleave(C // G, dim=1)[..., None, None]  # (B, C, 1, 1)
    squares = sum((x[:, :, r0:r1] - centre).square_().sum((2, 3)) for r0, r1 in bands(H, rows))
    var = squares.unflatten(1, (G, C // G)).sum(2) / (H * W * (C // G))  # (B, G)
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(C // G, dim=1)  # (B, C)
    scale = rstd * norm.weight.to(dtype)
    shift = norm.bias.to(dtype) - centre[..., 0, 0] * scale
    return scale[..., None, None].to(x.dtype), shift[..., None, None].to(x.dtype)


def bands(size: int, rows: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of at most ``rows`` rows covering ``0 .. size``."""
    return [(r, min(r + rows, size)) for r in range(0, size, max(rows, 1))]


def empty(like: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """An uninitialised (batch, channels, height, width) tensor in ``like``'s dtype, device and
    layout."""
    shape = (like.shape[0], channels, height, width)
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout(like))
