"""The Stable Diffusion KL autoencoder: images to latents and back."""

from sd_vae._version import __version__

__all__ = ["__version__"]
