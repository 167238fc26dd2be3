"""Tiny random SDXL base and refiner single files in the SGM layout, for the refiner fields.

A small copy of sd-pipeline's tests/sdxl_checkpoints.py (importing it would need sd-pipeline's
own conftest): CLIP-L under ``conditioner.embedders.0.transformer.`` in transformers' names,
OpenCLIP bigG (the refiner's only encoder) in OpenCLIP's (fused q/k/v, ``text_projection`` a
matrix), the UNet with ``label_emb``, the tiny VAE of sd-pipeline's ``random_tiny``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd_clip import CLIPTextConfig, CLIPTextModel
from sd_pipeline.pipeline import random_tiny
from sd_unet import UNet, UNetConfig

# 64-wide heads (a single file's head count is inferred from them)
CLIP_L = CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128)
CLIP_G = CLIPTextConfig(width=128, layers=2, heads=2, mlp_width=256, activation="gelu",
                        projection_dim=128)  # fmt: skip
UNETS = {
    "base": dataclasses.replace(
        UNetConfig.tiny_sdxl(), context_dim=64 + 128, adm_in_channels=128 + 6 * 256
    ),
    "refiner": dataclasses.replace(
        UNetConfig.tiny_sdxl_refiner(), context_dim=128, adm_in_channels=128 + 5 * 256
    ),
}


def _random(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    """Weights scaled by their fan-in, biases small: none left at zero (the UNet's zero-started
    output layers would make every prediction 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _openclip(encoder: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """bigG as OpenCLIP's TextTransformer names it in SDXL's files."""
    s = encoder.state_dict()
    m = "text_model."
    out = {
        "token_embedding.weight": s[f"{m}embeddings.token_embedding.weight"],
        "positional_embedding": s[f"{m}embeddings.position_embedding.weight"],
        "ln_final.weight": s[f"{m}final_layer_norm.weight"],
        "ln_final.bias": s[f"{m}final_layer_norm.bias"],
        "text_projection": s["text_projection.weight"].T,
    }
    renamed = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for i in range(encoder.config.layers):
        ours, theirs = f"{m}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [s[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for a, b in renamed.items():
                out[f"{theirs}{b}.{kind}"] = s[f"{ours}{a}.{kind}"]
    return {prefix + k: v for k, v in out.items()}


def write_sdxl(path: Path, kind: str = "base", seed: int = 0) -> Path:
    """An SDXL ``kind`` ("base" or "refiner") single file at ``path``."""
    g = torch.Generator().manual_seed(seed)
    unet = _random(UNet(UNETS[kind]), g)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    vae = random_tiny(seed=seed).vae
    state |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    g_prefix = f"conditioner.embedders.{1 if kind == 'base' else 0}.model."
    state |= _openclip(_random(CLIPTextModel(CLIP_G), g), g_prefix)
    if kind == "base":
        clip_l = _random(CLIPTextModel(CLIP_L), g).state_dict()
        state |= {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
