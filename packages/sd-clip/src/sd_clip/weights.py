"""Loading and saving the CLIP text encoder: ``CLIPTextModel.from_checkpoint`` and ``.save``.

Accepted layouts, in transformers' ``CLIPTextModel`` key names (this package's module names) or
in OpenCLIP's, which are converted on load by rule:

1. a Stable Diffusion single file: SD 1.x keys under ``cond_stage_model.transformer.``; SD 2.x's
   OpenCLIP ViT-H under ``cond_stage_model.model.`` (its last layer, which SD 2.x does not use,
   and its projection are left out, as diffusers leaves them out); SDXL's CLIP-L under
   ``conditioner.embedders.0.transformer.`` and OpenCLIP ViT-bigG under
   ``conditioner.embedders.1.model.`` (the refiner's under ``conditioner.embedders.0.model.``);
   safetensors are read lazily, so only the chosen encoder's tensors are loaded;
2. a bare text-encoder file (the same keys without a prefix), e.g. one written by ``save``;
3. a transformers/diffusers folder (``config.json`` + ``model.safetensors`` or
   ``pytorch_model.bin``), or a diffusers model root holding ``text_encoder/`` (and SDXL's
   ``text_encoder_2/``, a ``CLIPTextModelWithProjection``).

``which`` picks the encoder of a file or root holding two (SDXL): ``0`` the first (CLIP-L,
``text_encoder/``), ``1`` the second (OpenCLIP bigG, ``text_encoder_2/``, the refiner's only
one); ``None`` (the default) the first there is.

OpenCLIP's layout: ``transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v stacked),
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``token_embedding.weight``,
``positional_embedding``, ``ln_final`` and ``text_projection`` (a matrix applied as
``x @ P``); its text towers use exact GELU.

Keys without the ``text_model.`` level (as transformers 5 and some very old files write them) are
accepted everywhere.

The config comes from ``config=`` if given, else from the file (``config.json``, or the metadata
that ``save`` writes), else from the tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
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
    read_json,
    save_tensors,
)
from sd_clip.text_model import CLIPTextConfig, CLIPTextModel

# Where single-file checkpoints keep the CLIP text encoder; "" is a bare text-encoder file.
SD_PREFIX = "cond_stage_model.transformer."  # where an SD 1.x single file keeps the text encoder
SD2_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 (FrozenOpenCLIPEmbedder)
SDXL_PREFIXES = (
    "conditioner.embedders.0.transformer.",  # SDXL base: CLIP ViT-L/14, transformers layout
    "conditioner.embedders.1.model.",  # SDXL base: OpenCLIP ViT-bigG/14
)
REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: its one encoder, bigG
# The prefixes each ``which`` looks under, in order.
WHICH_PREFIXES = {
    None: (SD_PREFIX, SD2_PREFIX, SDXL_PREFIXES[0], REFINER_PREFIX, ""),
    0: (SD_PREFIX, SD2_PREFIX, SDXL_PREFIXES[0], ""),
    1: (SDXL_PREFIXES[1], REFINER_PREFIX, ""),
}
WHICH_FOLDERS = {None: ("text_encoder", "text_encoder_2"), 0: ("text_encoder",),
                 1: ("text_encoder_2",)}  # fmt: skip
PREFIXES = WHICH_PREFIXES[None]
PROBE = "text_model.embeddings.token_embedding.weight"
SHORT_PROBE = (
    "embeddings.token_embedding.weight"  # transformers 5 (and very old files) drop "text_model."
)
OPENCLIP_PROBE = "token_embedding.weight"  # OpenCLIP's name (without its prefix)
IGNORED = ("position_ids",)  # a buffer (arange) that some files carry; the model recomputes it
# OpenCLIP entries that are not text-tower weights: the contrastive temperature, the causal mask
# (a buffer that older OpenCLIP versions saved), and a whole CLIP model's image tower.
OPENCLIP_IGNORED = ("logit_scale", "attn_mask")
OPENCLIP_NAMES = {  # whole names, after the prefix
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPENCLIP_PARTS = {  # parts of a resblock's names
    "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj.",
}  # fmt: skip
CONFIG_METADATA = "sd_clip.config"
HEAD_SIZE = 64  # every CLIP text encoder (OpenAI and OpenCLIP) uses 64-wide heads


def load_text_model(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: CLIPTextConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    which: int | None = None,
) -> CLIPTextModel:
    """Build a ``CLIPTextModel`` from any of the layouts in this module's docstring, or from
    the tensors of such a file already read (``load_state_dict``)."""
    if which not in WHICH_PREFIXES or isinstance(which, bool):
        raise ValueError(
            f"which must be None (the first text encoder there is), 0 (SDXL's CLIP-L, "
            f"text_encoder/) or 1 (SDXL's OpenCLIP bigG, text_encoder_2/), got {which!r}"
        )
    if isinstance(source, Mapping):
        tensors, found_config, name = _read_tensors(Tensors(source), which, config)
    else:
        path = existing_path(source)
        if path.is_dir():
            tensors, found_config = _read_folder(path, config, which)
        else:
            tensors, found_config, _ = _read_tensors(Tensors(path), which, config)
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


def infer_config(
    tensors: dict[str, torch.Tensor], source: str, activation: str | None = None
) -> CLIPTextConfig:
    """The config that the tensor shapes imply (heads from the width: CLIP heads are 64 wide).
    ``activation``: known from the layout (OpenCLIP's: gelu), else guessed from the width."""
    if PROBE not in tensors:
        raise CheckpointError(f"{source}: no {PROBE!r}; not a CLIP text encoder")
    vocab_size, width = tensors[PROBE].shape
    numbers = {k.split(".")[3] for k in tensors if k.startswith("text_model.encoder.layers.")}
    layer_ids = {int(n) for n in numbers if n.isdigit()}
    if len(layer_ids) != len(numbers):
        raise CheckpointError(
            f"{source}: encoder layer numbers must be integers, found "
            f"{sorted(n for n in numbers if not n.isdigit())[:3]}"
        )
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
    if activation is None:
        # Only OpenCLIP's ViT-H and ViT-bigG (SD 2.x, SDXL) are this wide; they use exact GELU.
        activation = "gelu" if width in (1024, 1280) else "quick_gelu"
    projection = tensors.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_positions=positions.shape[0] if positions is not None else 77,
        width=width,
        layers=len(layer_ids),
        heads=width // HEAD_SIZE,
        mlp_width=fc1.shape[0],
        activation=activation,
        position_embedding="learned" if positions is not None else "rotary",
        projection_dim=projection.shape[0] if projection is not None else None,
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
    path: Path, config: CLIPTextConfig | None, which: int | None
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig]:
    subfolders = WHICH_FOLDERS[which]
    folder = None
    for subfolder in subfolders:
        folder = find_diffusers_folder(path, subfolder)
        if folder is not None:
            break
    if folder is None:
        raise CheckpointError(
            f"{path}: is a folder but holds no text encoder: expected config.json with "
            f"model.safetensors or pytorch_model.bin in it or in its "
            f"{' or '.join(f + '/' for f in subfolders)} subfolder"
        )
    weights = diffusers_weight_file(folder)
    tensors = load_tensors(weights)
    if PROBE not in tensors and SHORT_PROBE in tensors:
        tensors = {("text_model." + k if k != "text_projection.weight" else k): v
                   for k, v in tensors.items()}  # fmt: skip
    if config is None:  # (a config given is used as it is: config.json is not read)
        config = config_from_transformers(
            read_json(folder / "config.json"), str(folder / "config.json")
        )
        projection = tensors.get("text_projection.weight")
        if projection is not None:  # CLIPTextModelWithProjection (SDXL's text_encoder_2)
            config = dataclasses.replace(config, projection_dim=projection.shape[0])
    return tensors, config


