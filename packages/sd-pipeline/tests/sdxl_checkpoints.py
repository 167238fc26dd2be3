"""Tiny random-weight SDXL base and refiner checkpoints in the original (SGM) single-file
layout: CLIP-L under ``conditioner.embedders.0.transformer.`` (transformers' names), OpenCLIP
bigG under ``conditioner.embedders.1.model.`` (the refiner's under ``.0.model.``) in OpenCLIP's
own names (fused q/k/v, ``text_projection`` as a matrix), the UNet with ``label_emb``."""

from __future__ import annotations

import dataclasses

import torch
from conftest import tiny_components

from sd_clip import CLIPTextConfig, CLIPTextModel
from sd_unet import UNet, UNetConfig

# The CLIP widths must be multiples of 64 (a single file's head count is inferred from 64-wide
# heads): CLIP-L 64 wide, bigG 128 with a 128-wide pooled output.
CLIP_L = CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256)
CLIP_G = CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=512, activation="gelu",
                        projection_dim=128)  # fmt: skip
UNETS = {
    "sdxl": dataclasses.replace(
        UNetConfig.tiny_sdxl(), context_dim=64 + 128, adm_in_channels=128 + 6 * 256
    ),
    "sdxl-refiner": dataclasses.replace(
        UNetConfig.tiny_sdxl_refiner(), context_dim=128, adm_in_channels=128 + 5 * 256
    ),
}
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


def randomize(module: torch.nn.Module, g: torch.Generator) -> None:
    """Every weight random and scaled by its fan-in, biases small: nothing left at zero (the
    UNet's zero-initialised output layers would make every prediction 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def sdxl_components(kind: str = "sdxl", seed: int = 0) -> dict[str, torch.nn.Module]:
    """vae, text encoders (CLIP-L and bigG for the base, bigG for the refiner) and UNet."""
    g = torch.Generator().manual_seed(seed)
    vae = tiny_components(seed=seed)[0]  # (its posterior pinned to its mean, as conftest's)
    parts = {"unet": UNet(UNETS[kind]).eval(), "clip_g": CLIPTextModel(CLIP_G).eval()}
    if kind == "sdxl":
        parts["clip_l"] = CLIPTextModel(CLIP_L).eval()
    for part in parts.values():
        randomize(part, g)
    return {"vae": vae.eval(), **parts}


def openclip_layout(text_state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Our (transformers-named) text encoder tensors as OpenCLIP's TextTransformer names them
    (SD 2.x's and SDXL's files): q/k/v fused, ``text_projection`` a matrix applied as x @ P."""
    out = {
        "token_embedding.weight": text_state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": text_state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": text_state["text_model.final_layer_norm.weight"],
        "ln_final.bias": text_state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in text_state:
        out["text_projection"] = text_state["text_projection.weight"].T
        out["logit_scale"] = torch.tensor(4.6052)  # a whole CLIP model's, which loaders skip
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    layers = {k.split(".")[3] for k in text_state if ".encoder.layers." in k}
    for i in sorted(layers, key=int):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [text_state[f"{ours}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in names.items():
                out[f"{theirs}{b}.{kind}"] = text_state[f"{ours}{a}.{kind}"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def sgm_state(parts: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The components as one SGM single file's tensors (base or refiner, from what is there)."""
    refiner = "clip_l" not in parts
    state = {UNET_PREFIX + k: v for k, v in parts["unet"].state_dict().items()}
    state |= {VAE_PREFIX + k: v for k, v in parts["vae"].state_dict().items()}
    g_prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    state |= openclip_layout(parts["clip_g"].state_dict(), g_prefix)
    if not refiner:
        clip_l = parts["clip_l"].state_dict()
        state |= {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()}
    return {k: v.contiguous() for k, v in state.items()}
