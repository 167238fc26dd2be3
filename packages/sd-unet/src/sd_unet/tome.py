"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion"; the ``tomesd`` package): an approximate speed-up, off unless applied.

    from sd_unet import tome
    tome.apply(unet, ratio=0.5, seed=1)   # merge half the tokens before each self-attention
    eps = unet(latents, t, context)
    tome.remove(unet)                     # the exact UNet again

In the transformer blocks of the highest-resolution levels (``max_downsample``: 1 is the first
level only, where self-attention over 4096 tokens at 512 px is the most expensive op), before
self-attention the block's tokens are split in two sets: one *destination* token per 2x2 cell
of the token grid (a random one of the four, drawn anew for each block call), the rest
*sources*. Each source is matched to its most similar destination (cosine similarity of the
block's input), and the ``ratio`` x N sources with the best matches are averaged into their
destinations (bipartite soft matching). Self-attention runs over the N - r tokens left; after
it each merged source takes its destination's output again ("unmerge"), so the block's output
has every token. Cross-attention and the feed-forward see all tokens (tomesd's defaults).

The result moves: the image is not the exact one (benchmarks/approx.py measures how far, and
the speed). ``ratio=0`` leaves the UNet exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sd_unet.unet import Downsample, SpatialTransformer, UNet, Upsample

MAX_RATIO = 0.75  # with one destination per 2x2 cell, at most 3 of 4 tokens can merge


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def destinations(h: int, w: int, stride=(2, 2), generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:  # fmt: skip
    """A boolean (h * w,) mask of the destination tokens of an h x w grid (row-major): one per
    whole ``stride`` cell, at a random place in it when ``generator`` is given, else at its top
    left. Tokens of a partial cell at the bottom or right edge are all sources.

    The draw is ``torch.randint(sy * sx, (h // sy, w // sx, 1), generator=generator)``, the
    place in the cell read row-major, so a generator in the same state gives tomesd's grid."""
    sy, sx = stride
    cells_h, cells_w = h // sy, w // sx
    if generator is None:
        place = torch.zeros(cells_h, cells_w, dtype=torch.long)
    else:
        place = torch.randint(sy * sx, (cells_h, cells_w, 1), generator=generator,
                              device=generator.device)[..., 0].cpu()  # fmt: skip
    rows = torch.arange(cells_h)[:, None] * sy + place // sx
    cols = torch.arange(cells_w)[None, :] * sx + place % sx
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.flatten().to(device)


def bipartite_merge(metric: torch.Tensor, dst_mask: torch.Tensor, r: int):
    """(merge, unmerge) for tokens (B, N, C): ``merge`` averages the ``r`` sources most similar
    to a destination into it, (B, N, C') -> (B, N - r, C'); ``unmerge`` gives each token its
    output back, (B, N - r, C') -> (B, N, C'). ``metric`` (B, N, C) decides who merges."""
    B, N, _ = metric.shape
    dst = dst_mask.nonzero()[:, 0]  # token positions, row-major
    src = (~dst_mask).nonzero()[:, 0]
    r = min(r, len(src))
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, sources, destinations)
        best, target = similarity.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)  # sources, best matched first
        merged, kept = ranked[:, :r], ranked[:, r:]  # (B, r), (B, sources - r): into src
        into = target.gather(1, merged)  # the destination of each merged source: (B, r)
        counts = torch.ones(B, len(dst), device=metric.device, dtype=metric.dtype)
        counts.scatter_add_(1, into, torch.ones_like(into, dtype=metric.dtype))
        kept_at, merged_at = src[kept], src[merged]  # token positions: (B, ...)

    def rows(x, index):  # x[b, index[b]] for each b: (B, k, C)
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def merge(x: torch.Tensor) -> torch.Tensor:
        sums = x[:, dst].scatter_add(1, into[..., None].expand(-1, -1, x.shape[-1]),
                                     rows(x, merged_at))  # fmt: skip
        means = sums / counts[..., None].to(x.dtype)
        return torch.cat([rows(x, kept_at), means], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        n_kept = kept_at.shape[1]
        out = y.new_empty(B, N, y.shape[-1])
        at_dst = y[:, n_kept:]
        out[:, dst] = at_dst
        out.scatter_(1, kept_at[..., None].expand(-1, -1, y.shape[-1]), y[:, :n_kept])
        out.scatter_(1, merged_at[..., None].expand(-1, -1, y.shape[-1]), rows(at_dst, into))
        return out

    return merge, unmerge


@dataclass
class ToMe:
    """Token merging's settings and generator, and what a patched UNet's blocks share while it
    runs: the token grid and batch of the transformer running now (set by a hook on each
    patched SpatialTransformer). ``prepare`` makes one, ``attach``/``detach`` patch a UNet."""

    ratio: float
    max_downsample: int = 1
    stride: tuple[int, int] = (2, 2)
    random: bool = True
    generator: torch.Generator | None = None
    grid: tuple[int, int] = (0, 0)
    rows: int = 0  # the context's rows: the batch the UNet produces
    hooks: list = field(default_factory=list)

    def merging(self, x: torch.Tensor) -> tuple[Callable, Callable]:
        """(merge, unmerge) for a block's input x (B, H * W, C)."""
        h, w = self.grid
        r = int(x.shape[1] * self.ratio)
        if r <= 0 or h * w != x.shape[1]:
            return _identity, _identity
        # tomesd draws no random grid for an odd batch (its rows cannot be the pairs of prompt
        # and negative prompt of one image, which must share one grid); the batch it sees is
        # the UNet's, the context's rows (here the latents may be shared by those pairs)
        generator = self.generator if self.random and self.rows % 2 == 0 else None
        mask = destinations(h, w, self.stride, generator, x.device)
        return bipartite_merge(x, mask, r)

    def attach(self, unet: UNet) -> None:
        """Patch the transformer blocks of the levels downsampled at most ``max_downsample``
        times (``remove`` or ``detach`` undoes it)."""
        remove(unet)

        def record(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            context = args[1] if len(args) > 1 else kwargs["context"]
            self.grid, self.rows = tuple(x.shape[-2:]), context.shape[0]

        for transformer, ds in transformer_levels(unet).items():
            if ds <= self.max_downsample:
                self.hooks.append(transformer.register_forward_pre_hook(record, with_kwargs=True))
                for block in transformer.transformer_blocks:
                    block.tome = self
        unet.tome = self

    def detach(self, unet: UNet) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for module in unet.modules():
            if getattr(module, "tome", None) is self:
                module.tome = None


def block_forward(block: nn.Module, state: ToMe, x: torch.Tensor, context: torch.Tensor):
    """``BasicTransformerBlock.forward`` with the self-attention over merged tokens."""
    from sd_unet.unet import _grow

    merge, unmerge = state.merging(x)
    x = unmerge(block.attn1(merge(block.norm1(x)))).add_(x)
    h = block.attn2(block.norm2(x), context)
    x = h.add_(_grow(x, h.shape[0]))
    return block.ff(block.norm3(x)).add_(x)


def transformer_levels(unet: UNet) -> dict[SpatialTransformer, int]:
    """Each SpatialTransformer of the UNet with its downsampling factor (1, 2, 4, ...)."""
    levels, ds = {}, 1
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                levels[layer] = ds
            elif isinstance(layer, Downsample):
                ds *= 2
            elif isinstance(layer, Upsample):
                ds //= 2
    return levels


def prepare(ratio: float = 0.5, *, max_downsample: int = 1, stride=(2, 2), random: bool = True,
            seed: int | None = None) -> ToMe:  # fmt: skip
    """Token merging's state, checked, not yet attached (``ToMe.attach``): ``apply``'s
    arguments."""
    if not (isinstance(ratio, int | float) and math.isfinite(ratio) and 0 <= ratio <= MAX_RATIO):
        raise ValueError(f"ToMe ratio must be a number from 0 to {MAX_RATIO}, got {ratio!r}")
    if not (isinstance(max_downsample, int) and max_downsample >= 1):
        raise ValueError(f"max_downsample must be 1, 2, 4 or 8, got {max_downsample!r}")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    else:
        generator = torch.Generator().set_state(torch.get_rng_state())
    return ToMe(float(ratio), max_downsample, tuple(stride), random, generator)


def apply(unet: UNet, ratio: float = 0.5, *, max_downsample: int = 1, stride=(2, 2),
          random: bool = True, seed: int | None = None) -> ToMe:  # fmt: skip
    """Merge ``ratio`` of the tokens before self-attention in the transformer blocks of the
    levels downsampled at most ``max_downsample`` times (1: the first level). ``random``: a
    random destination per 2x2 cell, drawn from a generator seeded with ``seed`` (None: forked
    from torch's global generator, as tomesd does). Replaces an earlier ``apply``; returns the
    shared state. ``remove`` undoes it."""
    state = prepare(ratio, max_downsample=max_downsample, stride=stride, random=random,
                    seed=seed)  # fmt: skip
    state.attach(unet)
    return state


def remove(unet: UNet) -> None:
    """Undo ``apply``: the exact UNet again (a no-op on a UNet without ToMe)."""
    state = getattr(unet, "tome", None)
    if state is not None:
        state.detach(unet)