def find_text_encoder(keys: Iterable[str], which: int | None = None) -> tuple[str, str] | None:
    """Where a file's (``keys``') text encoder ``which`` is: ``(prefix, layout)``, the layout
    ``"transformers"``, ``"short"`` (transformers' names without ``text_model.``) or
    ``"openclip"``; None if the file has none. For a loader of whole models, which can tell
    SDXL base (``which=0`` and ``1`` both found) from the refiner (only ``1``)."""
    keys = set(keys)
    for prefix in WHICH_PREFIXES[which]:
        for probe, layout in ((PROBE, "transformers"), (SHORT_PROBE, "short")):
            if prefix + probe in keys:
                return prefix, layout
        if (
            prefix + OPENCLIP_PROBE in keys
            and prefix + "transformer.resblocks.0.ln_1.weight" in keys
        ):
            return prefix, "openclip"
    return None


def _read_tensors(
    source: Tensors, which: int | None = None, config: CLIPTextConfig | None = None
) -> tuple[dict[str, torch.Tensor], CLIPTextConfig | None, str]:
    """The text encoder's tensors (only those: safetensors are read lazily) and the config the
    file's metadata holds for it, if any (a bare file's, or an SD single file's)."""
    keys = source.keys()
    found = find_text_encoder(keys, which)
    if found is None:
        raise CheckpointError(_no_encoder_message(source.name, keys, which))
    prefix, layout = found
    metadata_config = config_from_metadata(
        source.metadata, CONFIG_METADATA, CLIPTextConfig, source.name
    )
    if layout == "openclip":
        # (a whole OpenCLIP model's image tower, if a bare file has one, is not the text's)
        tensors = {k: v for k, v in source.read(prefix).items() if not k.startswith("visual.")}
        blocks = len({k.split(".")[2] for k in tensors if k.startswith("transformer.resblocks.")})
        chosen = config or metadata_config
        # SD 2.x runs all but the last layer (FrozenOpenCLIPEmbedder, layer="penultimate"):
        # left out, with the projection of its output, so that clip_skip=1 is SD 2.x's own.
        sd2 = prefix == SD2_PREFIX and (chosen is None or chosen.layers == blocks - 1)
        tensors = from_openclip(
            tensors,
            source.name,
            layers=blocks - 1 if sd2 else None,
            projection=chosen.projection_dim is not None if chosen else not sd2,
        )
        if chosen is None:
            return tensors, infer_config(tensors, source.name, "gelu"), source.name
        return tensors, metadata_config, source.name
    tensors = source.read(prefix)
    if layout == "short":
        tensors = {("text_model." + k if k != "text_projection.weight" else k): v
                   for k, v in tensors.items()}  # fmt: skip
    return tensors, metadata_config, source.name


