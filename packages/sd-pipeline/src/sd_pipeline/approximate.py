"""The opt-in approximate speed-ups of the denoising UNet, as a request asks for them: token
merging (``GenerationRequest.token_merging_ratio``, sd-unet's ``tome``) and DeepCache
(``deepcache_interval``, sd-unet's ``DeepCache``). Both are off by default; both change the
image (benchmarks/approx.py measures how far, and the time saved).

They act on the eager UNet: a request for either runs without the compiled UNet of
``pipe.compile()``.
"""

from __future__ import annotations

from collections.abc import Callable

from sd_unet import DeepCache, UNet, tome

__all__ = ["ApproximateUNet", "approximate"]


class ApproximateUNet:
    """``unet(x, t, context, ...)`` through DeepCache when given, with token merging attached
    to the UNet for the length of each call only (so the module is exact between calls, and an
    interrupted generation leaves nothing patched)."""

    def __init__(self, unet: UNet, run: Callable, merging: tome.ToMe | None):
        self.unet, self.run, self.merging = unet, run, merging

    @property
    def config(self):
        return self.unet.config

    def __call__(self, *args, **kwargs):
        if self.merging is None:
            return self.run(*args, **kwargs)
        self.merging.attach(self.unet)
        try:
            return self.run(*args, **kwargs)
        finally:
            self.merging.detach(self.unet)


def approximate(unet: UNet, call: Callable, request, seed: int | None) -> Callable:
    """``call`` (the UNet, or its compiled form) with the speed-ups ``request`` asks for; itself
    when it asks for none. ``seed`` seeds token merging's random grids (one generation's)."""
    ratio, interval = request.token_merging_ratio, request.deepcache_interval
    if not ratio and interval == 1:
        return call
    run = DeepCache(unet, interval=interval) if interval > 1 else unet
    merging = tome.prepare(ratio, seed=seed) if ratio else None
    return ApproximateUNet(unet, run, merging)
