"""Which text encoders a checkpoint's UNet needs, and loading them: SD 1.x/2.x one, SDXL base
CLIP-L and OpenCLIP bigG, the refiner bigG alone.

The family is read from the UNet's weights (``sd_unet.UNetConfig.family``: ``label_emb`` and
its width tell SDXL base from the refiner), then each encoder is read once from the same file
(a single file's ``conditioner.embedders.0.transformer.`` / ``.1.model.`` / the refiner's
``.0.model.``, a diffusers root's ``text_encoder/`` / ``text_encoder_2/``), and its widths are
checked against the UNet's, so that a mismatched file is refused naming what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import sd_clip
from sd_clip import CLIPTextModel, CLIPTokenizer
from sd_pipeline.sdxl import SDXL_NATIVE_SIZE
from sd_unet import UNet
from sd_vae import AutoencoderKLConfig

__all__ = ["sdxl_parts", "sdxl_tokenizer_options"]

SIZE_NUMBERS = {"sdxl": 6, "sdxl-refiner": 5}  # numbers in y beside the pooled output
SIZE_EMBED_DIM = 256  # each number's Fourier embedding (SGM's ConcatTimestepEmbedderND)


def sdxl_parts(source, vae_source, unet: UNet, load: dict) -> tuple[dict, dict, dict]:
    """The text encoders ``unet`` needs, from ``source`` (``text_encoder`` and, for SDXL base,
    ``text_encoder_2``), the VAE loader's extra options (SDXL's scaling factor where the VAE
    comes from a file without a config) and the pipeline options the family implies."""
    family = unet.config.family
    if family not in SIZE_NUMBERS:
        return {"text_encoder": CLIPTextModel.from_checkpoint(source, **load)}, {}, {}
    which = (0, 1) if family == "sdxl" else (1,)
    try:
        encoders = [CLIPTextModel.from_checkpoint(source, which=w, **load) for w in which]
    except sd_clip.CheckpointError as e:
        raise sd_clip.CheckpointError(f"{_needs(unet)}; {e}") from e
    _check_widths(unet, encoders, source)
    parts = {"text_encoder": encoders[0]}
    if len(encoders) == 2:
        parts["text_encoder_2"] = encoders[1]
    vae_options = {}
    if isinstance(vae_source, Mapping) or not Path(vae_source).is_dir():
        vae_options["scaling_factor"] = AutoencoderKLConfig.sdxl().scaling_factor
    return parts, vae_options, {"native_size": SDXL_NATIVE_SIZE}


def _needs(unet: UNet) -> str:
    c = unet.config
    if c.family == "sdxl":
        return (
            f"an SDXL base UNet (label_emb of {c.adm_in_channels} inputs, context "
            f"{c.context_dim}) needs CLIP-L (conditioner.embedders.0.transformer.*, text_encoder/)"
            " and OpenCLIP bigG (conditioner.embedders.1.model.*, text_encoder_2/)"
        )
    return (
        f"an SDXL refiner UNet (label_emb of {c.adm_in_channels} inputs, context "
        f"{c.context_dim}) needs OpenCLIP bigG (conditioner.embedders.0.model.*, text_encoder_2/)"
    )


def _check_widths(unet: UNet, encoders: list[CLIPTextModel], source) -> None:
    c = unet.config
    widths = [e.config.width for e in encoders]
    pooled = encoders[-1].config.projection_dim
    adm = (pooled or 0) + SIZE_NUMBERS[c.family] * SIZE_EMBED_DIM
    if sum(widths) != c.context_dim or pooled is None or adm != c.adm_in_channels:
        name = source if not isinstance(source, Mapping) else "the checkpoint"
        found = " + ".join(f"{w} wide" for w in widths)
        raise sd_clip.CheckpointError(
            f"{name}: {_needs(unet)}, their widths summing to {c.context_dim} and the last's "
            f"pooled output {c.adm_in_channels - SIZE_NUMBERS[c.family] * SIZE_EMBED_DIM} wide; "
            f"found text encoders {found} with a pooled output of {pooled or 'none'}"
        )


def sdxl_tokenizer_options(root: Path) -> dict:
    """A diffusers root's second tokenizer (``tokenizer_2/``, OpenCLIP's: pads with ``!``).
    The refiner's root has only that one, for its one encoder: it is then the first."""
    folder = root / "tokenizer_2"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return {}
    # the pad token its special_tokens_map.json / tokenizer_config.json names, else bigG's "!"
    named = any(
        (folder / f).is_file() for f in ("special_tokens_map.json", "tokenizer_config.json")
    )
    tokenizer = CLIPTokenizer.from_folder(
        root, subfolder="tokenizer_2", pad_id=None if named else 0
    )
    if (root / "text_encoder").is_dir():
        return {"tokenizer_2": tokenizer}
    return {"tokenizer": tokenizer}
