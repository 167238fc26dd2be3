"""The CLIP BPE tokenizer and CLIP text encoder that turn a prompt into Stable Diffusion's conditioning."""

from sd_clip._checkpoint import CheckpointError, load_state_dict
from sd_clip._version import __version__
from sd_clip.text_model import CLIPTextConfig, CLIPTextModel
from sd_clip.tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "CheckpointError",
    "__version__",
    "load_state_dict",
]
