"""txt2img, img2img and inpainting composed from sd-vae, sd-clip, sd-unet and sd-samplers, with a CLI and training."""

from sd_pipeline._version import __version__

__all__ = ["__version__"]
