"""The CLIP BPE tokenizer and CLIP text encoder that turn a prompt into Stable Diffusion's conditioning."""

from sd_clip._version import __version__

__all__ = ["__version__"]
