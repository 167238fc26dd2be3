# Copied from sd_unet._onednn: edit the source, then copy it here (lint checks that the copies match).
"""oneDNN's float32 linear kernel for CPU inference, where this torch has one that computes
``F.linear``: on CPUs where the BLAS behind ``F.linear`` takes a slower path than oneDNN (MKL's
single-precision GEMM on AMD's), the same products run faster, equal to float32 rounding (a
different summation order). Training, autocast, other dtypes and other devices keep
``F.linear``. ``Linear`` is an ``nn.Linear`` (same parameters) that takes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cpu_float32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where CPU fast paths apply: float32 on the CPU, no autograd (the plain layers have the
    backward passes), no autocast (its dtype, its kernels), not being compiled (inductor
    prepares its own kernels)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def if_linear(op):
    """``op`` if it gives ``F.linear``'s result on a small exact product, else None: it is an
    internal operator (the one inductor's CPU fusions call), so another torch may have changed
    or removed it."""
    if op is None:
        return None
    x, w, b = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3), torch.tensor([1.0, -1.0])
    try:
        return op if torch.equal(op(x, w, b, "none", [], ""), F.linear(x, w, b)) else None
    except (RuntimeError, TypeError):  # another signature: F.linear it is
        return None


LINEAR = (
    if_linear(getattr(torch.ops.mkldnn, "_linear_pointwise", None))
    if torch.backends.mkldnn.is_available()
    else None
)  # (x, weight, bias, "none", [], "") -> F.linear(x, weight, bias), or None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, op=LINEAR):
    """``F.linear(x, weight, bias)``, through oneDNN's kernel ``op`` (None: never) where the
    fast path applies."""
    if op is not None and cpu_float32_inference(x, weight):
        return op(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """An ``nn.Linear`` through oneDNN's kernel for float32 CPU inference (``F.linear``
    everywhere else); ``Linear.onednn = None`` turns it off. ``forward_with`` is its forward
    with another weight and bias (what sd-lora folds an attached LoRA's update into)."""

    onednn = LINEAR

    def forward(self, x):
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x, weight, bias):
        return linear(x, weight, bias, self.onednn)
