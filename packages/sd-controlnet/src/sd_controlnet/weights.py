"""Loading and saving ControlNets: the published single files and diffusers folders.

Our parameter names are those of the original ControlNet code, so a published file
(``control_v11p_sd15_canny.pth``, keys ``control_model.*``, or the same keys bare) loads with a
prefix strip. The ``diff_control_*`` files (a ``difference`` marker key) hold each weight the
ControlNet shares with its base UNet as the difference to that UNet's weight: the base weights
are added back. A diffusers ``controlnet/`` folder goes through one rule-based key map
(``diffusers_key_map``), built from the config. Where a file carries no config, it is inferred
from tensor shapes (``infer_config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sd_controlnet._checkpoint import (
    CheckpointError,
    Tensors,
    check_state_dict,
    diffusers_weight_file,
    find_diffusers_folder,
    load_tensors,
    pick_prefix,
    read_json,
    save_tensors,
)
from sd_controlnet.controlnet import ControlNet, ControlNetConfig

PREFIX = "control_model."  # the ControlNet inside a published ControlNet file
UNET_PREFIX = "model.diffusion_model."  # the UNet inside an SD checkpoint (for base_unet=)
PROBE = "input_hint_block.0.weight"  # a key every ControlNet has
DIFFUSERS_PROBE = "controlnet_cond_embedding.conv_in.weight"  # the same in diffusers' names
DIFFERENCE_KEY = "difference"  # marks a diff_control_* file
CONFIG_METADATA = "sd_controlnet.config"  # where save() records the config

# ---------------------------------------------------------------------------------------------
# Loading


def from_checkpoint(
    path: str | os.PathLike,
    *,
    config: ControlNetConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    base_unet=None,
) -> ControlNet:
    """A ControlNet with the weights of ``path`` (see ``ControlNet.from_checkpoint``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ControlNet file or folder")
    if path.is_dir():
        state, found_config, source = _read_diffusers(path)
    else:
        state, found_config, source = _read_file(path, base_unet)
    if config is None:
        config = found_config or infer_config(state, source)
        if not path.is_dir() and _yaml_says_pooling(path):
            config = dataclasses.replace(config, global_average_pooling=True)
    with torch.device("meta"):
        model = ControlNet(config)
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, assign=True)
    del state
    model.to(device=device, dtype=dtype)
    if device is None or torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)  # the fast layout for CPU convolutions
    return model.eval()


def _read_file(path: Path, base_unet) -> tuple[dict, ControlNetConfig | None, str]:
    source = Tensors(path)  # a pickle is read here, once; a safetensors file lazily
    keys = source.keys()
    if any(k.startswith(("adapter.", "body.")) for k in keys):
        raise CheckpointError(
            f"{path}: a T2I-Adapter file, not a ControlNet; T2I-Adapters are not supported"
        )
    prefix = pick_prefix(keys, (PREFIX, ""), PROBE)
    if prefix is None and DIFFUSERS_PROBE in keys:
        # a single file in diffusers' names, as many SDXL ControlNets are published
        theirs = source.read()
        config = config_from_diffusers(_diffusers_config_from_keys(theirs, path), path)
        return _to_ours(theirs, config, path), config, str(path)
    if prefix is None:
        raise CheckpointError(
            f"{path}: no ControlNet in this file: expected '{PREFIX}{PROBE}' or '{PROBE}' (a "
            f"ControlNet's hint encoder); found {len(keys)} keys, such as {keys[:3]}"
        )
    tensors = source.read(prefix)
    if DIFFERENCE_KEY in keys:
        tensors = _add_base(tensors, base_unet, path)
    elif base_unet is not None:
        raise CheckpointError(
            f"{path}: base_unet was given, but this is a complete ControlNet, not a "
            "diff_control_* file of differences; load it without base_unet"
        )
    return tensors, _config_from_metadata(path), str(path)


