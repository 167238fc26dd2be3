# Copied from sd_unet.winograd: edit the source, then copy it here (lint checks that the copies match).
"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for float32 inference on a CPU
(and, for small images with many channels, as one matrix product: ``conv3x3_product``).

A 3x3 convolution computes each 4x4 tile of its output from a 6x6 tile of its input. Done
directly that is 16 x 9 = 144 multiply-adds per tile and per (input, output) channel pair.
Winograd's algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015)
moves the input tile d and the filter g into a transformed domain where the convolution is an
elementwise product of 6x6 = 36 numbers, and back:

    Y = A^T [ (G g G^T) * (B^T d B) ] A          Y: 4x4, d: 6x6, g: 3x3

Summed over input channels, the elementwise products become 36 independent matrix products
(tiles x C_in) @ (C_in x C_out), one per position of the 6x6 transformed tile: 4 times fewer
multiply-adds than the direct convolution. The transforms cost memory passes over the
activations and the weights, so it pays where the image is large next to the weights: the
UNet's two highest-resolution levels, measured (see ``Conv3x3`` in unet.py). The price is
rounding: the transforms' coefficients (up to 8 and 1/24) make float32 results differ from the
exact convolution by about 1e-5 of the largest value, where a direct convolution is at 2e-6.

The weights are transformed in each call rather than kept: a kept copy would be 4 times the
size of the convolution's own weights (36 numbers for 9). Memory: a call works through a slice
of output channels at a time (at most 64 MiB of transformed filters) and in it a block of tile
rows at a time (at most 24 MiB of transformed tiles), in buffers a ``Workspace`` keeps from one
call to the next: about 120 MB for SD 1.5 at 512 px, where one buffer per temporary, whole,
came to 280 MB, above diffusers' peak. Time for the blocks: 5% more than whole (SD 1.5's 3x3
convolutions at 64x64 and 32x32: 0.58 of the direct time in blocks, 0.55 whole).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# F(4, 3) with the interpolation points 0, 1, -1, 2, -2 and infinity.
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]  # input transform B^T (6x6)
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]  # filter transform G (6x3)
_AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]  # output transform A^T (4x6)


def _kron(m) -> torch.Tensor:
    """M (x) M in float32 (computed in float64): the 2-D transform X -> M X M^T acting on X
    flattened row-major, as one matrix, so a whole batch of tiles transforms in one product."""
    m = torch.tensor(m, dtype=torch.float64)
    return torch.kron(m, m).float()


_INPUT = _kron(_BT)  # (36, 36)
_FILTER = _kron(_G)  # (36, 9)
_OUTPUT = _kron(_AT)  # (16, 36)
_FILTER_BYTES = 64 << 20  # transformed filters at most this large at a time
_TILE_BYTES = 24 << 20  # transformed tiles (and their products) at most this large at a time


