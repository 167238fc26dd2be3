"""AUTOMATIC1111's hires fix: the second pass's request, from the first pass's latents
upscaled in latent space or as pictures."""

from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from sd_pipeline.images import pil_to_tensor, tensor_to_pil
from sd_pipeline.request import GenerationRequest

__all__ = ["hires_request", "upscale_latents"]


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    """Latents resized to ``size`` (h, w) as AUTOMATIC1111's latent upscalers do it."""
    mode, antialias = {
        "latent": ("bilinear", False),
        "latent-antialiased": ("bilinear", True),
        "latent-bicubic": ("bicubic", False),
        "latent-bicubic-antialiased": ("bicubic", True),
        "latent-nearest": ("nearest", False),
        "latent-nearest-exact": ("nearest-exact", False),
    }[upscaler]
    if mode in ("nearest", "nearest-exact"):
        return torch.nn.functional.interpolate(latents, size=size, mode=mode)
    return torch.nn.functional.interpolate(
        latents, size=size, mode=mode, align_corners=False, antialias=antialias
    )


def hires_request(pipe, request: GenerationRequest, latents: torch.Tensor) -> GenerationRequest:
    """The hires fix's second pass: img2img from the first pass's latents, upscaled (in
    latent space, or as pictures with Lanczos), at the hires denoising strength."""
    hires = request.hires
    width = int(request.width * hires.scale) // pipe.scale * pipe.scale
    height = int(request.height * hires.scale) // pipe.scale * pipe.scale
    size = (height // pipe.scale, width // pipe.scale)
    if hires.upscaler == "lanczos":
        pictures = tensor_to_pil(pipe.decode(latents))
        pictures = [p.resize((width, height), Image.Resampling.LANCZOS) for p in pictures]
        upscaled = torch.cat([pipe._encode_image(pil_to_tensor(p), 1) for p in pictures])
    else:
        upscaled = upscale_latents(latents, size, hires.upscaler)
    prompts, negatives = request.prompts, request.negative_prompts
    if hires.prompt is not None:
        prompts = (hires.prompt,) * len(prompts)
    if hires.negative_prompt is not None:
        negatives = (hires.negative_prompt,)
    return dataclasses.replace(
        request,
        task="img2img",
        width=width,
        height=height,
        steps=hires.steps or request.steps,
        sampler=hires.sampler or request.sampler,
        strength=hires.denoise,
        prompts=prompts,
        negative_prompts=negatives,
        init_latents=upscaled,
        seed_resize_from=None,
        hires=None,
    ).check()