def _yaml_says_pooling(path: Path) -> bool:
    """Whether the model's yaml beside it (``control_v11e_sd15_shuffle.yaml``, as the extension
    keeps them) sets ``global_average_pooling: True``: the one option the weights do not show."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return False
    text = yaml.read_text(errors="replace")
    return re.search(r"^\s*global_average_pooling:\s*true\s*$", text, re.I | re.M) is not None


def _add_base(tensors: dict, base_unet, path: Path) -> dict:
    """The ControlNet weights of a difference file: each weight the UNet has too is stored as
    the difference to the UNet's, so the UNet's is added back."""
    if base_unet is None:
        raise CheckpointError(
            f"{path}: a diff_control file holds differences to its base UNet's weights: pass "
            "base_unet= (the UNet module, its state dict in CompVis names, or an SD checkpoint)"
        )
    base = _base_state(base_unet)
    added = 0
    out = {}
    for name, tensor in tensors.items():
        if name == DIFFERENCE_KEY:
            continue
        if name in base:
            if tuple(base[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: {name!r} is {tuple(tensor.shape)}, the base UNet's is "
                    f"{tuple(base[name].shape)}: the difference is to another base model"
                )
            total = tensor.float() + base[name].to("cpu", torch.float32)
            tensor = total.to(tensor.dtype)  # the file's precision, as the other tensors
            added += 1
        out[name] = tensor
    if not added:
        raise CheckpointError(
            f"{path}: base_unet shares no weight with this ControlNet (expected CompVis names "
            "such as 'input_blocks.1.0.in_layers.2.weight')"
        )
    return out


def _base_state(base_unet) -> Mapping[str, torch.Tensor]:
    if isinstance(base_unet, nn.Module):
        return base_unet.state_dict()
    if isinstance(base_unet, Mapping):
        return base_unet
    if isinstance(base_unet, (str, os.PathLike)):
        source = Tensors(base_unet)
        prefix = pick_prefix(source.keys(), (UNET_PREFIX, ""), "input_blocks.0.0.weight")
        if prefix is None:
            raise CheckpointError(f"{base_unet}: no UNet in this file (base_unet=)")
        return source.read(prefix)
    raise TypeError(
        f"base_unet must be a UNet module, a state dict or a checkpoint path, not "
        f"{type(base_unet).__name__}"
    )


def _read_diffusers(path: Path) -> tuple[dict, ControlNetConfig, str]:
    folder = find_diffusers_folder(path, "controlnet")
    if folder is None:
        raise CheckpointError(
            f"{path}: a folder, but not a diffusers ControlNet: expected config.json and "
            "diffusion_pytorch_model.safetensors in it or in its controlnet/ subfolder"
        )
    d = read_json(folder / "config.json")
    config = config_from_diffusers(d, folder)
    weights = diffusers_weight_file(folder)
    state = _to_ours(load_tensors(weights), config, weights)
    if d.get("controlnet_conditioning_channel_order", "rgb") == "bgr":
        # diffusers reverses the image's channels for these; reversing the first conv's input
        # channels instead lets the hint stay RGB, as for every other ControlNet
        state["input_hint_block.0.weight"] = state["input_hint_block.0.weight"].flip(1)
    return state, config, str(weights)


def _to_ours(theirs: dict, config: ControlNetConfig, source) -> dict:
    to_ours = {v: k for k, v in diffusers_key_map(config).items()}
    unknown = [k for k in theirs if k not in to_ours]
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} keys that a ControlNet of this config does not have "
            f"(first: {unknown[0]!r})"
        )
    return {to_ours[k]: v for k, v in theirs.items()}


def _diffusers_config_from_keys(state: Mapping[str, torch.Tensor], source) -> dict:
    """The config.json that a ControlNetModel with these tensors (diffusers' names) has, as far
    as shapes tell: heads as ``infer_config`` assumes them."""

    def count(prefix: str) -> int:
        n = 0
        while any(k.startswith(f"{prefix}{n}.") for k in state):
            n += 1
        return n

    levels = count("down_blocks.")
    channels = [state[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    attention = [f"down_blocks.{i}.attentions.0.norm.weight" in state for i in range(levels)]
    depth = [count(f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels)]
    mid_depth = count("mid_block.attentions.0.transformer_blocks.")
    context_dim = state["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    linear = state["mid_block.attentions.0.proj_in.weight"].ndim == 2
    width = 8 if not linear and context_dim != 1024 else None  # SD 1.x: 8 heads; else 64 wide
    hint = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    hint += [state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]
             for i in range(1, count("controlnet_cond_embedding.blocks."), 2)]  # fmt: skip
    d = {
        "in_channels": state["conv_in.weight"].shape[1],
        "conditioning_channels": state["controlnet_cond_embedding.conv_in.weight"].shape[1],
        "block_out_channels": channels,
        "layers_per_block": count("down_blocks.0.resnets."),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "cross_attention_dim": context_dim,
        "attention_head_dim": [width or ch // 64 for ch in channels],
        "use_linear_projection": linear,
        "transformer_layers_per_block": [max(n, 1) for n in depth[:-1]] + [mid_depth],
        "conditioning_embedding_out_channels": hint,
    }
    if "add_embedding.linear_1.weight" in state:
        d["addition_embed_type"] = "text_time"
        d["projection_class_embeddings_input_dim"] = state["add_embedding.linear_1.weight"].shape[1]
    if not levels:
        raise CheckpointError(f"{source}: no down_blocks: not a diffusers ControlNet")
    return d


def _config_from_metadata(path: Path) -> ControlNetConfig | None:
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(CONFIG_METADATA)
    if text is None:
        return None
    values = json.loads(text)
    return ControlNetConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    )


# ---------------------------------------------------------------------------------------------
# Inferring the config from tensor shapes


def infer_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> ControlNetConfig:
    """The ControlNetConfig whose parameters have these shapes (original names).

    Shapes do not tell the number of heads: SD 1.x-style weights (768-wide context, 1x1 conv
    projections) get 8 heads per level, SD 2.x and SDXL ones 64-channel heads.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(
                f"{source}: cannot infer the ControlNet config: no {key!r} (pass config= to "
                "load it anyway)"
            )
        return tuple(state[key].shape)

    model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    downsamples = [b for b in range(blocks) if f"input_blocks.{b}.0.op.weight" in state]
    num_res_blocks = (downsamples[0] if downsamples else blocks) - 1
    channel_mult, attention, depths = [], [], []
    for level in range(len(downsamples) + 1):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = shape(f"input_blocks.{first}.0.out_layers.3.weight")[0]
        channel_mult.append(out_ch // model_channels)
        depths.append(_depth(state, f"input_blocks.{first}.1."))
        if depths[-1]:
            attention.append(2**level)
    context_dim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    linear = len(shape("middle_block.1.proj_in.weight")) == 2
    sd1_style = not linear and context_dim != 1024
    hint_convs = sorted(
        int(k.split(".")[1])
        for k in state
        if k.startswith("input_hint_block.") and k.endswith(".weight")
    )
    widths = [shape(f"input_hint_block.{i}.weight")[0] for i in hint_convs[:-1]]
    adm = shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in state else None
    return ControlNetConfig(
        in_channels=in_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention),
        num_heads=8 if sd1_style else -1,
        num_head_channels=-1 if sd1_style else 64,
        transformer_depth=tuple(depths),
        transformer_depth_middle=_depth(state, "middle_block.1."),
        context_dim=context_dim,
        use_linear_in_transformer=linear,
        adm_in_channels=adm,
        hint_channels=shape("input_hint_block.0.weight")[1],
        hint_block_channels=tuple(widths[::2]),  # convs 0, 4, 8, ...: where each width starts
    )


def _depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    depth = 0
    while f"{prefix}transformer_blocks.{depth}.norm1.weight" in state:
        depth += 1
    return depth


# ---------------------------------------------------------------------------------------------
# The diffusers layout


def diffusers_key_map(config: ControlNetConfig) -> dict[str, str]:
    """Our (original) parameter name -> diffusers' ControlNetModel name, for every key."""
    with torch.device("meta"):
        names = list(ControlNet(config).state_dict())
    hint_last = 4 * len(config.hint_block_channels) - 2  # the hint encoder's last conv (14)
    return {name: _diffusers_name(name, config, hint_last) for name in names}


_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "middle_block_out.0": "controlnet_mid_block",
}