class Workspace:
    """Scratch tensors kept from one call to the next. The transforms' temporaries are tens of
    megabytes, the same sizes every step: allocated afresh, glibc maps blocks that large from
    the system and unmaps them on free, so every call would fault in and zero their pages
    again. Not for two calls at once: give each thread its own."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            self._buffers.pop(name, None)  # let the old one go before the new one is made
            buffer = self._buffers[name] = torch.empty(numel, dtype=like.dtype)
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


def scratch(workspace: Workspace | None, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=like.dtype)
    return workspace.get(name, shape, like)


def padded(x: torch.Tensor, workspace: Workspace | None, top: int, bottom: int, left: int,
           right: int) -> torch.Tensor:  # fmt: skip
    """(N, C, H, W) -> (N, top + H + bottom, left + W + right, C) with zeros around:
    ``F.pad`` of the ``channels_last`` view, into the workspace's "pixels" when given, where
    only the border is zeroed (``F.pad`` fills its whole fresh output first)."""
    n, c, h, w = x.shape
    out = scratch(workspace, "pixels", (n, top + h + bottom, left + w + right, c), x)
    out[:, :top].zero_()
    out[:, top + h :].zero_()
    out[:, top : top + h, :left].zero_()
    out[:, top : top + h, left + w :].zero_()
    out[:, top : top + h, left : left + w].copy_(x.permute(0, 2, 3, 1))
    return out


def transform_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (36, C_in, C_out): G g G^T of every filter, as 36 matrices (a
    view of a (C_out, 36, C_in) product, which the matrix products read as it lies)."""
    c_out, c_in = weight.shape[:2]
    taps = weight.permute(0, 2, 3, 1).reshape(c_out, 9, c_in)  # a view when channels_last
    return torch.matmul(_FILTER, taps, out=out).permute(1, 2, 0)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            workspace: Workspace | None = None, padding: tuple[int, int] = (1, 1),
            ) -> torch.Tensor:  # fmt: skip
    """``F.conv2d(x, weight, bias, padding=padding)`` for a (C_out, C_in, 3, 3) weight, float32
    on the CPU; ``padding`` (rows, columns), each 0 or 1 (0 for rows: a band of an image that
    carries its own row of context above and below). x: (N, C_in, H, W) in any layout; returns
    (N, C_out, H + 2 * rows - 2, W + 2 * columns - 2) in ``channels_last``.
    The temporaries come from ``workspace`` when given: "pixels" (the padded input), "a" (the
    input tiles, then the products), "b" (the transformed tiles), "y" (the transformed
    outputs) and "filters" (a slice of the transformed filters)."""
    n, c_in, h_in, w_in = x.shape
    pad_h, pad_w = padding
    if pad_h not in (0, 1) or pad_w not in (0, 1):
        raise ValueError(f"padding must be 0 or 1 per side, got {padding}")
    h, w = h_in + 2 * pad_h - 2, w_in + 2 * pad_w - 2  # the output's size
    c_out, size = weight.shape[0], x.element_size()
    tiles_h, tiles_w = -(-h // 4), -(-w // 4)
    # Zero padding: the convolution's, and up to whole 4x4 output tiles (6x6 input tiles).
    right, bottom = 4 * tiles_w + 2 - w_in - pad_w, 4 * tiles_h + 2 - h_in - pad_h
    pixels = padded(x, workspace, pad_h, bottom, pad_w, right)
    out = torch.empty((n, tiles_h, 4, tiles_w, 4, c_out), dtype=x.dtype)
    # A slice of output channels at a time, and in it a block of tile rows at a time, so that
    # the temporaries stay small (the module docstring).
    step = max(1, _FILTER_BYTES // (36 * c_in * size))
    rows = max(1, _TILE_BYTES // (36 * tiles_w * max(c_in, min(step, c_out)) * size))
    blocks = [(i, r, min(r + rows, tiles_h)) for i in range(n) for r in range(0, tiles_h, rows)]
    for start in range(0, c_out, step):
        part = slice(start, start + step)
        c_part = len(range(c_out)[part])
        filters = scratch(workspace, "filters", (c_part, 36, c_in), x)
        u = transform_weight(weight[part], out=filters)  # G g G^T: (36, C_in, C_part)
        for i, r0, r1 in blocks:
            k = (r1 - r0) * tiles_w  # tiles in the block
            # The block's overlapping 6x6 input tiles, 4 apart, as (6, 6, rows, tiles_w, C_in):
            # 36 tile positions x (k tiles x C_in).
            tiles = scratch(workspace, "a", (6, 6, r1 - r0, tiles_w, c_in), x)
            window = pixels[i, 4 * r0 : 4 * r1 + 2].unfold(0, 6, 4).unfold(1, 6, 4)
            tiles.copy_(window.permute(3, 4, 0, 1, 2))
            v = scratch(workspace, "b", (36, k * c_in), x)
            v = torch.matmul(_INPUT, tiles.view(36, -1), out=v).view(36, k, c_in)  # B^T d B
            m = scratch(workspace, "a", (36, k, c_part), x)
            torch.bmm(v, u, out=m)  # the elementwise products, summed over C_in
            y = scratch(workspace, "y", (16, k * c_part), x)
            torch.matmul(_OUTPUT, m.view(36, -1), out=y)  # A^T M A
            # (row in tile, column in tile, tile row, tile column, C) -> (H, W, C)
            y = y.view(4, 4, r1 - r0, tiles_w, c_part).permute(2, 0, 3, 1, 4)
            out[i, r0:r1, ..., part].copy_(y)
    out = out.view(n, 4 * tiles_h, 4 * tiles_w, c_out)
    if 4 * tiles_h != h or 4 * tiles_w != w:
        out = out[:, :h, :w].contiguous()
    if bias is not None:
        out.add_(bias)
    return out.permute(0, 3, 1, 2)


def fast_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 workspace: Workspace | None, winograd_min_pixels: int | None,
                 product_pixels_per_channel: float | None, linear=F.linear):  # fmt: skip
    """A padding-1 3x3 convolution (float32, CPU inference) the fast way for its size, or None
    where the direct convolution is the one to take: Winograd over at least
    ``winograd_min_pixels`` output pixels, one matrix product over at most
    ``product_pixels_per_channel`` pixels per input channel (with a ``channels_last`` weight,
    which the product reads as it lies). None turns either off."""
    n, c_in, h, w = x.shape
    pixels = n * h * w
    if winograd_min_pixels is not None and pixels >= winograd_min_pixels:
        return conv3x3(x, weight, bias, workspace)
    if (
        product_pixels_per_channel is not None
        and pixels <= product_pixels_per_channel * c_in
        and weight.is_contiguous(memory_format=torch.channels_last)
    ):
        return conv3x3_product(x, weight, bias, workspace, linear)
    return None


def conv3x3_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    workspace: Workspace | None = None, linear=F.linear) -> torch.Tensor:  # fmt: skip
    """``F.conv2d(x, weight, bias, padding=1)`` as one matrix product (im2col), the way for
    small images with many channels, where a direct convolution (blocked for large images)
    runs far below the product's rate: the image's nine shifted copies side by side, (N*H*W,
    9*C_in), times the weight read as (C_out, 9*C_in), which is how a ``channels_last`` weight
    lies in memory (no copy of it then). ``linear``: ``F.linear`` or a kernel that computes
    it. Float32 on the CPU; returns ``channels_last``. The padded image goes into the
    workspace's "pixels", the copies into its "a" (the tiles' buffer, between Winograd's
    calls): 47 MB at SD 1.5's largest use, 2560 channels at 16x16, batch 2."""
    n, c_in, h, w = x.shape
    pixels = padded(x, workspace, 1, 1, 1, 1)  # (N, H + 2, W + 2, C_in)
    shifted = [pixels[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    columns = scratch(workspace, "a", (n, h, w, 9 * c_in), x)
    torch.cat(shifted, dim=-1, out=columns)
    taps = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # (C_out, 3 * 3 * C_in)
    return linear(columns, taps, bias).permute(0, 3, 1, 2)  # (N, C_out, H, W), channels_last
