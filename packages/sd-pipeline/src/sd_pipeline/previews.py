"""Previews of latents while sampling runs: AUTOMATIC1111's "Approx cheap", or TAESD.

A fixed linear map from the 4 latent channels to RGB, fitted by AUTOMATIC1111's authors to the
SD VAE's decoder (``modules/sd_vae_approx.py``, ``cheap_approximation``); the coefficients below
are those published values, one table per latent space. It costs one small matrix product per
preview, so a callback can show every step; the picture is at latent resolution (1/8 of the
image's side) and only roughly right in colour. Given TAESD's decoder weights
(``sd_vae.TinyDecoder.from_checkpoint("taesd_decoder.pth")``), previews are full-size and close
to the real decode, at a small fraction of the VAE's cost.

The table only fits the VAE it was fitted to: on another latent space (the bundled model's own
small VAE, say) its colours are wrong, even inverted. :func:`latent_space` tells from a VAE's
shape and scaling factor which table applies, if any; where none does, previews decode with the
model's own VAE (AUTOMATIC1111's "Full" preview), which is exact and, for such small VAEs,
cheap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from sd_pipeline.images import tensor_to_pil

__all__ = [
    "CHEAP_COEFFICIENTS",
    "cheap_preview",
    "latent_preview",
    "latent_space",
    "model_preview",
    "preview_callback",
    "preview_tensor",
]

# (latent channel, RGB) for scaled latents (as the sampler sees them), giving [-1, 1] pixels.
CHEAP_COEFFICIENTS = {
    "sd1": (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    "sdxl": (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
}


# The SD autoencoder's shape (SD 1.x, 2.x and SDXL share it) and each family's latent scale.
_SD_VAE_SHAPE = {"base_channels": 128, "channel_mult": (1, 2, 4, 4), "num_res_blocks": 2}
_SPACE_BY_SCALE = {0.18215: "sd1", 0.13025: "sdxl"}


def latent_space(vae: torch.nn.Module) -> str | None:
    """The :data:`CHEAP_COEFFICIENTS` table for ``vae``'s latents: ``"sd1"`` or ``"sdxl"`` for
    an autoencoder of SD's shape and scale, else None (no table fits; decode to preview)."""
    config = getattr(vae, "config", None)
    if config is None or getattr(config, "latent_channels", None) != 4:
        return None
    if any(getattr(config, k, None) != v for k, v in _SD_VAE_SHAPE.items()):
        return None
    return _SPACE_BY_SCALE.get(round(float(getattr(config, "scaling_factor", 0.0)), 5))


def cheap_preview(latents: torch.Tensor, space: str = "sd1") -> torch.Tensor:
    """Approximate images (B, 3, h, w) in [-1, 1] from scaled latents (B, 4, h, w)."""
    if space not in CHEAP_COEFFICIENTS:
        raise ValueError(f"unknown latent space {space!r}; choose from: sd1, sdxl")
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"expected latents (B, 4, h, w), got shape {tuple(latents.shape)}")
    coefficients = torch.tensor(CHEAP_COEFFICIENTS[space], dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), coefficients)
    return rgb.clamp(-1.0, 1.0)


def preview_tensor(
    latents: torch.Tensor,
    space: str = "sd1",
    decoder: torch.nn.Module | None = None,
    vae: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Preview images (B, 3, H, W) in [-1, 1] on the CPU from scaled latents: with ``decoder``
    (a TAESD ``sd_vae.TinyDecoder``) the tiny autoencoder's pictures at full size; with ``vae``
    (the model's ``sd_vae.AutoencoderKL``) the cheap table of its latent space, or where
    :func:`latent_space` finds none its own decode; else :func:`cheap_preview` in ``space``."""
    if decoder is None and vae is not None:
        space = latent_space(vae) or ""
    if decoder is None and space:
        return cheap_preview(latents, space)
    weight = next((decoder or vae).parameters())
    latents = latents.to(weight.device, weight.dtype)
    with torch.inference_mode():
        if decoder is not None:
            images = decoder(latents)
        else:
            images = vae.decode(latents / vae.config.scaling_factor)
    return images.float().clamp(-1.0, 1.0).cpu()


def model_preview(latents: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    """The preview that fits a model with this ``vae`` (:func:`preview_tensor`'s choice)."""
    return preview_tensor(latents, vae=vae)


def latent_preview(
    latents: torch.Tensor,
    space: str = "sd1",
    size: tuple[int, int] | None = None,
    decoder: torch.nn.Module | None = None,
    vae: torch.nn.Module | None = None,
) -> list[Image.Image]:
    """Previews as PIL images (:func:`preview_tensor`'s), resized to ``size`` (width, height)
    when given."""
    pictures = tensor_to_pil(preview_tensor(latents, space, decoder=decoder, vae=vae))
    if size is not None:
        pictures = [p.resize(size, Image.Resampling.BILINEAR) for p in pictures]
    return pictures


def preview_callback(
    on_preview: Callable[[dict, list[Image.Image]], None],
    every: int = 1,
    decoder: torch.nn.Module | None = None,
    space: str = "sd1",
    vae: torch.nn.Module | None = None,
) -> Callable[[dict], None]:
    """A step callback for ``StableDiffusion.run``/``txt2img`` that calls
    ``on_preview(d, pictures)`` every ``every`` steps with previews of the current estimates
    (``d`` is sd-samplers' step dict), made as :func:`latent_preview` makes them; it may raise
    ``StopSampling`` as any callback may."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")

    def callback(d: dict) -> None:
        if d["i"] % every == 0:
            on_preview(d, latent_preview(d["denoised"], space, decoder=decoder, vae=vae))

    return callback
