"""The conditional denoising UNet of Stable Diffusion."""

from sd_unet._checkpoint import CheckpointError, load_state_dict
from sd_unet._version import __version__
from sd_unet.deepcache import DeepCache
from sd_unet.unet import UNet, UNetConfig, compile_frozen, sdxl_conditioning

__all__ = [
    "CheckpointError",
    "DeepCache",
    "UNet",
    "UNetConfig",
    "__version__",
    "compile_frozen",
    "load_state_dict",
    "sdxl_conditioning",
]
