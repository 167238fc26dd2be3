"""Loading and saving the UNet: SD single files, bare UNet files and diffusers folders.

Our parameter names are the CompVis ones, so a single-file checkpoint loads by stripping
``model.diffusion_model.``. A diffusers ``unet/`` folder goes through one rule-based key map
(``diffusers_key_map``), built from the config, usable in both directions. Where a file carries
no config, it is inferred from tensor shapes (``infer_config``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from sd_unet._checkpoint import (
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
    typed,
)
from sd_unet._owned_read import read_owned
from sd_unet.unet import UNet, UNetConfig

SD_PREFIX = "model.diffusion_model."  # the UNet inside a CompVis/SD single-file checkpoint
EMA_PREFIX = "model_ema."  # full (non-pruned) checkpoints: EMA weights, names without dots
PROBE = "input_blocks.0.0.weight"  # a key every UNet has
CONFIG_METADATA = "sd_unet.config"  # where save() records the config in a .safetensors file
SDXL_SIZE_EMBED_DIM = 256  # each size/crop/score number's embedding (SGM's outdim, diffusers'
# addition_time_embed_dim); sdxl_conditioning's default


# ---------------------------------------------------------------------------------------------
# Loading


def from_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    config: UNetConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    ema: bool = False,
) -> UNet:
    """A UNet with the weights of ``source`` (see ``UNet.from_checkpoint``)."""
    # On the CPU convolution weights end up channels_last: read them straight into that layout
    on_cpu = device is None or torch.device(device).type == "cpu"
    if isinstance(source, Mapping):
        state, found_config, name = _read_tensors(Tensors(source), ema)
    else:
        path = existing_path(source)
        if path.is_dir():
            state, found_config, name = _read_diffusers(path, config)
        else:
            state, found_config, name = _read_tensors(Tensors(path), ema, channels_last=on_cpu)
    config = config or found_config or infer_config(state, name)
    with torch.device("meta"):
        model = UNet(config)
    check_state_dict(model.state_dict(), state, name)
    model.load_state_dict(state, assign=True)
    del state  # from here on each conversion below frees the tensor it replaces
    model.to(device=device, dtype=dtype or torch.float32)
    if on_cpu:
        model.to(memory_format=torch.channels_last)  # the fast layout for CPU convolutions
    return model.eval()


def _read_tensors(
    source: Tensors, ema: bool, channels_last: bool = False
) -> tuple[dict, UNetConfig | None, str]:
    """The UNet's tensors (only those: safetensors are read lazily) and the config the file's
    metadata holds for it, if any (a bare UNet file's, or an SD single file's)."""
    keys = source.keys()
    config = config_from_metadata(source.metadata, CONFIG_METADATA, UNetConfig, source.name)
    if ema:
        return _read_ema(source, keys), config, f"{source.name} (EMA weights)"
    prefix = pick_prefix(keys, (SD_PREFIX, ""), PROBE)
    if prefix is None:
        raise CheckpointError(
            f"{source.name}: no UNet in this file: expected '{SD_PREFIX}{PROBE}' (an SD "
            f"checkpoint) or '{PROBE}' (a bare UNet file); found {len(keys)} keys, such as "
            f"{keys[:3]}"
        )
    tensors = None
    if channels_last and source.is_safetensors_file:
        tensors = read_owned(source.path, prefix)
    return tensors if tensors is not None else source.read(prefix), config, source.name


def _read_ema(source: Tensors, keys: list[str]) -> dict[str, torch.Tensor]:
    """The EMA weights of a full checkpoint: ``model_ema.diffusion_model<name>``, the name's dots
    removed. The file's ``model.diffusion_model.*`` keys give the dotted names back."""
    stem = EMA_PREFIX + "diffusion_model"
    if stem + PROBE.replace(".", "") not in keys:
        raise CheckpointError(
            f"{source.name}: no EMA weights in this file (no '{stem}...' keys); it is an "
            "EMA-only or non-EMA checkpoint: load it with ema=False"
        )
    names = [k[len(SD_PREFIX) :] for k in keys if k.startswith(SD_PREFIX)]
    dotted = {name.replace(".", ""): name for name in names}
    if len(dotted) != len(names) or not names:
        raise CheckpointError(
            f"{source.name}: cannot name the EMA weights: the file needs its '{SD_PREFIX}*' "
            "keys, each distinct once dots are removed"
        )
    flat = source.read(stem)
    return {dotted.get(k, k): v for k, v in flat.items()}