def from_openclip(
    tensors: Mapping[str, torch.Tensor],
    source: str = "state dict",
    *,
    layers: int | None = None,
    projection: bool = True,
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's tensors (names without their prefix) in this package's names:
    fused q/k/v split, ``text_projection`` transposed into a Linear weight (left out with
    ``projection=False``); with ``layers``, only the first ``layers`` resblocks. Entries the
    layout does not know keep their names, so that loading reports them."""
    out = {}
    for key, value in tensors.items():
        if key in OPENCLIP_IGNORED:
            continue
        if key in OPENCLIP_NAMES:
            out[OPENCLIP_NAMES[key]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.T.contiguous()
        elif key.startswith("transformer.resblocks.") and key.count(".") >= 3:
            _, _, index, rest = key.split(".", 3)
            if layers is not None and index.isdigit() and int(index) >= layers:
                continue
            out.update(_resblock_entry(f"text_model.encoder.layers.{index}.", rest, value, key,
                                       source))  # fmt: skip
        else:
            out[key] = value
    return out


def to_openclip(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_openclip`: this package's tensors (a ``CLIPTextModel``'s
    state dict) in OpenCLIP's TextTransformer names, as SD 2.x and SDXL files keep them: q/k/v
    fused into ``attn.in_proj_*``, the projection as the matrix OpenCLIP applies as x @ P."""
    names = {v: k for k, v in OPENCLIP_NAMES.items()}
    parts = {v: k for k, v in OPENCLIP_PARTS.items()}
    out = {}
    for key, value in tensors.items():
        if key in names:
            out[names[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            index, rest = key.split(".", 4)[3:]
            block = f"transformer.resblocks.{index}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if rest.startswith("self_attn.q_proj."):  # each fused tensor made once, at q
                    kind = rest.rsplit(".", 1)[1]
                    layer = f"text_model.encoder.layers.{index}.self_attn."
                    qkv = [tensors[f"{layer}{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
                continue
            ours = next((old for old in parts if rest.startswith(old)), "")
            out[block + parts.get(ours, "") + rest[len(ours) :]] = value
        else:
            raise ValueError(f"{key} has no place in OpenCLIP's text layout")
    return out


def _resblock_entry(layer: str, rest: str, value: torch.Tensor, key: str, source: str) -> dict:
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if value.shape[0] % 3:
            raise CheckpointError(
                f"{source}: {key} has {value.shape[0]} rows; expected q, k and v stacked "
                "(a multiple of 3)"
            )
        kind = rest.rsplit("_", 1)[1]
        return {f"{layer}self_attn.{name}.{kind}": part.contiguous()
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3))}  # fmt: skip
    for old, new in OPENCLIP_PARTS.items():
        if rest.startswith(old):
            return {layer + new + rest[len(old) :]: value}
    return {layer + rest: value}


def _no_encoder_message(path: str, keys: list[str], which: int | None) -> str:
    others = [w for w in (0, 1) if w != which and find_text_encoder(keys, w) is not None]
    if which is not None and others:
        wanted = "SDXL's second, OpenCLIP bigG" if which == 1 else "the first, CLIP-L or SD's"
        return (
            f"{path}: holds no text encoder for which={which} ({wanted}); "
            f"it holds one for which={others[0]}"
        )
    sample = ", ".join(repr(k) for k in keys[:3]) or "none"
    return (
        f"{path}: no CLIP text encoder found: expected "
        f"'cond_stage_model.transformer.{PROBE}' (SD 1.x single file), "
        f"'cond_stage_model.model.{OPENCLIP_PROBE}' (SD 2.x), 'conditioner.embedders.N.' (SDXL) "
        f"or '{PROBE}' (bare file); the file's first keys are {sample}"
    )
