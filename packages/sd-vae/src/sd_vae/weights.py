"""Loading and saving AutoencoderKL weights, in every layout users have.

- an SD single file: the CompVis names under ``first_stage_model.`` (a prefix strip);
- a standalone VAE file: the same names without the prefix;
- a diffusers folder: other names, mapped by the few rules in ``KEY_RULES`` (both directions).

Where a file carries no config, the config is read off the tensor shapes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path

import torch

from sd_vae._checkpoint import (
    MAX_SAMPLE_SIZE,
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
    save_json,
    save_tensors,
)
from sd_vae.autoencoder import AutoencoderKL, AutoencoderKLConfig

SD_PREFIX = "first_stage_model."  # where an SD single file keeps the autoencoder
PROBE = "encoder.conv_in.weight"  # a key every autoencoder has, in both layouts
PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
CONFIG_METADATA = "sd_vae.config"  # safetensors metadata entry written by `save`

# CompVis name <-> diffusers name, as prefix templates. `{up}` is a decoder level: CompVis
# numbers them from the full resolution, diffusers in the order they run, so it is flipped.
KEY_RULES = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{up}.block.{j}.", "decoder.up_blocks.{up}.resnets.{j}."),
    ("decoder.up.{up}.upsample.", "decoder.up_blocks.{up}.upsamplers.0."),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0."),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1."),
    ("{part}.mid.attn_1.norm.", "{part}.mid_block.attentions.0.group_norm."),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.to_q."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.to_k."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.to_v."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.to_out.0."),
    ("{part}.norm_out.", "{part}.conv_norm_out."),
    # diffusers before 0.14 named the attention projections so (read only: the rules above win)
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.query."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.key."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.value."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.proj_attn."),
]
LEAF_RULES = [("nin_shortcut.", "conv_shortcut.")]
# CompVis attention projections are 1x1 convs (C, C, 1, 1); diffusers' are linear (C, C).
ATTENTION_WEIGHT = re.compile(r".*\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


# ---------------------------------------------------------------------------- key mapping


@cache
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^.]+)", re.escape(template)))


def rename_key(key: str, levels: int, *, to_diffusers: bool) -> str:
    """One key from CompVis to diffusers names (or back); keys no rule matches are kept."""
    for rule in KEY_RULES:
        src, dst = rule if to_diffusers else rule[::-1]
        m = _pattern(src).match(key)
        if m is None:
            continue
        fields = m.groupdict()
        if "up" in fields:
            fields["up"] = levels - 1 - int(fields["up"])
        rest = key[m.end() :]
        for a, b in LEAF_RULES:
            a, b = (a, b) if to_diffusers else (b, a)
            if rest.startswith(a):
                rest = b + rest[len(a) :]
        return dst.format(**fields) + rest
    return key


def to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """CompVis-layout tensors -> diffusers names, attention projections as linear weights."""
    out = {}
    for k, v in state.items():
        out[rename_key(k, levels, to_diffusers=True)] = (
            v.flatten(1) if ATTENTION_WEIGHT.match(k) else v
        )
    return out


def from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers-layout tensors (current or pre-0.14 names) -> CompVis names and shapes."""
    ups = [int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks.")]
    levels = max(ups, default=0) + 1
    return conv_attention({rename_key(k, levels, to_diffusers=False): v for k, v in state.items()})


def conv_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention projections stored as linear (C, C) or conv1d (C, C, 1) weights -> 1x1 convs."""
    return {
        k: v.reshape(*v.shape[:2], 1, 1) if ATTENTION_WEIGHT.match(k) and v.ndim < 4 else v
        for k, v in state.items()
    }


def is_diffusers_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state)


# ---------------------------------------------------------------------------- configs


def config_from_shapes(state: dict[str, torch.Tensor], source: str) -> AutoencoderKLConfig:
    """Read the architecture off the tensor shapes (GroupNorm's group count cannot be: 32)."""

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise CheckpointError(f"{source}: cannot infer the autoencoder's shape: no {key!r}")
        return state[key].shape

    base, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = 1 + max(
        (int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")), default=0
    )
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    blocks = {k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")}
    try:
        return AutoencoderKLConfig(
            in_channels=in_channels,
            out_channels=shape("decoder.conv_out.weight")[0],
            latent_channels=shape("post_quant_conv.weight")[0],
            base_channels=base,
            channel_mult=tuple(w // base for w in widths),
            num_res_blocks=len(blocks),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: the tensor shapes fit no autoencoder config ({e})") from e


def config_from_diffusers(cfg: dict, source: str) -> AutoencoderKLConfig:
    """A diffusers ``config.json`` (missing fields take diffusers' defaults) -> our config.

    Each value is checked for its type and size first, so that a damaged or hostile file is one
    clear error naming the field (``sample_size``, unused here, is checked for the pipeline).
    """
    supported = {
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    for field, value in supported.items():
        if config_value(cfg, field, value, source) != value:
            raise CheckpointError(
                f"{source}: unsupported autoencoder: {field}={cfg[field]!r} (the SD autoencoder "
                f"has {field}={value!r})"
            )
    sample_size = cfg.get("sample_size")
    like = (0,) if isinstance(sample_size, list) else 0
    config_value(cfg, "sample_size", like, source, limit=MAX_SAMPLE_SIZE)
    widths = config_value(cfg, "block_out_channels", (64,), source)
    base = widths[0]
    if any(w % base for w in widths):
        raise CheckpointError(
            f"{source}: block_out_channels {list(widths)} are not multiples of {base}"
        )
    values = {
        "in_channels": config_value(cfg, "in_channels", 3, source),
        "out_channels": config_value(cfg, "out_channels", 3, source),
        "latent_channels": config_value(cfg, "latent_channels", 4, source),
        "base_channels": base,
        "channel_mult": tuple(w // base for w in widths),
        "num_res_blocks": config_value(cfg, "layers_per_block", 1, source),
        "norm_groups": config_value(cfg, "norm_num_groups", 32, source),
        "scaling_factor": config_value(cfg, "scaling_factor", 0.18215, source),
    }
    try:
        return AutoencoderKLConfig(**values)
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: unsupported autoencoder config ({e})") from e


def diffusers_config(config: AutoencoderKLConfig) -> dict:
    levels = len(config.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.base_channels * m for m in config.channel_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": 512,
        "scaling_factor": config.scaling_factor,
    }


# ---------------------------------------------------------------------------- load and save


def load_autoencoder(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: AutoencoderKLConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    scaling_factor: float | None = None,
    force_float32: bool = False,
) -> AutoencoderKL:
    """An AutoencoderKL from an SD single file, a standalone VAE file, a diffusers folder, or
    the tensors of either file already read (``load_state_dict``)."""
    if isinstance(source, Mapping):
        state, found_config, name = _read_tensors(Tensors(source))
    else:
        path = existing_path(source)
        if path.is_dir():
            state, found_config, name = _read_diffusers_folder(path, config)
        else:
            state, found_config, name = _read_tensors(Tensors(path))
    # A .safetensors file's tensors stay memory-mapped (copied only where the dtype or device
    # changes): a decode pages in the decoder's weights, never the encoder's
    config = config or found_config or config_from_shapes(state, name)
    if scaling_factor is not None:
        config = replace(config, scaling_factor=float(scaling_factor))
    with torch.device("meta"):
        model = AutoencoderKL(config, force_float32=force_float32)
    expected = model.state_dict()
    common = [k for k in expected if k in state]  # shapes first: the more telling error
    check_state_dict({k: expected[k] for k in common}, {k: state[k] for k in common}, name)
    check_state_dict(expected, state, name)
    model.load_state_dict(state, assign=True)
    del state  # from here on each conversion below frees the tensor it replaces
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


def _read_tensors(source: Tensors) -> tuple[dict, AutoencoderKLConfig | None, str]:
    """The autoencoder's tensors (only those: safetensors are read lazily) and the config the
    file's metadata holds for it, if any (a standalone file's, or an SD single file's)."""
    prefix = _vae_prefix(source.name, source.keys())
    state = {k: v for k, v in source.read(prefix).items() if k.startswith(PARTS)}
    config = config_from_metadata(
        source.metadata, CONFIG_METADATA, AutoencoderKLConfig, source.name
    )
    if is_diffusers_layout(state):
        return from_diffusers(state), config, source.name
    return conv_attention(state), config, source.name


def _vae_prefix(name: str, keys: list[str]) -> str:
    prefix = pick_prefix(keys, (SD_PREFIX, ""), PROBE)
    if prefix is None:
        raise CheckpointError(
            f"{name}: no autoencoder in this checkpoint: expected {SD_PREFIX + PROBE!r} (an SD "
            f"single file) or {PROBE!r} (a standalone VAE); its first keys are {keys[:3]}"
        )
    return prefix


def _read_diffusers_folder(
    path: Path, config: AutoencoderKLConfig | None
) -> tuple[dict, AutoencoderKLConfig, str]:
    folder = find_diffusers_folder(path, "vae")
    if folder is None:
        raise CheckpointError(
            f"{path}: a folder, but not a diffusers autoencoder: expected config.json and "
            "diffusion_pytorch_model.safetensors (or .bin) in it or in its vae/ subfolder"
        )
    weights = diffusers_weight_file(folder)
    if config is None:  # (a config given is used as it is: config.json is not read)
        config = config_from_diffusers(
            read_json(folder / "config.json"), str(folder / "config.json")
        )
    return from_diffusers(load_tensors(weights)), config, str(weights)


def save_autoencoder(model: AutoencoderKL, path: str | os.PathLike) -> None:
    """A standalone ``.safetensors`` file in the CompVis layout, the config in its metadata."""
    metadata = {"format": "pt", CONFIG_METADATA: json.dumps(asdict(model.config))}
    save_tensors(model.state_dict(), path, metadata)


def save_diffusers_folder(model: AutoencoderKL, folder: str | os.PathLike) -> None:
    """``config.json`` and ``diffusion_pytorch_model.safetensors`` in diffusers' layout."""
    folder = Path(folder)
    state = to_diffusers(model.state_dict(), len(model.config.channel_mult))
    save_tensors(state, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    save_json(diffusers_config(model.config), folder / "config.json")
