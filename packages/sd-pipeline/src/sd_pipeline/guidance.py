"""The model the sampler sees: the UNet with classifier-free guidance and inpainting inputs.

sd-samplers calls ``model(x_t, t)`` and expects one prediction per image; this module turns the
UNet, the prompts' conditioning and (for inpainting) the mask into that function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sd_pipeline.conditioning import Conditioning, guide
from sd_samplers import NoiseSchedule

__all__ = [
    "GuidedModel",
    "NonFiniteError",
    "StopSampling",
    "classifier_free_guidance",
    "rescale_guidance",
]


class NonFiniteError(RuntimeError):
    """Sampling produced NaN or infinite values (the result would be a black or noise image)."""


class StopSampling(Exception):
    """Raised by a step callback to stop sampling: the pipeline then returns what it has (each
    image's current estimate of the clean latents, decoded as usual)."""


def classifier_free_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, scale: float
) -> torch.Tensor:
    """Ho & Salimans' classifier-free guidance: move from the unconditional prediction towards
    (and past, for scale > 1) the conditional one (``conditioning.guide`` with one part)."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, eq. 15-16; diffusers' ``rescale_noise_cfg``): the guided
    prediction scaled, per image, to the standard deviation of the conditional one, then mixed
    back with the guided one by ``phi`` (0 leaves it as it is). It acts on the model's own
    parameterisation (epsilon or v), as diffusers applies it: the rescale is not linear, so
    applying it to the sampler's x_0 estimate (as AUTOMATIC1111's CFG Rescale extension does
    for k-diffusion samplers) or always in v (ComfyUI's RescaleCFG) gives other images."""
    dims = list(range(1, guided.ndim))
    ratio = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return phi * (guided * ratio) + (1 - phi) * guided


def pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad latents (replicating the edge) so that the UNet's downsamplings divide their sides:
    sizes that are multiples of 8 pixels but not of 8 * multiple work, cropped afterwards."""
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


@dataclass
class Inpainting:
    """What inpainting adds to a step. ``masked`` (the masked image's latents) is set for a
    9-channel inpainting UNet, which takes mask and masked image as extra input channels; an
    ordinary UNet instead keeps the unmasked region on the noised original's path (``init``
    noised with ``noise`` to each step's level)."""

    mask: torch.Tensor  # (B, 1, h, w) at latent resolution, 1 = repaint
    init: torch.Tensor  # the image's clean latents
    noise: torch.Tensor  # the starting noise
    masked: torch.Tensor | None = None


class GuidedModel:
    """``model(x_t, t)`` for sd-samplers: the UNet run on the latents with each image's text
    conditioning at the current step, the predictions combined by classifier-free guidance
    (and composable diffusion's weighted ``AND`` parts), then CFG rescale's ``rescale`` (phi).

    The 0-based sampling step of each call (for prompt editing) comes from the call's index and
    the sampler's shape (``calls_per_step``: 2 for second-order samplers, whose last step makes
    one; ``warmup_calls`` made in the first step), capped by the step sd-samplers' per-step
    callback has reached (``step``, which the pipeline advances), so that samplers whose calls
    per step vary never run ahead. When the
    conditioning is one context for the whole run, it is built once and the UNet gets the
    latents once with the [unconditional; conditional] context (sd-unet then runs the part the
    text cannot reach yet once per image); otherwise each call gathers the step's contexts and
    runs them in groups of equal length (AUTOMATIC1111 runs contexts of different lengths
    apart, too). Every call checks its output for NaN and infinity: on the CPU at once (the
    check is free there), on other devices in a flag kept on the device and read by
    :meth:`check_finite` after sampling, so the sampling loop never waits for the device.
    """

    def __init__(
        self,
        unet: Callable,
        conditioning: Conditioning,
        images: slice,
        *,
        scale: float,
        guided: bool,
        schedule: NoiseSchedule,
        dtype: torch.dtype,
        multiple: int,
        inpainting: Inpainting | None = None,
        calls_per_step: int = 1,
        warmup_calls: int = 0,
        rescale: float = 0.0,
        added: Callable | None = None,
    ):
        self.unet, self.conditioning, self.images = unet, conditioning, images
        self.rescale = rescale  # CFG rescale's phi (rescale_guidance); 0: off
        # SDXL: (pooled rows, which are negative) -> the UNet's added conditioning y
        self.added = added
        self.calls_per_step, self.warmup_calls = calls_per_step, warmup_calls
        self.scale, self.guided = scale, guided
        self.schedule, self.dtype, self.multiple = schedule, dtype, multiple
        self.inpainting = inpainting
        self.weights = conditioning.weights(images)
        self.step = 0
        self.calls = 0
        self._finite: torch.Tensor | None = None
        self._fixed = None
        if conditioning.simple:
            contexts, _ = conditioning.rows(0, images)
            if len({c.shape[1] for c in contexts}) == 1:
                self._fixed = torch.cat(contexts)
                self._fixed_y = self._added_rows(0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, with_uncond: bool = False):
        """The guided prediction; with ``with_uncond`` (what CFG++ samplers ask for), the pair
        (guided, unconditional) from the same UNet call."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        x_in = pad_to(self._inpainting_input(x, t).to(self.dtype), self.multiple)
        fixed = self._fixed
        if fixed is None:
            raw = self._grouped(x_in, t)
        else:
            raw = self.unet(x_in, t, fixed, **_y(self._fixed_y))
        raw = raw[..., : x.shape[-2], : x.shape[-1]].float()
        out = guide(raw, self.weights, self.scale, self.guided)
        if self.rescale and self.guided:
            out = rescale_guidance(out, self._positive(raw), self.rescale)
        self.calls += 1
        self._note_finite(out)
        if not with_uncond:
            return out
        has_uncond = self.conditioning.uncond is not None
        return out, raw[: x.shape[0]] if has_uncond else out

    def _positive(self, raw: torch.Tensor) -> torch.Tensor:
        """The prompts' own prediction, which CFG rescale matches: the conditional one (the
        weighted ``AND`` parts at guidance 1)."""
        n = len(self.weights)
        if all(w == [1.0] for w in self.weights):
            return raw[n:]
        return guide(raw, self.weights, 1.0, True)

    def current_step(self) -> int:
        """The sampling step the next call belongs to."""
        by_calls = max(0, self.calls - self.warmup_calls) // self.calls_per_step
        return min(by_calls, self.step)

    def _grouped(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The step's contexts run in groups of one length, each row with its image's latents."""
        step = self.current_step()
        contexts, owners = self.conditioning.rows(step, self.images)
        y = self._added_rows(step)
        out = x.new_empty((len(contexts), *x.shape[1:]))
        for length in sorted({c.shape[1] for c in contexts}):
            rows = [r for r, c in enumerate(contexts) if c.shape[1] == length]
            index = torch.tensor([owners[r] for r in rows], device=x.device)
            context = torch.cat([contexts[r] for r in rows])
            extra = _y(None if y is None else y[torch.tensor(rows, device=y.device)])
            out[rows] = self.unet(x[index], t[index], context, **extra).to(out.dtype)
        return out

    def _added_rows(self, step: int) -> torch.Tensor | None:
        """SDXL's added conditioning of :meth:`Conditioning.rows`' rows at ``step`` (None for a
        UNet without)."""
        if self.added is None:
            return None
        pooled, negative = self.conditioning.pooled_rows(step, self.images)
        return self.added(pooled, negative)

    def _inpainting_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = self.inpainting
        if p is None:
            return x
        if p.masked is not None:
            return torch.cat([x, p.mask, p.masked], dim=1)
        alpha_bar = self.schedule.alpha_bar(t).to(x.device).view(-1, 1, 1, 1)
        known = alpha_bar.sqrt() * p.init + (1 - alpha_bar).sqrt() * p.noise
        return p.mask * x + (1 - p.mask) * known

    def _note_finite(self, out: torch.Tensor) -> None:
        finite = torch.isfinite(out).all()
        if _read_at_once(out):
            if not finite:
                raise self._error(f"at model call {self.calls}")
            return
        self._finite = finite if self._finite is None else self._finite & finite

    def check_finite(self) -> None:
        """Raise NonFiniteError if any call so far gave a non-finite prediction."""
        if self._finite is not None and not bool(self._finite):
            raise self._error("during sampling")

    def _error(self, where: str) -> NonFiniteError:
        return NonFiniteError(
            f"the model's prediction became NaN or infinite {where}: "
            "nothing was written. Likely causes: weights with NaN/inf in them, a guidance_scale "
            "far too large, or float16 overflow (try dtype float32 or bfloat16)"
        )


def _read_at_once(t: torch.Tensor) -> bool:
    """Whether to read a prediction's finiteness at each call (the error then names the call):
    on the CPU, where reading costs nothing. On a GPU it would wait for the queued kernels at
    every step, so there it is gathered on the device and read once, after sampling."""
    return t.device.type == "cpu"


def _y(y: torch.Tensor | None) -> dict:
    """The UNet's keyword for added conditioning: only given to a UNet that takes it."""
    return {} if y is None else {"y": y}
