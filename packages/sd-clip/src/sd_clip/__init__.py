"""The CLIP BPE tokenizer and CLIP text encoder that turn a prompt into Stable Diffusion's conditioning."""

from sd_clip._checkpoint import CheckpointError, load_state_dict
from sd_clip._version import __version__
from sd_clip.embeddings import Embedding, load_embedding, load_embeddings, ti_hashes
from sd_clip.prompt import parse_attention, prompt_schedule, split_and
from sd_clip.text_model import (
    CLIPTextConfig,
    CLIPTextModel,
    encode_prompt_sdxl,
    pad_to_same_length,
)
from sd_clip.tokenizer import Chunk, CLIPTokenizer, EmbeddingSlot

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "CheckpointError",
    "Chunk",
    "Embedding",
    "EmbeddingSlot",
    "__version__",
    "encode_prompt_sdxl",
    "load_embedding",
    "load_embeddings",
    "load_state_dict",
    "pad_to_same_length",
    "parse_attention",
    "prompt_schedule",
    "split_and",
    "ti_hashes",
]
