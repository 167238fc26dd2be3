"""txt2img, img2img and inpainting composed from sd-vae, sd-clip, sd-unet and sd-samplers, with a CLI and training."""

from sd_pipeline._version import __version__
from sd_pipeline.guidance import NonFiniteError, StopSampling
from sd_pipeline.images import (
    image_grid,
    load_image,
    numpy_to_pil,
    pil_to_numpy,
    pil_to_tensor,
    tensor_to_pil,
    to_mask,
)
from sd_pipeline.loading import CheckpointError, bundled_checkpoint
from sd_pipeline.metadata import GenerationParameters, read_parameters, save_image
from sd_pipeline.pipeline import StableDiffusion
from sd_pipeline.request import LIMITS, GenerationRequest, Limits, RequestError

__all__ = [
    "LIMITS",
    "CheckpointError",
    "GenerationParameters",
    "GenerationRequest",
    "Limits",
    "NonFiniteError",
    "RequestError",
    "StableDiffusion",
    "StopSampling",
    "__version__",
    "bundled_checkpoint",
    "image_grid",
    "load_image",
    "numpy_to_pil",
    "pil_to_numpy",
    "pil_to_tensor",
    "read_parameters",
    "save_image",
    "tensor_to_pil",
    "to_mask",
]
