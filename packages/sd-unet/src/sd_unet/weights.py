"""Loading and saving the UNet: SD single files, bare UNet files and diffusers folders.

Our parameter names are the CompVis ones, so a single-file checkpoint loads by stripping
``model.diffusion_model.``. A diffusers ``unet/`` folder goes through one rule-based key map
(``diffusers_key_map``), built from the config, usable in both directions. Where a file carries
no config, it is inferred from tensor shapes (``infer_config``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from sd_unet._checkpoint import (
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
from sd_unet.unet import UNet, UNetConfig

SD_PREFIX = "model.diffusion_model."  # the UNet inside a CompVis/SD single-file checkpoint
EMA_PREFIX = "model_ema."  # full (non-pruned) checkpoints: EMA weights, names without dots
PROBE = "input_blocks.0.0.weight"  # a key every UNet has
CONFIG_METADATA = "sd_unet.config"  # where save() records the config in a .safetensors file


# ---------------------------------------------------------------------------------------------
# Loading


def from_checkpoint(
    path: str | os.PathLike,
    *,
    config: UNetConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    ema: bool = False,
) -> UNet:
    """A UNet with the weights of ``path`` (see ``UNet.from_checkpoint``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    # On the CPU convolution weights end up channels_last: read them straight into that layout
    on_cpu = device is None or torch.device(device).type == "cpu"
    if path.is_dir():
        state, found_config, source = _read_diffusers(path)
    else:
        state, found_config, source = _read_file(path, ema, channels_last=on_cpu)
    config = config or found_config or infer_config(state, source)
    with torch.device("meta"):
        model = UNet(config)
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, assign=True)
    del state  # from here on each conversion below frees the tensor it replaces
    model.to(device=device, dtype=dtype)
    if on_cpu:
        model.to(memory_format=torch.channels_last)  # the fast layout for CPU convolutions
    return model.eval()


def _read_file(
    path: Path, ema: bool, channels_last: bool = False
) -> tuple[dict, UNetConfig | None, str]:
    keys = checkpoint_keys(path)
    prefix = pick_prefix(keys, (SD_PREFIX, ""), PROBE)
    if ema:
        return _read_ema(path, keys), None, f"{path} (EMA weights)"
    if prefix is None:
        raise CheckpointError(
            f"{path}: no UNet in this file: expected '{SD_PREFIX}{PROBE}' (an SD checkpoint) or "
            f"'{PROBE}' (a bare UNet file); found {len(keys)} keys, such as {keys[:3]}"
        )
    tensors = load_tensors(path, prefix, channels_last=channels_last)
    return tensors, _config_from_metadata(path), str(path)


def _read_ema(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The EMA weights of a full checkpoint: ``model_ema.diffusion_model<name>``, the name's dots
    removed. The file's ``model.diffusion_model.*`` keys give the dotted names back."""
    stem = EMA_PREFIX + "diffusion_model"
    if stem + PROBE.replace(".", "") not in keys:
        raise CheckpointError(
            f"{path}: no EMA weights in this file (no '{stem}...' keys); it is an EMA-only or "
            "non-EMA checkpoint: load it with ema=False"
        )
    names = [k[len(SD_PREFIX) :] for k in keys if k.startswith(SD_PREFIX)]
    dotted = {name.replace(".", ""): name for name in names}
    if len(dotted) != len(names) or not names:
        raise CheckpointError(
            f"{path}: cannot name the EMA weights: the file needs its '{SD_PREFIX}*' keys, "
            "each distinct once dots are removed"
        )
    flat = load_tensors(path, stem)
    return {dotted.get(k, k): v for k, v in flat.items()}


def _read_diffusers(path: Path) -> tuple[dict, UNetConfig, str]:
    folder = find_diffusers_folder(path, "unet")
    if folder is None:
        raise CheckpointError(
            f"{path}: a folder, but not a diffusers UNet: expected config.json and "
            "diffusion_pytorch_model.safetensors in it or in its unet/ subfolder"
        )
    config = config_from_diffusers(read_json(folder / "config.json"), folder)
    weights = diffusers_weight_file(folder)
    theirs = load_tensors(weights)
    to_ours = {v: k for k, v in diffusers_key_map(config).items()}
    unknown = [k for k in theirs if k not in to_ours]
    if unknown:
        raise CheckpointError(
            f"{weights}: {len(unknown)} keys that a UNet of this config.json does not have "
            f"(first: {unknown[0]!r})"
        )
    return {to_ours[k]: v for k, v in theirs.items()}, config, str(weights)


def _config_from_metadata(path: Path) -> UNetConfig | None:
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        text = (f.metadata() or {}).get(CONFIG_METADATA)
    if text is None:
        return None
    values = json.loads(text)
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# Inferring the config from tensor shapes


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> UNetConfig:
    """The UNetConfig whose parameters have these shapes (CompVis names).

    Shapes do not tell the number of heads: SD 1.x-style weights (768-wide context, 1x1 conv
    projections) get 8 heads per level, SD 2.x-style ones 64-channel heads.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(
                f"{source}: cannot infer the UNet config: no {key!r} (pass config= to load it "
                "anyway)"
            )
        return tuple(state[key].shape)

    conv_in = shape(PROBE)
    if len(conv_in) != 4:
        raise CheckpointError(
            f"{source}: {PROBE!r} has shape {conv_in}; expected a conv weight "
            "(model_channels, in_channels, 3, 3)"
        )
    model_channels, in_channels = conv_in[:2]
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    downsamples = [b for b in range(blocks) if f"input_blocks.{b}.0.op.weight" in state]
    num_res_blocks = (downsamples[0] if downsamples else blocks) - 1
    levels = len(downsamples) + 1
    channel_mult, attention = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = shape(f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if out_ch % model_channels:
            raise CheckpointError(
                f"{source}: 'input_blocks.{first}.0.out_layers.3.weight' has {out_ch} output "
                f"channels, not a multiple of model_channels={model_channels}"
            )
        channel_mult.append(out_ch // model_channels)
        if f"input_blocks.{first}.1.norm.weight" in state:
            attention.append(2**level)
    proj_in = shape("middle_block.1.proj_in.weight")
    context_dim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    depth = 0
    while f"middle_block.1.transformer_blocks.{depth}.norm1.weight" in state:
        depth += 1
    linear = len(proj_in) == 2
    sd2_style = linear or context_dim == 1024
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shape("out.2.weight")[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention),
        num_heads=-1 if sd2_style else 8,
        num_head_channels=64 if sd2_style else -1,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=linear,
    )


# ---------------------------------------------------------------------------------------------
# The diffusers layout


def diffusers_key_map(config: UNetConfig) -> dict[str, str]:
    """Our (CompVis) parameter name -> diffusers' UNet2DConditionModel name, for every key."""
    with torch.device("meta"):
        names = list(UNet(config).state_dict())
    return {name: _diffusers_name(name, config) for name in names}


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
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _diffusers_name(name: str, c: UNetConfig) -> str:
    for ours, theirs in _TOP.items():
        if name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    part, index, sub, rest = _split(name)
    per_level = c.num_res_blocks + 1
    if part == "input_blocks":
        level, j = divmod(index - 1, per_level)
        if j == c.num_res_blocks:  # the level's last block: its downsampler
            return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        block = f"down_blocks.{level}"
    elif part == "middle_block":
        kind = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}[index]
        return f"mid_block.{kind}.{_inner(kind, rest)}"
    else:  # output_blocks
        level, j = divmod(index, c.num_res_blocks + 1)
        block = f"up_blocks.{level}"
        has_attention = 2 ** (len(c.channel_mult) - 1 - level) in c.attention_resolutions
        if sub == 1 + has_attention:  # after the resnet (and attention): the upsampler
            return f"{block}.upsamplers.0.{rest}"
    kind = f"resnets.{j}" if sub == 0 else f"attentions.{j}"
    return f"{block}.{kind}.{_inner(kind, rest)}"


