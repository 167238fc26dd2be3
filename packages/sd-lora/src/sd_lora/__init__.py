"""LoRA and LyCORIS adapter files for Stable Diffusion: loaded, merged, unmerged, attached."""

from sd_lora._version import __version__
from sd_lora.layers import Layer, LoRAError
from sd_lora.lora import LoRA, applied, remove_all

__all__ = ["Layer", "LoRA", "LoRAError", "__version__", "applied", "remove_all"]
