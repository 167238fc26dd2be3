"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3), for float32 inference on a CPU.

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
size of the convolution's own weights (36 numbers for 9); a call transforms a slice of output
channels at a time (at most 32 MiB of transformed filters).
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
_FILTER_CHUNK_BYTES = 96 << 20  # transformed filters at most this large at a time


class Workspace:
    """Scratch tensors kept from one call to the next. The transforms' temporaries are tens of
    megabytes, the same sizes every step: allocated afresh, glibc maps each from the system and
    unmaps it on free (blocks over 32 MiB), so every call would fault in and zero its pages
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


def _scratch(workspace: Workspace | None, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=like.dtype)
    return workspace.get(name, shape, like)


def transform_weight(weight: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (36, C_in, C_out): G g G^T of every filter, as 36 matrices."""
    c_out, c_in = weight.shape[:2]
    taps = _scratch(workspace, "taps", (3, 3, c_in, c_out), weight)
    taps.copy_(weight.permute(2, 3, 1, 0))  # (3x3 taps, C_in, C_out)
    out = _scratch(workspace, "filters", (36, c_in * c_out), weight)
    return torch.matmul(_FILTER, taps.view(9, -1), out=out).view(36, c_in, c_out)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            workspace: Workspace | None = None) -> torch.Tensor:  # fmt: skip
    """``F.conv2d(x, weight, bias, padding=1)`` for a (C_out, C_in, 3, 3) weight, float32 on the
    CPU. x: (N, C_in, H, W) in any layout; returns (N, C_out, H, W) in ``channels_last``.
    The temporaries come from ``workspace`` when given: "a" (the input tiles, then the
    products), "b" (the transformed tiles), "y" (the transformed outputs), and a slice of the
    filters' taps and their transforms."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    tiles_h, tiles_w = -(-h // 4), -(-w // 4)
    p = n * tiles_h * tiles_w
    # Zero padding: 1 pixel all round (the convolution's), and up to whole 4x4 output tiles.
    pixels = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tiles_w - w + 1, 1, 4 * tiles_h - h + 1))
    # The overlapping 6x6 input tiles, 4 apart: (N, tiles_h, tiles_w, C_in, 6, 6), a view,
    # copied out as (6, 6, N, tiles_h, tiles_w, C_in): (36 tile positions, P tiles x C_in).
    tiles = _scratch(workspace, "a", (6, 6, n, tiles_h, tiles_w, c_in), x)
    tiles.copy_(pixels.unfold(1, 6, 4).unfold(2, 6, 4).permute(4, 5, 0, 1, 2, 3))
    del pixels
    v = _scratch(workspace, "b", (36, p * c_in), x)
    v = torch.matmul(_INPUT, tiles.view(36, -1), out=v).view(36, p, c_in)  # B^T d B
    # A slice of output channels at a time, so that the transformed filters stay small:
    out = torch.empty((n, tiles_h, 4, tiles_w, 4, c_out), dtype=x.dtype)
    step = max(1, _FILTER_CHUNK_BYTES // (36 * c_in * x.element_size()))
    for start in range(0, c_out, step):
        part = slice(start, start + step)
        u = transform_weight(weight[part], workspace)  # G g G^T: (36, C_in, C_part)
        m = _scratch(workspace, "a", (36, p, u.shape[-1]), x)
        torch.bmm(v, u, out=m)  # the elementwise products, summed over C_in
        y = _scratch(workspace, "y", (16, m[0].numel()), x)
        y = torch.matmul(_OUTPUT, m.view(36, -1), out=y)  # A^T M A
        # (row in tile, column in tile, N, tile row, tile column, C) -> (N, H, W, C)
        y = y.view(4, 4, n, tiles_h, tiles_w, -1).permute(2, 3, 0, 4, 1, 5)
        out[..., part].copy_(y)
    out = out.view(n, 4 * tiles_h, 4 * tiles_w, c_out)
    if 4 * tiles_h != h or 4 * tiles_w != w:
        out = out[:, :h, :w].contiguous()
    if bias is not None:
        out.add_(bias)
    return out.permute(0, 3, 1, 2)
