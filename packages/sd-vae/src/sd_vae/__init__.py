"""The Stable Diffusion KL autoencoder: images to latents and back."""

from sd_vae._checkpoint import CheckpointError, load_state_dict
from sd_vae._version import __version__
from sd_vae.autoencoder import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from sd_vae.taesd import TinyDecoder

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CheckpointError",
    "DiagonalGaussianDistribution",
    "TinyDecoder",
    "__version__",
    "load_state_dict",
]
