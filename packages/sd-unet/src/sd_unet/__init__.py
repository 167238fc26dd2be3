"""The conditional denoising UNet of Stable Diffusion."""

from sd_unet._version import __version__

__all__ = ["__version__"]
