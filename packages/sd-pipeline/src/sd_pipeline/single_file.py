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
from collections.abc import Callable, Mapping
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
    """The parts' tensors under their prefixes (``parts`` keyed as :data:`PREFIXES`, SDXL's
    second encoder as ``text_encoder_2``) in the layout of the UNet's family (SGM's for SDXL:
    see :func:`text_layouts`), on the CPU, cast to ``dtype`` when given; ``overrides`` replace
    tensors by (part, key), as training does with its EMA weights."""
    layouts = text_layouts(parts)
    out = {}
    for name, model in parts.items():
        tensors = {}
        for key, value in model.state_dict().items():
            value = (overrides or {}).get((name, key), value).detach().cpu()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[key] = value.contiguous()
        prefix, convert = layouts.get(name, (PREFIXES.get(name), None))
        if prefix is None:
            raise ValueError(f"no place for a part named {name!r} in a {_family(parts)} file")
        out.update({prefix + k: v for k, v in (convert or dict)(tensors).items()})
    return out


def _family(parts: Mapping[str, nn.Module]) -> str:
    return parts["unet"].config.family if "unet" in parts else "sd1"


def text_layouts(parts: Mapping[str, nn.Module]) -> dict[str, tuple[str, Callable | None]]:
    """Where SDXL's text encoders go, and in which names (SGM's layout, as Stability's files
    and every loader of them expect): base, CLIP-L in transformers' names under
    ``conditioner.embedders.0.transformer.`` and bigG in OpenCLIP's under
    ``conditioner.embedders.1.model.``; the refiner, its bigG under ``.embedders.0.model.``.
    SD 1.x and 2.x files: {} (every part under :data:`PREFIXES`)."""
    family = _family(parts)
    if family == "sdxl":
        return {
            "text_encoder": (clip_weights.SDXL_PREFIXES[0], None),
            "text_encoder_2": (clip_weights.SDXL_PREFIXES[1], clip_weights.to_openclip),
        }
    if family == "sdxl-refiner":
        return {"text_encoder": (clip_weights.REFINER_PREFIX, clip_weights.to_openclip)}
    return {}


def metadata(parts: Mapping[str, nn.Module], settings: Mapping | None = None) -> dict[str, str]:
    """The file's metadata: each part's config (as its own loader reads it) and the pipeline's.
    An SDXL file's text encoders have none: sd-clip's one config key could not say which
    encoder it is for, and their shapes tell their configs, as for Stability's files."""
    meta = {"format": "pt"}
    sdxl = bool(text_layouts(parts))
    for name, model in parts.items():
        if sdxl and name.startswith("text_encoder"):
            continue
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