def _read_diffusers(path: Path, config: UNetConfig | None) -> tuple[dict, UNetConfig, str]:
    folder = find_diffusers_folder(path, "unet")
    if folder is None:
        raise CheckpointError(
            f"{path}: a folder, but not a diffusers UNet: expected config.json and "
            "diffusion_pytorch_model.safetensors in it or in its unet/ subfolder"
        )
    if config is None:  # (a config given is used as it is: config.json is not read)
        config = config_from_diffusers(read_json(folder / "config.json"), folder / "config.json")
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


# ---------------------------------------------------------------------------------------------
# Inferring the config from tensor shapes


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> UNetConfig:
    """The UNetConfig whose parameters have these shapes (CompVis names).

    Shapes do not tell the number of heads: SD 1.x-style weights (768-wide context, 1x1 conv
    projections) get 8 heads per level, SD 2.x- and SDXL-style ones (linear projections, or a
    1024-wide context) 64-channel heads. The transformer depth is counted per level (SDXL:
    0, 2, 10) and in the middle block; ``label_emb`` gives SDXL's added conditioning width.
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
    channel_mult, attention, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = shape(f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if out_ch % model_channels:
            raise CheckpointError(
                f"{source}: 'input_blocks.{first}.0.out_layers.3.weight' has {out_ch} output "
                f"channels, not a multiple of model_channels={model_channels}"
            )
        channel_mult.append(out_ch // model_channels)
        transformer = f"input_blocks.{first}.1"
        depths.append(_count_blocks(state, transformer))
        if f"{transformer}.norm.weight" in state:
            attention.append(2**level)
            if not depths[-1]:
                raise CheckpointError(
                    f"{source}: {transformer!r} has a norm but no transformer_blocks.0: not a "
                    "UNet layout this package knows"
                )
    proj_in = shape("middle_block.1.proj_in.weight")
    context_dim = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    linear = len(proj_in) == 2
    sd2_style = linear or context_dim == 1024
    adm_in_channels = 0
    if "label_emb.0.0.weight" in state:
        label = shape("label_emb.0.0.weight")
        time_embed = shape("time_embed.0.weight")[0]
        if len(label) != 2 or label[0] != time_embed:
            raise CheckpointError(
                f"{source}: 'label_emb.0.0.weight' has shape {label}; expected a linear layer "
                f"({time_embed}, adm_in_channels) to the time embedding's width"
            )
        adm_in_channels = label[1]
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shape("out.2.weight")[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(attention),
        num_heads=-1 if sd2_style else 8,
        num_head_channels=64 if sd2_style else -1,
        transformer_depth=tuple(depths),
        transformer_depth_middle=_count_blocks(state, "middle_block.1"),
        context_dim=context_dim,
        use_linear_in_transformer=linear,
        adm_in_channels=adm_in_channels,
    )


def _count_blocks(state: dict, transformer: str) -> int:
    depth = 0
    while f"{transformer}.transformer_blocks.{depth}.norm1.weight" in state:
        depth += 1
    return depth


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
    "label_emb.0.0": "add_embedding.linear_1",  # SDXL: addition_embed_type="text_time"
    "label_emb.0.2": "add_embedding.linear_2",
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
    depth = c.transformer_depth
    if not isinstance(depth, int) or depth != c.transformer_depth_middle:
        # diffusers gives its middle block the last level's depth: put it there where the last
        # level has no attention (its value is unused), and 1 at other levels without any
        depth = [c.depth(level) or 1 for level in levels]
        if not attn[-1]:
            depth[-1] = c.transformer_depth_middle
        elif depth[-1] != c.transformer_depth_middle:
            raise ValueError(
                f"diffusers cannot hold a middle depth ({c.transformer_depth_middle}) other than "
                f"the last level's ({depth[-1]})"
            )
    extra = {}
    if c.adm_in_channels:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_SIZE_EMBED_DIM,
            "projection_class_embeddings_input_dim": c.adm_in_channels,
        }
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
        "transformer_layers_per_block": depth,
        "norm_num_groups": c.norm_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        **extra,
    }


def config_from_diffusers(d: dict, source: Path | str = "config.json") -> UNetConfig:
    """Our config from a diffusers UNet2DConditionModel config.json.

    Each value is checked for its type and size first, so that a damaged or hostile file is one
    clear error naming the field (``sample_size``, unused here, is checked for the pipeline).
    """
    source = str(source)
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if d.get(key) and not (key == "addition_embed_type" and d[key] == "text_time"):
            raise CheckpointError(
                f"{source}: {key}={d[key]!r} is not a Stable Diffusion 1/2 or SDXL UNet"
            )
    for key, expected in (("flip_sin_to_cos", True), ("freq_shift", 0)):
        if key in d and d[key] != expected:
            raise CheckpointError(f"{source}: {key}={d[key]!r} unsupported (expected {expected})")
    if d.get("reverse_transformer_layers_per_block") is not None:
        raise CheckpointError(
            f"{source}: reverse_transformer_layers_per_block (an asymmetric UNet) is unsupported"
        )

    def value(name, default, **kwargs):
        return config_value(d, name, default, source, **kwargs)

    def int_or_list(name, default, **kwargs):  # diffusers allows either for these fields
        return value(name, (0,) if isinstance(d.get(name), list) else default, **kwargs)

    int_or_list("sample_size", 64, limit=MAX_SAMPLE_SIZE)
    channels = value("block_out_channels", (320, 640, 1280, 1280))
    down = value("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    if len(down) != len(channels):
        raise CheckpointError(
            f"{source}: block_out_channels {list(channels)} and down_block_types {list(down)} "
            "must be lists of the same length"
        )
    heads = d.get("num_attention_heads") or d.get("attention_head_dim") or 8
    like = (0,) if isinstance(heads, list) else 0
    heads = typed(heads, like, f"{source}: attention_head_dim", low=1)
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    if len(heads) != len(channels):
        raise CheckpointError(f"{source}: attention_head_dim {heads}: expected one per level")
    depth = int_or_list("transformer_layers_per_block", 1)
    if not isinstance(depth, int) and len(depth) != len(channels):
        raise CheckpointError(
            f"{source}: transformer_layers_per_block {list(depth)}: expected one per level"
        )
    middle = depth if isinstance(depth, int) else depth[-1]  # diffusers' mid block takes the last
    adm_in_channels = 0
    if d.get("addition_embed_type") == "text_time":
        size_dim = value("addition_time_embed_dim", 0)
        if size_dim != SDXL_SIZE_EMBED_DIM:
            raise CheckpointError(
                f"{source}: addition_time_embed_dim={size_dim}; SDXL's is {SDXL_SIZE_EMBED_DIM}"
            )
        adm_in_channels = value("projection_class_embeddings_input_dim", 0, low=1)
    head_counts = {h for ch, h, kind in zip(channels, heads, down) if "CrossAttn" in kind}
    widths = {ch // h for ch, h, kind in zip(channels, heads, down) if "CrossAttn" in kind}
    # Where both fit (every level with attention as wide), SD 2.x/SDXL-style ones (linear
    # projections or a 1024-wide context) get a head width, as infer_config gives them
    sd2_style = d.get("use_linear_projection") is True or d.get("cross_attention_dim") == 1024
    if len(head_counts) <= 1 and not (sd2_style and len(widths) == 1):
        num_heads, num_head_channels = (head_counts.pop() if head_counts else 8), -1
    else:
        if len(widths) != 1:
            raise CheckpointError(f"{source}: heads {heads} fit neither a fixed count nor width")
        num_heads, num_head_channels = -1, widths.pop()
    try:
        return UNetConfig(
            in_channels=value("in_channels", 4),
            out_channels=value("out_channels", 4),
            model_channels=channels[0],
            channel_mult=tuple(ch // channels[0] for ch in channels),
            num_res_blocks=value("layers_per_block", 2),
            attention_resolutions=tuple(
                2**level for level, kind in enumerate(down) if "CrossAttn" in kind
            ),
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            transformer_depth=depth,
            transformer_depth_middle=middle,
            context_dim=value("cross_attention_dim", 768),
            use_linear_in_transformer=value("use_linear_projection", False),
            norm_groups=value("norm_num_groups", 32),
            adm_in_channels=adm_in_channels,
        )
    except (ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: unsupported UNet config ({e})") from e


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
    save_json(diffusers_config(model.config), folder / "config.json")
