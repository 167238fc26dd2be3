"""ControlNet for Stable Diffusion: the model, its checkpoint formats, and weight-free
preprocessors for control images."""

from sd_controlnet._checkpoint import CheckpointError
from sd_controlnet._version import __version__
from sd_controlnet.control import (
    CONTROL_MODES,
    RESIZE_MODES,
    control_mode,
    control_scales,
    hint_tensor,
    resize_control_image,
    resize_mode,
    uses_conditional_only,
)
from sd_controlnet.controlnet import ControlNet, ControlNetConfig
from sd_controlnet.preprocess import PREPROCESSORS, preprocess

__all__ = [
    "CONTROL_MODES",
    "PREPROCESSORS",
    "RESIZE_MODES",
    "CheckpointError",
    "ControlNet",
    "ControlNetConfig",
    "__version__",
    "control_mode",
    "control_scales",
    "hint_tensor",
    "preprocess",
    "resize_control_image",
    "resize_mode",
    "uses_conditional_only",
]