def _split(name: str) -> tuple[str, int, int, str]:
    part, index, *more = name.split(".")
    if part == "middle_block":
        return part, int(index), 0, ".".join(more)
    return part, int(index), int(more[0]), ".".join(more[1:])


def _inner(kind: str, rest: str) -> str:
    if kind.startswith("resnets"):
        for ours, theirs in _RESNET.items():
            if rest.startswith(ours + "."):
                return theirs + rest[len(ours) :]
    return rest  # transformer names are the same in both layouts


def to_diffusers(state: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers' names."""
    names = diffusers_key_map(config)
    return {names[k]: v for k, v in state.items()}


def diffusers_config(config: UNetConfig) -> dict:
    """The config.json of the same UNet as a diffusers UNet2DConditionModel."""
    c = config
    levels = range(len(c.channel_mult))
    channels = [c.model_channels * m for m in c.channel_mult]
    attn = [2**level in c.attention_resolutions for level in levels]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": channels,
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": [c.heads(ch)[0] for ch in channels],  # diffusers: head *count*
        "use_linear_projection": c.use_linear_in_transformer,
        "transformer_layers_per_block": c.transformer_depth,
        "norm_num_groups": c.norm_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def config_from_diffusers(d: dict, source: Path | str = "config.json") -> UNetConfig:
    """Our config from a diffusers UNet2DConditionModel config.json."""
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if d.get(key):
            raise CheckpointError(f"{source}: {key}={d[key]!r} is not a Stable Diffusion 1/2 UNet")
    channels = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    depth = d.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise CheckpointError(f"{source}: per-level transformer depths {depth} unsupported")
        depth = depth[0]
    head_counts = {h for ch, h, kind in zip(channels, heads, down) if "CrossAttn" in kind}
    if len(head_counts) <= 1:
        num_heads, num_head_channels = (head_counts.pop() if head_counts else 8), -1
    else:
        widths = {ch // h for ch, h, kind in zip(channels, heads, down) if "CrossAttn" in kind}
        if len(widths) != 1:
            raise CheckpointError(f"{source}: heads {heads} fit neither a fixed count nor width")
        num_heads, num_head_channels = -1, widths.pop()
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=channels[0],
        channel_mult=tuple(ch // channels[0] for ch in channels),
        num_res_blocks=d.get("layers_per_block", 2),
        attention_resolutions=tuple(
            2**level for level, kind in enumerate(down) if "CrossAttn" in kind
        ),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=depth,
        context_dim=d.get("cross_attention_dim", 768),
        use_linear_in_transformer=d.get("use_linear_projection", False),
        norm_groups=d.get("norm_num_groups", 32),
    )


# ---------------------------------------------------------------------------------------------
# Saving


def save(model: UNet, path: str | os.PathLike) -> None:
    """A bare ``.safetensors`` UNet file: CompVis names, the config in its metadata."""
    config = json.dumps(asdict(model.config))
    save_tensors(model.state_dict(), path, {CONFIG_METADATA: config})


def save_diffusers(model: UNet, folder: str | os.PathLike) -> None:
    """A diffusers ``unet/`` folder: config.json and diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_diffusers(model.state_dict(), model.config)
    save_tensors(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2))
