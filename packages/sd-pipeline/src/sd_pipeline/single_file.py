"""The SD single-file layout: one ``.safetensors`` holding the three models under the original
CompVis prefixes, each model's config in the file's metadata.

Each component package owns its own prefix and metadata key (``sd_vae.weights.SD_PREFIX``,
``CONFIG_METADATA``, ...); this module only puts the three side by side, plus the pipeline's own
settings (native size, prediction type, schedule, generation defaults) under
:data:`PIPELINE_METADATA`. ``StableDiffusion.save``, training and the benchmarks write through
:func:`save`, and ``StableDiffusion.from_checkpoint`` reads :func:`pipeline_settings`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sd_clip import weights as clip_weights
from sd_pipeline.files import save_safetensors
from sd_unet import weights as unet_weights
from sd_vae import weights as vae_weights

__all__ = ["CONFIG_METADATA", "PIPELINE_METADATA", "PREFIXES", "save", "state_dict"]

# The part names used throughout sd-pipeline, and where an SD 1.x single file keeps each.
PREFIXES = {
    "vae": vae_weights.SD_PREFIX,
    "text_encoder": clip_weights.SD_PREFIX,
    "unet": unet_weights.SD_PREFIX,
}
CONFIG_METADATA = {
    "vae": vae_weights.CONFIG_METADATA,
    "text_encoder": clip_weights.CONFIG_METADATA,
    "unet": unet_weights.CONFIG_METADATA,
}
# A JSON object of the pipeline's settings: resolution, prediction, schedule, and the
# generation defaults that suit the model (steps, sampler, guidance_scale).
PIPELINE_METADATA = "sd_pipeline.config"


def state_dict(
    parts: Mapping[str, nn.Module],
    overrides: Mapping[tuple[str, str], torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The parts' tensors under their SD prefixes (``parts`` keyed as :data:`PREFIXES`), on the
    CPU, cast to ``dtype`` when given; ``overrides`` replace tensors by (part, key), as training
    does with its EMA weights."""
    out = {}
    for name, model in parts.items():
        for key, value in model.state_dict().items():
            value = (overrides or {}).get((name, key), value).detach().cpu()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            out[PREFIXES[name] + key] = value.contiguous()
    return out


def metadata(parts: Mapping[str, nn.Module], settings: Mapping | None = None) -> dict[str, str]:
    """The file's metadata: each part's config (as its own loader reads it) and the pipeline's."""
    meta = {"format": "pt"}
    for name, model in parts.items():
        meta[CONFIG_METADATA[name]] = json.dumps(dataclasses.asdict(model.config))
    if settings:
        meta[PIPELINE_METADATA] = json.dumps(dict(settings))
    return meta


def save(
    path: str | os.PathLike,
    parts: Mapping[str, nn.Module],
    settings: Mapping | None = None,
    *,
    dtype: torch.dtype | None = None,
    overrides: Mapping[tuple[str, str], torch.Tensor] | None = None,
) -> Path:
    """Write ``parts`` as one SD single file at ``path``, atomically."""
    return save_safetensors(
        state_dict(parts, overrides, dtype=dtype), path, metadata(parts, settings)
    )


def pipeline_settings(path: str | os.PathLike) -> dict:
    """The :data:`PIPELINE_METADATA` object of a ``.safetensors`` file ({} where it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(PIPELINE_METADATA)
    except Exception:  # the component loaders read this file too: they report what is wrong
        return {}
    if not text:
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable {PIPELINE_METADATA} metadata ({e})") from e
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: {PIPELINE_METADATA} metadata is not a JSON object")
    return settings
