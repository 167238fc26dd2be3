"""Which Stable Diffusion a checkpoint holds: SD 1.x or 2.x, txt2img or inpainting, epsilon or
v prediction, and the native size that follows.

The family comes from the UNet the weights built: SD 2.x's has 64-wide heads (sd-unet infers
them from its linear transformer projections or its 1024-wide OpenCLIP context), SD 1.x's a
fixed 8 heads; 9 input channels are an inpainting model. What the weights cannot show is the
parameterisation, so the prediction is decided by the first rule that applies:

1. ``prediction=`` given to ``StableDiffusion.from_checkpoint`` (``--prediction`` on the CLI);
2. what the model's files record: a diffusers root's ``scheduler_config.json``
   (``prediction_type``), the ``sd_pipeline.config`` metadata sd-pipeline writes, or a
   ``v_pred`` marker tensor (as ComfyUI and kohya's scripts save v-prediction models);
3. SD 1.x and SD 2.x inpainting: epsilon (all were trained so; diffusers and AUTOMATIC1111 say
   the same);
4. an SD 2.x txt2img UNet: AUTOMATIC1111's test (``is_using_v_parameterization_for_sd2``): run
   the UNet once at t = 999 on a constant input x = 0.5 with a constant context; an epsilon
   model predicts about the input itself there (at t = 999 x_t is nearly all noise), a v model
   about -x_0, so ``mean(out - x) < -1`` means v. diffusers' single-file loader instead takes
   every SD 2.x file for 768-v unless its pickle's ``global_step`` is 875000 (SD 2.0 base),
   which calls every fine-tune of SD 2.x-base wrong; the test reads what the weights do.

The native size is 768 for SD 2.x v-prediction models (SD 2.x-768-v), 512 for every other
(SD 1.x, SD 2.x base, SD 2.x inpainting), unless the files record one. SD 2.x depth-to-image
(5 input channels and a MiDaS model) and unCLIP (an image embedder and ``label_emb``) need
inputs this pipeline does not make: they are refused by name. Tensor names are read from a
``.safetensors`` header; for a pickle (``.ckpt``) only the UNet's config speaks, so its
``v_pred`` marker goes unseen and an unCLIP model is known by its ``label_emb`` beside the
1024-wide context.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sd_pipeline.loading import CheckpointError
from sd_unet import UNet

__all__ = [
    "ModelKind",
    "UnsupportedModelError",
    "infer_model_kind",
    "kind_options",
    "probe_v_prediction",
    "v_prediction_score",
]

logger = logging.getLogger(__name__)

PREDICTIONS = ("epsilon", "v")
V_PREDICTION_MARKER = "v_pred"  # an empty tensor ComfyUI and kohya's scripts save in v models
# Keys only SD 2.x unCLIP (image embedder, noise augmentation) and depth (MiDaS) files have.
UNCLIP_PREFIXES = ("embedder.", "noise_augmentor.")
DEPTH_PREFIX = "depth_model."
# A1111's test: its input, timestep and threshold (is_using_v_parameterization_for_sd2).
PROBE_VALUE, PROBE_TIMESTEP, PROBE_THRESHOLD = 0.5, 999.0, -1.0
PROBE_LATENT_SIDE, PROBE_TOKENS = 8, 2


class UnsupportedModelError(CheckpointError):
    """A Stable Diffusion variant that this pipeline cannot run."""


@dataclass(frozen=True)
class ModelKind:
    """What a checkpoint is: ``family`` ``"sd1"`` or ``"sd2"``, an inpainting model or not, and
    its prediction (``None`` until decided)."""

    family: str
    inpainting: bool = False
    prediction: str | None = None

    @property
    def native_size(self) -> int:
        """768 for SD 2.x-v (trained at 768x768), else 512."""
        return 768 if self.family == "sd2" and self.prediction == "v" else 512

    @property
    def label(self) -> str:
        family = {"sd1": "SD 1.x", "sd2": "SD 2.x"}[self.family]
        variant = " inpainting" if self.inpainting else ""
        return f"{family}{variant} ({self.prediction or 'prediction undecided'})"


def infer_model_kind(unet: UNet, keys: Iterable[str] = ()) -> ModelKind | None:
    """The kind the UNet's config (and the file's tensor names, where known) show, its
    prediction where the rules of this module's steps 2 and 3 decide it; None for a model that
    is neither SD 1.x nor SD 2.x (SDXL). Raises UnsupportedModelError for SD 2.x depth and
    unCLIP models."""
    config = unet.config
    keys = set(keys)
    if any(k.startswith(DEPTH_PREFIX) for k in keys) or config.in_channels == 5:
        raise UnsupportedModelError(
            "this is an SD 2.x depth-to-image model (a 5-channel UNet conditioned on MiDaS "
            "depth): not supported; use an SD 2.x base, 768-v or inpainting model"
        )
    unclip_keys = any(k.startswith(UNCLIP_PREFIXES) for k in keys)
    if unclip_keys or (config.adm_in_channels and config.context_dim == 1024):
        raise UnsupportedModelError(
            "this is an SD 2.x unCLIP model (image-embedding conditioning, label_emb): not "
            "supported; use an SD 2.x base, 768-v or inpainting model"
        )
    if config.adm_in_channels:  # SDXL: its own rules
        return None
    family = "sd2" if config.num_head_channels != -1 else "sd1"
    inpainting = config.in_channels == 2 * config.out_channels + 1
    prediction = None
    if V_PREDICTION_MARKER in keys:
        prediction = "v"
    elif family == "sd1" or inpainting:
        prediction = "epsilon"
    return ModelKind(family, inpainting, prediction)


def probe_v_prediction(unet: UNet) -> bool:
    """AUTOMATIC1111's test for a v-prediction SD 2.x UNet (see the module docstring)."""
    return v_prediction_score(unet) < PROBE_THRESHOLD


@torch.inference_mode()
def v_prediction_score(unet: UNet) -> float:
    """mean(UNet(x, 999, context) - x) for x and context all 0.5: about 0 for an epsilon model,
    below -1 for a v model. One UNet call on an 8x8 latent, in the UNet's dtype and device."""
    weight = next(unet.parameters())
    like = dict(dtype=weight.dtype, device=weight.device)
    side, channels = PROBE_LATENT_SIDE, unet.config.in_channels
    x = torch.full((1, channels, side, side), PROBE_VALUE, **like)
    context = torch.full((1, PROBE_TOKENS, unet.config.context_dim), PROBE_VALUE, **like)
    t = torch.tensor([PROBE_TIMESTEP], device=weight.device)
    out = unet(x, t, context).float()
    return (out - PROBE_VALUE).mean().item()


def kind_options(unet: UNet, keys: Iterable[str], known: dict) -> dict:
    """``prediction`` and ``native_size`` for the pipeline, each only where ``known`` (the
    options given and read from the files so far) lacks it; the UNet is probed only when
    nothing else decides the prediction."""
    prediction = known.get("prediction")
    if prediction is not None and prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be 'epsilon' or 'v', got {prediction!r}")
    kind = infer_model_kind(unet, keys)
    if kind is None:
        return {}
    how = "given or recorded"
    if prediction is None and kind.prediction is not None:
        prediction, how = kind.prediction, "from the model family"
    if prediction is None:
        prediction = "v" if probe_v_prediction(unet) else "epsilon"
        how = "by AUTOMATIC1111's UNet test"
    kind = ModelKind(kind.family, kind.inpainting, prediction)
    logger.info("checkpoint: %s, prediction %s", kind.label, how)
    out = {"prediction": prediction}
    if "native_size" not in known:
        out["native_size"] = kind.native_size
    return out
