"""Where a pipeline's parts run: device, precision, CPU offload and torch.compile.

:class:`Placement` is that part of ``StableDiffusion`` (its ``vae``, ``text_encoder``, ``unet``,
``device``, ``dtype`` and ``offload``).
"""

from __future__ import annotations

import contextlib

import torch

from sd_pipeline.loading import resolve_dtype
from sd_unet import compile_frozen

__all__ = ["Placement"]


class Placement:
    def _modules(self) -> list[torch.nn.Module]:
        parts = (self.vae, self.text_encoder, getattr(self, "text_encoder_2", None), self.unet)
        return [m for m in parts if m is not None]

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """With offloading, move ``module`` to the device for the duration of the block."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    def compile(self, mode: str | None = None) -> Placement:
        """Run the UNet through ``torch.compile`` from now on; returns self.

        Inductor compiles it with *freezing* (``sd_unet.compile_frozen``): the weights become
        constants of the compiled graph, so their layouts are prepared once (oneDNN's blocked
        convolution weights on the CPU) and the element-wise work around them is fused; the
        prepared weights are a second copy beside the UNet's own. The first generation pays the
        compilation (inductor caches it on disk for later runs); a new image size or batch size
        compiles again. ``mode`` is ``torch.compile``'s (e.g. ``"max-autotune"``, or
        ``"reduce-overhead"`` for CUDA graphs on a GPU). Moving or casting the pipeline (``to``)
        drops the compiled UNet: call ``compile`` again after it. Not with ``offload=True``.
        """
        if self.offload:
            raise ValueError(
                "compile() needs the UNet to stay on its device: not with offload=True"
            )
        self._compiled_unet = compile_frozen(self.unet, mode=mode)
        return self

    def to(self, device: str | torch.device | None = None, dtype=None) -> Placement:
        """Move (and cast) every part; returns self. Drops a compiled UNet (see ``compile``)."""
        self._compiled_unet = None
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        for module in self._modules():
            module.to(device="cpu" if self.offload else self.device, dtype=self.dtype)
        return self