def _diffusers_name(name: str, c: ControlNetConfig, hint_last: int) -> str:
    for ours, theirs in _TOP.items():
        if name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    part, index, *more = name.split(".")
    index = int(index)
    if part == "input_hint_block":
        base = "controlnet_cond_embedding."
        if index == 0:
            return base + "conv_in." + more[-1]
        if index == hint_last:
            return base + "conv_out." + more[-1]
        return f"{base}blocks.{index // 2 - 1}.{more[-1]}"
    if part == "zero_convs":
        return f"controlnet_down_blocks.{index}.{more[-1]}"
    if part == "middle_block":
        kind = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}[index]
        return f"mid_block.{kind}.{_inner(kind, '.'.join(more))}"
    # input_blocks
    sub, rest = int(more[0]), ".".join(more[1:])
    level, j = divmod(index - 1, c.num_res_blocks + 1)
    if j == c.num_res_blocks:  # the level's last block: its downsampler
        return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
    kind = f"resnets.{j}" if sub == 0 else f"attentions.{j}"
    return f"down_blocks.{level}.{kind}.{_inner(kind, rest)}"


def _inner(kind: str, rest: str) -> str:
    if kind.startswith("resnets"):
        for ours, theirs in _RESNET.items():
            if rest.startswith(ours + "."):
                return theirs + rest[len(ours) :]
    return rest  # transformer names are the same in both layouts


