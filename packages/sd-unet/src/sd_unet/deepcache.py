"""DeepCache (Ma, Fang & Wang 2024, "DeepCache: Accelerating Diffusion Models for Free"): an
approximate speed-up that reuses the UNet's deep features from one step to the next.

    from sd_unet import DeepCache
    cached = DeepCache(unet, interval=3, branch=1)
    eps = cached(latents, t, context)       # as unet(...): every third call the whole UNet,
                                            # between them only the shallow branch
    cached.reset()                          # before the next generation

Between adjacent denoising steps the UNet's deep features (the low-resolution levels and the
middle block) change little, while the skip connection of the first level carries the
high-frequency detail. A *full* call runs the whole UNet, and keeps the output of the output
block just above the chosen skip. The calls after it, until the next full one, run only the
shallow *branch*: input blocks ``0 .. branch`` (their skips fresh), then the output blocks from
the one that takes skip ``branch`` onwards, fed the kept deep feature where the deeper blocks'
output would come in. For SD 1.5 (12 input and 12 output blocks) ``branch=1`` runs 2 + 2 of
them at the 64x64 level.

``interval`` counts the calls made through this object with inputs of one shape (one per step
for first-order samplers with classifier-free guidance in one batch; a second-order sampler
calls twice a step), and each shape of latents and context keeps its own feature: the first
call of a shape is a full one. A full call is ``unet(...)`` itself: its result is the UNet's exactly, and
``interval=1`` is the exact UNet at every call. The images of the others move (see
benchmarks/approx.py for how far, and the speed).
"""

from __future__ import annotations

import torch

from sd_unet.unet import UNet, _grow, _plus


class DeepCache:
    """A UNet that runs whole every ``interval`` calls and its shallow ``branch`` between."""

    def __init__(self, unet: UNet, interval: int = 3, branch: int = 1):
        blocks = len(unet.input_blocks)
        if not (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1):
            raise ValueError(f"DeepCache interval must be a whole number, 1 or more, got "
                             f"{interval!r}")  # fmt: skip
        if not (isinstance(branch, int) and 0 <= branch <= blocks - 2):
            raise ValueError(f"DeepCache branch must be 0 to {blocks - 2} (the input blocks "
                             f"whose skip stays fresh), got {branch!r}")  # fmt: skip
        self.unet, self.interval, self.branch = unet, interval, branch
        self.full_calls = 0
        # per shape of (latents, context): its calls so far and its kept feature. A pipeline
        # that runs a step's rows in groups (contexts of different lengths) calls once per group
        # and step: each group keeps its own
        self._slots: dict[tuple, list] = {}

    @property
    def config(self):
        return self.unet.config

    def reset(self) -> None:
        """Forget the kept features: the next call is a full one."""
        self._slots.clear()

    def __call__(self, x, timesteps, context, y=None, *, down_residuals=None, mid_residual=None):
        slot = self._slots.setdefault((tuple(x.shape), tuple(context.shape)), [0, None])
        calls, kept = slot
        slot[0] += 1
        if calls % self.interval and kept is not None:
            return self._shallow(kept, x, timesteps, context, y, down_residuals)
        out, slot[1] = self._full(x, timesteps, context, y, down_residuals, mid_residual)
        return out

    def _full(self, x, timesteps, context, y, down_residuals, mid_residual):
        """``unet(...)``, and the output of the block above the branch's skip."""
        kept = {}
        above = self.unet.output_blocks[len(self.unet.output_blocks) - 2 - self.branch]
        hook = above.register_forward_hook(lambda module, args, out: kept.update(h=out))
        try:
            out = self.unet(x, timesteps, context, y, down_residuals=down_residuals,
                            mid_residual=mid_residual)  # fmt: skip
        finally:
            hook.remove()
        self.full_calls += 1
        return out, kept.get("h") if self.interval > 1 else None

    def _shallow(self, kept, x, timesteps, context, y, down_residuals):
        """The shallow branch on the kept deep feature."""
        unet, b = self.unet, self.branch
        x, emb = unet._embed(x, timesteps, context, y)
        skips, h = [], x
        for block in unet.input_blocks[: b + 1]:
            h = unet._run(block, h, emb, context)
            emb = _grow(emb, h.shape[0])
            skips.append(h)
        if down_residuals is not None:
            skips = [_plus(s, r, context.shape[0], f"down_residuals[{i}]")
                     for i, (s, r) in enumerate(zip(skips, down_residuals))]  # fmt: skip
        h = kept
        emb = _grow(emb, h.shape[0])
        for block in unet.output_blocks[len(unet.output_blocks) - 1 - b :]:
            h = torch.cat([h, _grow(skips.pop(), h.shape[0])], dim=1)
            h = unet._run(block, h, emb, context)
        return _grow(unet.out(h), context.shape[0])
