"""The Stable Diffusion KL autoencoder: images to latents and back."""

from sd_vae._checkpoint import CheckpointError, load_state_dict
from sd_vae._version import __version__
from sd_vae.autoencoder import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CheckpointError",
    "DiagonalGaussianDistribution",
    "__version__",
    "load_state_dict",
]