def diffusers_config(config: ControlNetConfig) -> dict:
    """The config.json of the same ControlNet as a diffusers ControlNetModel."""
    c = config
    channels = [c.model_channels * m for m in c.channel_mult]
    attn = [2**level in c.attention_resolutions for level in range(len(channels))]
    d = {
        "_class_name": "ControlNetModel",
        "in_channels": c.in_channels,
        "conditioning_channels": c.hint_channels,
        "block_out_channels": channels,
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": [c.heads(ch)[0] for ch in channels],  # diffusers: head *count*
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": [max(d, 1) for d in c.transformer_depth],
        "norm_num_groups": c.norm_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "conditioning_embedding_out_channels": list(c.hint_block_channels),
        "global_pool_conditions": c.global_average_pooling,
    }
    if c.transformer_depth_middle != d["transformer_layers_per_block"][-1]:
        d["transformer_layers_per_block"][-1] = c.transformer_depth_middle  # diffusers' rule
    if c.adm_in_channels is not None:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=c.adm_in_channels)  # fmt: skip
    return d


def config_from_diffusers(d: dict, source: Path | str = "config.json") -> ControlNetConfig:
    """Our config from a diffusers ControlNetModel config.json."""
    for key in ("class_embed_type", "encoder_hid_dim"):
        if d.get(key):
            raise CheckpointError(f"{source}: {key}={d[key]!r} is not an SD ControlNet")
    if d.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointError(
            f"{source}: addition_embed_type={d['addition_embed_type']!r} is not an SD ControlNet"
        )
    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    attn = ["CrossAttn" in kind for kind in down]
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    depth = d.get("transformer_layers_per_block", 1)
    depth = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    head_counts = {h for h, a in zip(heads, attn) if a} | {heads[-1]}
    widths = {ch // h for ch, h, a in zip(channels, heads, attn) if a} | {channels[-1] // heads[-1]}
    # Both fit where every attention level is as wide: SD 2.x and SDXL (linear projections)
    # count in head widths, SD 1.x in heads.
    if len(widths) == 1 and (len(head_counts) > 1 or d.get("use_linear_projection", False)):
        num_heads, num_head_channels = -1, widths.pop()
    elif len(head_counts) == 1:
        num_heads, num_head_channels = head_counts.pop(), -1
    else:
        raise CheckpointError(f"{source}: heads {heads} fit neither a fixed count nor width")
    adm = None
    if d.get("addition_embed_type") == "text_time":
        adm = d["projection_class_embeddings_input_dim"]
    return ControlNetConfig(
        in_channels=d.get("in_channels", 4),
        model_channels=channels[0],
        channel_mult=tuple(ch // channels[0] for ch in channels),
        num_res_blocks=d.get("layers_per_block", 2),
        attention_resolutions=tuple(2**level for level, a in enumerate(attn) if a),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=tuple(n if a else 0 for n, a in zip(depth, attn)),
        transformer_depth_middle=depth[-1],
        context_dim=d.get("cross_attention_dim", 768),
        use_linear_in_transformer=d.get("use_linear_projection", False),
        norm_groups=d.get("norm_num_groups", 32),
        adm_in_channels=adm,
        hint_channels=d.get("conditioning_channels", 3),
        hint_block_channels=tuple(d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
        global_average_pooling=d.get("global_pool_conditions", False),
    )


# ---------------------------------------------------------------------------------------------
# Saving


def save(model: ControlNet, path: str | os.PathLike) -> None:
    """A bare ``.safetensors`` ControlNet file: original names, the config in its metadata."""
    config = json.dumps(asdict(model.config))
    save_tensors(model.state_dict(), path, {CONFIG_METADATA: config})


def save_diffusers(model: ControlNet, folder: str | os.PathLike) -> None:
    """A diffusers ``controlnet/`` folder: config.json and diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = diffusers_key_map(model.config)
    state = {names[k]: v for k, v in model.state_dict().items()}
    save_tensors(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2))
