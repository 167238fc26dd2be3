"""Where each layer of a LoRA file goes in a module tree.

The models here use the original names: the UNet's CompVis ones (``input_blocks.1.1.proj_in``),
the text encoder's transformers ones (``text_model.encoder.layers.0.self_attn.q_proj``). LoRA
files name UNet layers the diffusers way (kohya: ``lora_unet_down_blocks_0_attentions_0_proj_in``,
diffusers/PEFT: ``unet.down_blocks.0.attentions.0.proj_in``) or, in some AUTOMATIC1111-era
files, the CompVis way (``lora_unet_input_blocks_1_1_proj_in``). So each module of the tree gets
its diffusers name by rule, from the block structure the tree itself shows (how many ResBlocks
a level has, which blocks hold a transformer or an up/downsampler), and both names, flattened
to underscores as kohya writes them, index the module.
"""

from __future__ import annotations

import weakref

from torch import nn

from sd_lora.layers import LoRAError

_TOP = {  # CompVis -> diffusers, the UNet's modules outside the down/mid/up blocks
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_RESNET = {  # a CompVis ResBlock's layers -> a diffusers ResnetBlock2D's
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


# SDXL's parts as LoRA files name them: kohya's lora_unet_ / lora_te1_ (CLIP-L) / lora_te2_
# (OpenCLIP bigG), diffusers' unet. / text_encoder. (CLIP-L) / text_encoder_2.
SDXL_COMPONENTS = {"unet": ("unet",), "te1": ("te1", "te"), "te2": ("te2",)}
_DECLARED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def declare_sdxl_part(module: nn.Module, part: str) -> None:
    """Say that ``module`` is SDXL's ``"te1"`` (CLIP-L, which has the shape of SD 1.x's text
    encoder, so nothing in it tells) or ``"te2"`` (OpenCLIP bigG); the module is not changed."""
    if part not in ("te1", "te2"):
        raise ValueError(f"part must be 'te1' (CLIP-L) or 'te2' (OpenCLIP bigG), got {part!r}")
    _DECLARED[module] = part


def sdxl_part(root: nn.Module) -> str | None:
    """Which part of an SDXL model ``root`` is: "unet" (a UNet with added conditioning,
    ``label_emb``), "te1" / "te2" (declared, or a text encoder with ``text_projection``: bigG);
    None for SD 1.x / 2.x models."""
    if root in _DECLARED:
        return _DECLARED[root]
    names = {name for name, _ in root.named_modules()}
    if kind_of_model(root) == "unet":
        return "unet" if "label_emb" in names else None
    return "te2" if "text_projection" in names else None


def flat(name: str) -> str:
    return name.replace(".", "_")


def kind_of_model(root: nn.Module) -> str:
    """ "unet" or "te" from the module names; LoRAError for anything else."""
    names = {name for name, _ in root.named_modules()}
    if {"input_blocks", "middle_block", "output_blocks"} <= names:
        return "unet"
    if "text_model.encoder.layers" in names or "encoder.layers" in names:
        return "te"
    raise LoRAError(
        f"{type(root).__name__} is neither a UNet (CompVis names: input_blocks, middle_block, "
        "output_blocks) nor a CLIP text encoder (text_model.encoder.layers): a LoRA applies "
        "to one of those"
    )


def index(root: nn.Module) -> tuple[str, dict[str, str]]:
    """The model kind and {flattened name a LoRA file may use: the module's path in ``root``}."""
    kind = kind_of_model(root)
    paths = [
        name
        for name, m in root.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    found: dict[str, str] = {}
    if kind == "unet":
        to_diffusers = unet_diffusers_names(paths)
        for path in paths:
            found[flat(path)] = path
            found[flat(to_diffusers[path])] = path
    else:
        for path in paths:
            bare = path.removeprefix("text_model.")
            found[flat(bare)] = path
            found["text_model_" + flat(bare)] = path
    return kind, found


def unet_diffusers_names(paths: list[str]) -> dict[str, str]:
    """{CompVis module path: diffusers module path} for the modules of a UNet."""
    names = set(paths)
    blocks = {int(p.split(".")[1]) for p in paths if p.startswith("input_blocks.")}
    downsamplers = sorted(i for i in blocks if f"input_blocks.{i}.0.op" in names)
    # each level: num_res_blocks ResBlocks (each perhaps with a transformer), then a downsampler
    per_level = downsamplers[0] if downsamplers else len(blocks)
    return {path: _diffusers_name(path, per_level, names) for path in paths}


def _diffusers_name(path: str, per_level: int, names: set[str]) -> str:
    for ours, theirs in _TOP.items():
        if path == ours or path.startswith(ours + "."):
            return theirs + path[len(ours) :]
    part, index, *rest = path.split(".")
    index = int(index)
    if part == "middle_block":  # ResBlock, SpatialTransformer, ResBlock
        kind = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}.get(index)
        return f"mid_block.{kind}.{_inner(kind, '.'.join(rest))}" if kind else path
    if part not in ("input_blocks", "output_blocks") or not rest:
        return path
    sub, inner = int(rest[0]), ".".join(rest[1:])
    if part == "input_blocks":
        level, j = divmod(index - 1, per_level)
        if j == per_level - 1:  # the level's last block: its downsampler (a conv called op)
            return f"down_blocks.{level}.downsamplers.0.conv{inner.removeprefix('op')}"
        block = f"down_blocks.{level}"
    else:  # each output level: num_res_blocks + 1 ResBlocks, the last one with an upsampler
        level, j = divmod(index, per_level)
        block = f"up_blocks.{level}"
        if sub > 0 and f"output_blocks.{index}.{sub}.proj_in" not in names:
            return f"{block}.upsamplers.0.{inner}"
    kind = f"resnets.{j}" if sub == 0 else f"attentions.{j}"
    return f"{block}.{kind}.{_inner(kind, inner)}"


def _inner(kind: str, rest: str) -> str:
    if kind.startswith("resnets"):
        for ours, theirs in _RESNET.items():
            if rest == ours or rest.startswith(ours + "."):
                return theirs + rest[len(ours) :]
    return rest  # a transformer's names are the same in both layouts
