"""A LoRA applied on the fly: the model's weights untouched, the update made at each call.

Each adapted layer takes its update one of two ways, chosen per call by the arithmetic each
costs (the same numbers to float32 rounding either way):

- beside the layer: a forward hook adds ``up(down(x))`` to the layer's output (for LoHa, LoKr,
  full and DoRA layers: ``x`` through their full-size update, computed once at ``attach``).
  For ``n`` tokens a low-rank update costs ``n * rank * (in + out)`` multiply-adds;
- folded: the layer computes with ``weight + update``, made for this call in its own memory
  (the parameter is never written): ``in * out * rank`` multiply-adds, whatever ``n``.

Folding wins wherever a call has more tokens than about ``in * out / (in + out)``: at rank 128
that is most of SD's UNet (4096 tokens per image at 512 px, where the products beside the
layers would be 9% of the step's arithmetic), while the text encoder's 77 tokens and the
cross-attention keys and values stay beside. Only layers whose forward is known to be one
plain product with their weight are folded, and only without autograd: ``nn.Linear``,
``nn.Conv2d``, and any layer with a ``forward_with(x, weight, bias)`` method (its forward with
another weight: this project's oneDNN ``Linear`` and Winograd ``Conv3x3``, so that a folded
layer keeps its fast path); everything else takes the hooks.

The folded layers get a forward of their own (an instance attribute, removed again when their
last LoRA is detached); forward hooks and pre-hooks on them still run around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd_lora import _onednn
from sd_lora.layers import Layer, matrix, memory_order, unmatrix

# What making the folded weight costs beyond its product, in multiply-adds per weight element:
# reading the weight and writing the new one (fresh memory, faulted in on its first write).
FOLD_OVERHEAD = 8


@dataclass
class _Update:
    """One LoRA's update of one layer, as the folded forward needs it (float32, the weight's
    device, ``weight`` times the file's scale applied): ``up @ down`` or a full ``delta``."""

    hook: object  # the beside-the-layer forward hook, for the calls that do not fold
    shape: tuple[int, ...]  # the weight's
    up: torch.Tensor | None = None  # (out, rank)
    down: torch.Tensor | None = None  # (rank, in [* kh * kw]), the columns in ``order``
    delta: torch.Tensor | None = None  # (out, in [* kh * kw]), the columns in ``order``; the
    # weight's dtype (the hook beside the layer computes with it too)
    bias: torch.Tensor | None = None  # a full layer's bias update
    order: tuple[int, ...] = ()  # the weight's dimensions in memory order (layers.memory_order)

    def reorder(self, order: tuple[int, ...]) -> None:
        """``down`` / ``delta`` with their columns in another order."""
        for name in ("down", "delta"):
            t = getattr(self, name)
            if t is not None:
                logical = unmatrix(t, (t.shape[0], *self.shape[1:]), self.order)
                setattr(self, name, matrix(logical, order).contiguous())
        self.order = order

    def folds(self, tokens: int) -> bool:
        if self.delta is not None:  # one addition of the weight's size against a product
            return True
        (rows, rank), cols = self.up.shape, self.down.shape[1]
        return tokens * rank * (rows + cols) > rows * cols * (rank + FOLD_OVERHEAD)


class _Folded:
    """A foldable layer's forward while LoRAs are attached to it: its weight plus the updates
    that fold at this call's size, then the others' hooks. Deep-copying the module copies this
    with it (the copy computes with the copy's weights)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.updates: dict[tuple, _Update] = {}  # by (id of the LoRA, its layer's name)

    def forward(self, x, *args, **kwargs):
        m = self.module
        plain = type(m).forward
        folded, beside = [], []
        if torch.is_grad_enabled() or args or kwargs:  # autograd: the hooks' plain products
            beside = list(self.updates.values())
        else:
            if isinstance(m, nn.Conv2d):  # output pixels
                tokens = x.numel() // max(x.shape[1], 1) // math.prod(m.stride)
            else:
                tokens = x.numel() // max(x.shape[-1], 1)
            for u in self.updates.values():
                (folded if u.folds(tokens) else beside).append(u)
        if folded:
            out = self._product(x, *_fold(m.weight, m.bias, folded))
        else:
            out = plain(m, x, *args, **kwargs)
        for u in beside:
            out = u.hook(m, (x, *args), out)
        return out

    def _product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        m = self.module
        if hasattr(type(m), "forward_with"):
            return m.forward_with(x, weight, bias)
        if isinstance(m, nn.Conv2d):
            return m._conv_forward(x, weight, bias)  # nn.Conv2d's forward with these
        return _onednn.linear(x, weight, bias)

    def remove(self, key: tuple) -> None:
        self.updates.pop(key, None)
        if not self.updates and self.module.__dict__.get("forward") == self.forward:
            del self.module.forward


class _Handle:
    """What ``attach`` keeps for one folded layer, removed like a hook's handle."""

    def __init__(self, folded: _Folded, key: tuple):
        self.folded, self.key = folded, key

    def remove(self) -> None:
        self.folded.remove(self.key)


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, updates: list[_Update]):
    """``weight + sum of updates`` (and the bias) in new memory laid out as the weight is (a
    ``channels_last`` conv weight stays one, for the layer's fast path): summed in float32 and
    rounded once to the weight's dtype (a full-size update is held in that dtype already)."""
    order = memory_order(weight)
    flat = matrix(weight, order)
    acc = None
    for u in updates:
        if u.order != order:  # the model's layout changed since attach
            u.reorder(order)
        if u.delta is not None:
            delta = u.delta.float()
            acc = flat.float() + delta if acc is None else acc.add_(delta)
        elif acc is None:
            acc = torch.addmm(flat.float(), u.up, u.down)
        else:
            acc.addmm_(u.up, u.down)
        if u.bias is not None:
            bias = u.bias if bias is None else bias.float() + u.bias.float()
    if bias is not None:
        bias = bias.to(weight.dtype)
    return unmatrix(acc.to(weight.dtype), weight.shape, order), bias


