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
from dataclasses import asdict
from functools import cache
from pathlib import Path

import torch
from safetensors import safe_open

from sd_vae._checkpoint import (
    PICKLE_SUFFIXES,
    CheckpointError,
    check_state_dict,
    checkpoint_keys,
    diffusers_weight_file,
    find_diffusers_folder,
    load_tensors,
    pick_prefix,
    read_json,
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
    """A diffusers ``config.json`` (missing fields take diffusers' defaults) -> our config."""
    supported = {
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    for field, value in supported.items():
        if cfg.get(field, value) != value:
            raise CheckpointError(
                f"{source}: unsupported autoencoder: {field}={cfg[field]!r} (the SD autoencoder "
                f"has {field}={value!r})"
            )
    widths = list(cfg.get("block_out_channels", [64]))
    base = widths[0]
    if any(w % base for w in widths):
        raise CheckpointError(f"{source}: block_out_channels {widths} are not multiples of {base}")
    return AutoencoderKLConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 1),
        norm_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


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


def _saved_config(path: Path) -> AutoencoderKLConfig | None:
    """The config `save` wrote into a safetensors file's metadata, if any."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(CONFIG_METADATA)
    if text is None:
        return None
    try:
        return AutoencoderKLConfig(**json.loads(text))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {CONFIG_METADATA!r} metadata ({e})") from e


# ---------------------------------------------------------------------------- load and save


def load_autoencoder(
    path: str | os.PathLike,
    *,
    config: AutoencoderKLConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> AutoencoderKL:
    """An AutoencoderKL from an SD single file, a standalone VAE file or a diffusers folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    # A .safetensors file's tensors stay memory-mapped (copied only where the dtype or device
    # changes): a decode pages in the decoder's weights, never the encoder's
    if path.is_dir():
        state, found_config, source = _read_diffusers_folder(path)
    else:
        state, found_config, source = _read_file(path)
    config = config or found_config or config_from_shapes(state, source)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    expected = model.state_dict()
    common = [k for k in expected if k in state]  # shapes first: the more telling error
    check_state_dict({k: expected[k] for k in common}, {k: state[k] for k in common}, source)
    check_state_dict(expected, state, source)
    model.load_state_dict(state, assign=True)
    del state  # from here on each conversion below frees the tensor it replaces
    model.to(device=device, dtype=dtype or torch.get_default_dtype())
    return model.eval()


def _read_file(path: Path) -> tuple[dict, AutoencoderKLConfig | None, str]:
    if path.suffix in PICKLE_SUFFIXES:  # read once (memory-mapped where torch can)
        everything = load_tensors(path)
        prefix = _vae_prefix(path, list(everything))
        state = {k[len(prefix) :]: v for k, v in everything.items() if k.startswith(prefix)}
    else:  # safetensors: only the autoencoder's tensors are read
        prefix = _vae_prefix(path, checkpoint_keys(path))
        state = load_tensors(path, prefix)
    state = {k: v for k, v in state.items() if k.startswith(PARTS)}
    if is_diffusers_layout(state):
        return from_diffusers(state), None, str(path)
    return conv_attention(state), _saved_config(path) if prefix == "" else None, str(path)


def _vae_prefix(path: Path, keys: list[str]) -> str:
    prefix = pick_prefix(keys, (SD_PREFIX, ""), PROBE)
    if prefix is None:
        raise CheckpointError(
            f"{path}: no autoencoder in this checkpoint: expected {SD_PREFIX + PROBE!r} (an SD "
            f"single file) or {PROBE!r} (a standalone VAE); its first keys are {keys[:3]}"
        )
    return prefix


def _read_diffusers_folder(path: Path) -> tuple[dict, AutoencoderKLConfig, str]:
    folder = find_diffusers_folder(path, "vae")
    if folder is None:
        raise CheckpointError(
            f"{path}: a folder, but not a diffusers autoencoder: expected config.json and "
            "diffusion_pytorch_model.safetensors (or .bin) in it or in its vae/ subfolder"
        )
    weights = diffusers_weight_file(folder)
    config = config_from_diffusers(read_json(folder / "config.json"), str(folder))
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
    (folder / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2))
