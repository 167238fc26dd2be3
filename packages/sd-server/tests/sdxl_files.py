"""Tiny random SDXL base and refiner single files in the SGM layout, for the refiner fields.

Random tiny parts (CLIP-L, OpenCLIP bigG, the refiner's only encoder, the UNet with
``label_emb``, the tiny VAE of sd-pipeline's ``random_tiny``), written by sd-pipeline's
``single_file.save``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sd_clip import CLIPTextConfig, CLIPTextModel
from sd_pipeline import single_file
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


def write_sdxl(path: Path, kind: str = "base", seed: int = 0) -> Path:
    """An SDXL ``kind`` ("base" or "refiner") single file at ``path``, in SGM's layout (as
    sd-pipeline writes it; its own tests check that layout against diffusers')."""
    g = torch.Generator().manual_seed(seed)
    unet = _random(UNet(UNETS[kind]), g)
    clip_g = _random(CLIPTextModel(CLIP_G), g)
    parts = {"vae": random_tiny(seed=seed).vae, "unet": unet, "text_encoder": clip_g}
    if kind == "base":
        parts |= {"text_encoder": _random(CLIPTextModel(CLIP_L), g), "text_encoder_2": clip_g}
    return single_file.save(path, parts)