def foldable(module: nn.Module) -> bool:
    """Whether ``module``'s forward is one plain product with its weight and bias, to be made
    with a folded weight instead: ``nn.Linear``, ``nn.Conv2d`` (their forwards as torch has
    them), or a layer with ``forward_with(x, weight, bias)``. Not a layer that something else
    has given a forward of its own."""
    forward = module.__dict__.get("forward")
    if forward is not None and not isinstance(getattr(forward, "__self__", None), _Folded):
        return False
    cls = type(module)
    return (
        callable(getattr(cls, "forward_with", None))
        or cls.forward is nn.Linear.forward
        or cls.forward is nn.Conv2d.forward
    )


@torch.no_grad()  # what the hooks hold is computed once, outside any graph
def attach(layer: Layer, target: nn.Module, weight: float, key: tuple):
    """Put ``weight`` times the layer's update on ``target``: folded where it can be (a handle
    with ``remove()``), else as a forward hook. Returns (apply, for once every layer's update
    is made: a wrong shape anywhere fails before any layer is touched)."""
    w = target.weight
    order, shape = memory_order(w), tuple(w.shape)
    if layer.kind == "lora" and "dora_scale" not in layer.tensors:
        hook, update = _low_rank_hook(layer, target, weight), None
        if "lora_mid.weight" not in layer.tensors:
            update = _low_rank_update(layer, target, weight, hook, order)
    else:  # one full-size update, laid out as the weight, for the hook and the fold alike
        delta = matrix((layer.delta(w) * weight).to(w.dtype), order).contiguous()
        bias = layer.bias_delta()
        bias = None if bias is None else (bias * weight).to(w.device, w.dtype)
        hook = _full_hook(unmatrix(delta, shape, order), bias)
        update = _Update(hook, shape, delta=delta, bias=bias, order=order)
    if not foldable(target):
        return lambda: target.register_forward_hook(hook)
    if update is None:  # conv Tucker: its full update, for folding only
        delta = matrix(layer.delta(w) * weight, order).contiguous()
        update = _Update(hook, shape, delta=delta, order=order)

    def apply():
        folded = getattr(target.__dict__.get("forward"), "__self__", None)
        if folded is None:
            folded = _Folded(target)
            target.forward = folded.forward
        folded.updates[key] = update
        return _Handle(folded, key)

    return apply


def _low_rank_update(layer: Layer, target: nn.Module, weight: float, hook, order) -> _Update:
    w, t = target.weight, layer.tensors
    up = t["lora_up.weight"].to(w.device, torch.float32).flatten(1) * (layer.scale * weight)
    down = t["lora_down.weight"].to(w.device, torch.float32)
    down = down.reshape(down.shape[0], *w.shape[1:])  # a linear LoRA on a 1x1 conv too
    return _Update(hook, tuple(w.shape), up=up, down=matrix(down, order).contiguous(), order=order)


def _full_hook(delta: torch.Tensor, bias: torch.Tensor | None):
    """A forward hook adding ``x`` through a full-size update (and its bias) to the output."""

    def hook(module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            extra = F.conv2d(x, delta.to(x.dtype), bias, module.stride, module.padding,
                             module.dilation, module.groups)  # fmt: skip
        else:
            extra = F.linear(x, delta.to(x.dtype), bias)
        return _add(output, extra)

    return hook


def _add(output: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``output + extra``, in place where nothing can need ``output`` as it was: without
    autograd the module's output is a fresh tensor that only the caller will read."""
    if torch.is_grad_enabled() or output.dtype != extra.dtype:
        return output + extra.to(output.dtype)
    return output.add_(extra)


def _low_rank_hook(layer: Layer, target: nn.Module, weight: float):
    """``up(mid(down(x)))``: two (or three) thin products instead of a full-size one."""
    w = target.weight
    layer._fit(layer._lora(), w)  # a wrong shape fails here, not at the first step
    tensors = layer.tensors
    down = tensors["lora_down.weight"].to(w.device, w.dtype)
    up = (tensors["lora_up.weight"].float() * (layer.scale * weight)).to(w.device, w.dtype)
    mid = tensors.get("lora_mid.weight")
    mid = None if mid is None else mid.to(w.device, w.dtype)
    if isinstance(target, nn.Conv2d):
        if down.dim() == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        stride, padding, dilation = target.stride, target.padding, target.dilation

        def hook(module, inputs, output):
            x = inputs[0]
            if mid is None:
                h = F.conv2d(x, down.to(x.dtype), None, stride, padding, dilation)
            else:
                h = F.conv2d(F.conv2d(x, down.to(x.dtype)), mid.to(x.dtype), None, stride,
                             padding, dilation)  # fmt: skip
            return _add(output, F.conv2d(h, up.to(x.dtype)))

        return hook
    down, up_t = down.flatten(1), up.flatten(1).t().contiguous()  # (rank, in), (rank, out)

    def hook(module, inputs, output):
        x = inputs[0]
        h = _onednn.linear(x, down.to(x.dtype))  # the thin product: oneDNN's is faster here
        if torch.is_grad_enabled() or not output.is_contiguous() or output.dtype != x.dtype:
            return output + (h @ up_t.to(x.dtype)).to(output.dtype)
        flat = output.view(-1, output.shape[-1])  # out += h @ up^T, one fused multiply-add
        flat.addmm_(h.reshape(-1, h.shape[-1]), up_t.to(x.dtype))
        return output

    return hook
