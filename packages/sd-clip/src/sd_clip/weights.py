"""Loading and saving the CLIP text encoder: ``CLIPTextModel.from_checkpoint`` and ``.save``.

Accepted layouts, all with transformers' ``CLIPTextModel`` key names (this package's module names):

1. a Stable Diffusion 1.x single file: keys under ``cond_stage_model.transformer.`` (SDXL:
   ``conditioner.embedders.0.transformer.``); safetensors are read lazily, so only the text
   encoder's tensors are loaded;
2. a bare text-encoder file (the same keys without a prefix), e.g. one written by ``save``;
3. a transformers/diffusers folder (``config.json`` + ``model.safetensors`` or
   ``pytorch_model.bin``), or a diffusers model root holding ``text_encoder/``.

Keys without the ``text_model.`` level (as transformers 5 and some very old files write them) are
accepted everywhere.

The config comes from ``config=`` if given, else from the file (``config.json``, or the metadata
that ``save`` writes), else from the tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from sd_clip._checkpoint import (
    CheckpointError,
    Tensors,
    check_state_dict,
    config_from_metadata,
    config_value,
    diffusers_weight_file,
    existing_path,
    find_diffusers_folder,
    load_tensors,
    pick_prefix,
    read_json,
    save_tensors,
)
from sd_clip.text_model import CLIPTextConfig, CLIPTextModel

# Where single-file checkpoints keep the CLIP text encoder; "" is a bare text-encoder file.
SD_PREFIX = "cond_stage_model.transformer."  # where an SD 1.x single file keeps the text encoder
PREFIXES = (SD_PREFIX, "conditioner.embedders.0.transformer.", "")
PROBE = "text_model.embeddings.token_embedding.weight"
SHORT_PROBE = (
    "embeddings.token_embedding.weight"  # transformers 5 (and very old files) drop "text_model."
)
OPENCLIP_PROBE = "cond_stage_model.model.token_embedding.weight"  # SD 2.x
IGNORED = ("position_ids",)  # a buffer (arange) that some files carry; the model recomputes it
CONFIG_METADATA = "sd_clip.config"
HEAD_SIZE = 64  # every CLIP text encoder (OpenAI and OpenCLIP) uses 64-wide heads


def load_text_model(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: CLIPTextConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> CLIPTextModel:
    """Build a ``CLIPTextModel`` from any of the layouts in this module's docstring, or from
    the tensors of such a file already read (``load_state_dict``)."""
    if isinstance(source, Mapping):
        tensors, found_config, name = _read_tensors(Tensors(source))
    else:
        path = existing_path(source)
        if path.is_dir():
            tensors, found_config = _read_folder(path, config)
        else:
            tensors, found_config, _ = _read_tensors(Tensors(path))
        name = str(path)
    config = config or found_config or infer_config(tensors, name)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    expected = model.state_dict()
    check_state_dict(expected, tensors, name, ignore=IGNORED)
    model.load_state_dict({k: tensors[k] for k in expected}, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


def save_text_model(model: CLIPTextModel, path: str | os.PathLike) -> None:
    """Write the state dict and the config (as safetensors metadata) to ``path``."""
    config = json.dumps(dataclasses.asdict(model.config))
    save_tensors(model.state_dict(), path, metadata={"format": "pt", CONFIG_METADATA: config})


def infer_config(tensors: dict[str, torch.Tensor], source: str) -> CLIPTextConfig:
    """The config that the tensor shapes imply (heads from the width: CLIP heads are 64 wide)."""
    if PROBE not in tensors:
        raise CheckpointError(f"{source}: no {PROBE!r}; not a CLIP text encoder")
    vocab_size, width = tensors[PROBE].shape
    layer_ids = {
        int(k.split(".")[3]) for k in tensors if k.startswith("text_model.encoder.layers.")
    }
    if not layer_ids or layer_ids != set(range(len(layer_ids))):
        raise CheckpointError(
            f"{source}: expected encoder layers numbered 0..N-1 under "
            f"'text_model.encoder.layers.', found {sorted(layer_ids) or 'none'}"
        )
    if width % HEAD_SIZE:
        raise CheckpointError(
            f"{source}: width {width} is not a multiple of {HEAD_SIZE}, so the number of heads "
            "cannot be inferred; pass config=CLIPTextConfig(...)"
        )
    positions = tensors.get("text_model.embeddings.position_embedding.weight")
    fc1 = tensors.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError(f"{source}: no 'text_model.encoder.layers.0.mlp.fc1.weight'")
    # Only OpenCLIP's ViT-H and ViT-bigG (SD 2.x, SDXL) are this wide; they use exact GELU.
    activation = "gelu" if width in (1024, 1280) else "quick_gelu"
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_positions=positions.shape[0] if positions is not None else 77,
        width=width,
        layers=len(layer_ids),
        heads=width // HEAD_SIZE,
        mlp_width=fc1.shape[0],
        activation=activation,
        position_embedding="learned" if positions is not None else "rotary",
    )


def config_from_transformers(cfg: dict, source: str) -> CLIPTextConfig:
    """Map a transformers ``CLIPTextConfig`` JSON (or a ``CLIPConfig``'s text part) to ours,
    each value checked for its type and size first (one clear error naming the field)."""
    text_config = cfg.get("text_config")
    if text_config is not None:
        if not isinstance(text_config, dict):
            raise CheckpointError(f"{source}: text_config is {text_config!r}; expected an object")
        cfg = text_config

    def value(name, default):  # transformers' defaults for keys a config.json may leave out
        return config_value(cfg, name, default, source)

    try:
        return CLIPTextConfig(
            vocab_size=value("vocab_size", 49408),
            max_positions=value("max_position_embeddings", 77),
            width=value("hidden_size", 512),
            layers=value("num_hidden_layers", 12),
            heads=value("num_attention_heads", 8),
            mlp_width=value("intermediate_size", 2048),
            activation=value("hidden_act", "quick_gelu"),
            layer_norm_eps=value("layer_norm_eps", 1e-5),
        )
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: unsupported text encoder config: {e}") from e


def _read_folder(
    path: Path, config: CLIPTextConfig | None
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig]:
    folder = find_diffusers_folder(path, "text_encoder")
    if folder is None:
        raise CheckpointError(
            f"{path}: is a folder but holds no text encoder: expected config.json with "
            "model.safetensors or pytorch_model.bin in it or in its text_encoder/ subfolder"
        )
    weights = diffusers_weight_file(folder)
    if config is None:  # (a config given is used as it is: config.json is not read)
        config = config_from_transformers(
            read_json(folder / "config.json"), str(folder / "config.json")
        )
    tensors = load_tensors(weights)
    if PROBE not in tensors and SHORT_PROBE in tensors:
        tensors = {"text_model." + k: v for k, v in tensors.items()}
    return tensors, config


def _read_tensors(source: Tensors) -> tuple[dict[str, torch.Tensor], CLIPTextConfig | None, str]:
    """The text encoder's tensors (only those: safetensors are read lazily) and the config the
    file's metadata holds for it, if any (a bare file's, or an SD single file's)."""
    keys = source.keys()
    prefix = pick_prefix(keys, PREFIXES, PROBE)
    if prefix is not None:
        tensors = source.read(prefix)
    else:
        prefix = pick_prefix(keys, PREFIXES, SHORT_PROBE)
        if prefix is None:
            raise CheckpointError(_no_encoder_message(source.name, keys))
        tensors = {"text_model." + k: v for k, v in source.read(prefix).items()}
    config = config_from_metadata(source.metadata, CONFIG_METADATA, CLIPTextConfig, source.name)
    return tensors, config, source.name


def _no_encoder_message(path: str, keys: list[str]) -> str:
    if OPENCLIP_PROBE in keys:
        return (
            f"{path}: holds an OpenCLIP text encoder ('cond_stage_model.model.', SD 2.x), "
            "whose layout is not supported yet; convert it to a diffusers text_encoder/ folder"
        )
    sample = ", ".join(repr(k) for k in keys[:3]) or "none"
    return (
        f"{path}: no CLIP text encoder found: expected "
        f"'cond_stage_model.transformer.{PROBE}' (SD single file) or '{PROBE}' (bare file); "
        f"the file's first keys are {sample}"
    )
