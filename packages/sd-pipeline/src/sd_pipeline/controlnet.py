"""ControlNet units in a sampling run: the control images prepared once, and at each UNet call
the summed residuals of the units active at that step, as AUTOMATIC1111's ControlNet extension
applies them (weight, guidance start/end, control mode, resize mode, several units at once).

    units = [ControlUnit(controlnet, image, weight=0.8, preprocessor="canny")]
    controls = prepare_controls(units, width, height, unet=unet)
    controlled = ControlledUNet(unet, controls, steps)   # unet(x, t, context) for GuidedModel
    sample(..., callback=controlled.callback)            # tells it each step's index

Rows: with classifier-free guidance the context holds [unconditional; conditional] rows for
latents of one row per image (sd-unet's shared latents); the residuals then have both halves,
and "ControlNet is more important" (guess mode) leaves the unconditional half without them.
SDXL: an SDXL ControlNet (``label_emb``) gets the UNet's added conditioning ``y``, row for row;
a ControlNet of the other family is refused. A refiner stage runs without the units (they were
trained on the base model's UNet; the extension hooks only the base model, too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from sd_controlnet import (
    PREPROCESSORS,
    ControlNet,
    control_mode,
    control_scales,
    hint_tensor,
    preprocess,
    resize_mode,
    uses_conditional_only,
)

__all__ = ["ControlUnit", "ControlledUNet", "PreparedControl", "control_residuals",
           "prepare_controls"]  # fmt: skip


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet and how to apply it: the extension's "ControlNet unit".

    ``start`` and ``end`` are fractions of the sampling steps (guidance start/end): the unit acts
    at step i of n while ``start <= i / n <= end``. ``mode`` and ``resize_mode`` take this
    package's short names or the extension's labels (``"My prompt is more important"``,
    ``"Crop and Resize"``). ``preprocessor`` runs on ``image`` first (``"none"``: the image is
    the control image already), with ``preprocessor_params`` by name.
    """

    model: ControlNet
    image: Image.Image | torch.Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize_mode: str = "crop_and_resize"
    preprocessor: str = "none"
    preprocessor_params: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "mode", control_mode(self.mode))
        object.__setattr__(self, "resize_mode", resize_mode(self.resize_mode))
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ValueError(f"control weight must be a finite number, got {self.weight!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"control start and end must satisfy 0 <= start <= end <= 1 (fractions of the "
                f"steps), got start={self.start}, end={self.end}"
            )
        if self.preprocessor not in PREPROCESSORS:
            preprocess(self.preprocessor, Image.new("RGB", (1, 1)))  # raises, naming the choices


@dataclass(frozen=True)
class PreparedControl:
    """A unit with its control image as the ControlNet's hint, at the generation's size."""

    model: ControlNet
    hint: torch.Tensor  # (1, 3, height, width) in [0, 1]
    weight: float
    start: float
    end: float
    mode: str

    def active(self, step: int, steps: int) -> bool:
        return self.weight != 0 and self.start <= step / max(steps, 1) <= self.end


def prepare_controls(
    units: Sequence[ControlUnit],
    width: int,
    height: int,
    *,
    unet=None,
    device=None,
    dtype=None,
) -> list[PreparedControl]:
    """Preprocess and resize each unit's image to ``width`` x ``height`` (the generated image's
    size) as its resize mode says. With ``unet``, check that each ControlNet fits it (same text
    width and skip connections), so a ControlNet for another base model fails here, clearly."""
    prepared = []
    for i, unit in enumerate(units):
        if unet is not None:
            _check_fits(unit.model, unet, i)
        param = next(unit.model.parameters())
        image = unit.image
        if not isinstance(image, torch.Tensor):
            image = preprocess(unit.preprocessor, image, **dict(unit.preprocessor_params))
        elif unit.preprocessor != "none":
            raise ValueError(f"ControlNet {i}: a preprocessor runs on a PIL image, not a tensor")
        hint = hint_tensor(image, width, height, unit.resize_mode, device=device or param.device,
                           dtype=dtype or param.dtype)  # fmt: skip
        if tuple(hint.shape[-2:]) != (height, width):
            raise ValueError(
                f"ControlNet {i}: the control image tensor is {hint.shape[-1]}x{hint.shape[-2]}; "
                f"the image to generate is {width}x{height} (give a PIL image to have it resized)"
            )
        prepared.append(PreparedControl(unit.model, hint, float(unit.weight), unit.start,
                                        unit.end, unit.mode))  # fmt: skip
    return prepared


def _check_fits(controlnet: ControlNet, unet, index: int) -> None:
    c, u = controlnet.config, unet.config
    xl, unet_xl = c.adm_in_channels is not None, bool(getattr(u, "adm_in_channels", 0))
    if xl != unet_xl:  # SDXL's label_emb needs the UNet's added conditioning y, and only it
        raise ValueError(
            f"ControlNet {index} is for {'SDXL' if xl else 'SD 1.x/2.x'}; this model is "
            f"{'SDXL' if unet_xl else 'SD 1.x/2.x'}. Use a ControlNet trained for this model"
        )
    ours = (c.context_dim, c.model_channels, tuple(c.channel_mult), c.num_res_blocks,
            c.adm_in_channels or 0)  # fmt: skip
    theirs = (u.context_dim, u.model_channels, tuple(u.channel_mult), u.num_res_blocks,
              getattr(u, "adm_in_channels", 0))  # fmt: skip
    if ours != theirs:
        raise ValueError(
            f"ControlNet {index} is for another base model: text width {c.context_dim}, "
            f"channels {c.model_channels} x {c.channel_mult}, {c.num_res_blocks} blocks per level"
            f"{f', added conditioning {ours[-1]} wide' if xl else ''}; this UNet has "
            f"{u.context_dim}, {u.model_channels} x {u.channel_mult}, {u.num_res_blocks}"
            f"{f', {theirs[-1]}' if xl else ''}. Use a ControlNet trained for this model"
        )


def control_residuals(
    controls: Sequence[PreparedControl],
    x: torch.Tensor,
    t,
    context: torch.Tensor,
    *,
    step: int,
    steps: int,
    y: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The summed, weighted residuals of the units active at ``step`` of ``steps`` for a UNet
    call ``unet(x, t, context, y=y)``; (None, None) when none is. ``context`` has the latents'
    rows (no guidance: all conditional) or twice as many, [unconditional; conditional]; SDXL's
    added conditioning ``y`` one row per context row, which an SDXL ControlNet gets as the UNet
    does (as diffusers' StableDiffusionXLControlNetPipeline and the extension give it)."""
    down_sum: list[torch.Tensor] | None = None
    mid_sum: torch.Tensor | None = None
    guided = context.shape[0] == 2 * x.shape[0]
    for control in controls:
        if not control.active(step, steps):
            continue
        down, mid = _unit_residuals(control, x, t, context, y, guided)
        if down_sum is None:
            down_sum, mid_sum = down, mid
        else:
            down_sum = [a + b for a, b in zip(down_sum, down)]  # rows: the context's, in each
            mid_sum = mid_sum + mid
    return down_sum, mid_sum


def _unit_residuals(control: PreparedControl, x, t, context, y, guided: bool):
    model = control.model
    param = next(model.parameters())
    x = x[:, : model.config.in_channels].to(param.dtype)  # inpainting UNets: the latents only
    hint = _fit_hint(control.hint, x, model.config.hint_downscale)
    conditional_only = guided and (
        uses_conditional_only(control.mode) or model.config.global_average_pooling
    )
    rows = context if not conditional_only else context[x.shape[0] :]
    if y is not None:
        y = (y if not conditional_only else y[x.shape[0] :]).to(param.dtype)
    down, mid = model(x, t, rows.to(param.dtype), hint, y=y)
    # SDXL's 10 residuals: the extension's soft weights are SD 1.x's first 10 of 13
    scales = control_scales(control.weight, control.mode, len(down) + 1)
    residuals = [r * s for r, s in zip([*down, mid], scales)]
    if model.config.global_average_pooling:
        residuals = [r.mean(dim=(2, 3), keepdim=True).expand_as(r) for r in residuals]
    if conditional_only:  # the unconditional half gets none
        residuals = [torch.cat([torch.zeros_like(r), r]) for r in residuals]
    return residuals[:-1], residuals[-1]


def _fit_hint(hint: torch.Tensor, x: torch.Tensor, factor: int) -> torch.Tensor:
    """The hint padded as the latents were (GuidedModel pads them, replicating the edge, to a
    size the UNet's downsamplings divide)."""
    pad_h = x.shape[-2] * factor - hint.shape[-2]
    pad_w = x.shape[-1] * factor - hint.shape[-1]
    if pad_h <= 0 and pad_w <= 0:
        return hint
    return F.pad(hint, (0, max(pad_w, 0), 0, max(pad_h, 0)), mode="replicate")


class ControlledUNet:
    """``unet(x, t, context)`` with the residuals of the units active at the current step, for
    GuidedModel. ``step`` starts at 0; pass ``callback`` to the sampler (it gets each finished
    step's index ``i``) or set ``step`` directly. Several model calls in one step (Heun's, DPM2's
    second evaluation) share the step, as in the extension."""

    def __init__(self, unet, controls: Sequence[PreparedControl], steps: int):
        self.unet, self.controls, self.steps = unet, list(controls), steps
        self.step = 0

    @property
    def config(self):
        return self.unet.config

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor, **kwargs) -> torch.Tensor:
        """``kwargs``: the UNet's own (SDXL's ``y``, which the ControlNets get too)."""
        down, mid = control_residuals(self.controls, x, t, context, step=self.step,
                                      steps=self.steps, y=kwargs.get("y"))  # fmt: skip
        if down is None:
            return self.unet(x, t, context, **kwargs)
        return self.unet(x, t, context, down_residuals=down, mid_residual=mid, **kwargs)

    def callback(self, info: Mapping) -> None:
        self.step = int(info["i"]) + 1
