"""What sets SDXL apart in the pipeline, kept in small objects so that one ``StableDiffusion``
serves every family:

- a *text conditioner* per family: SD 1.x/2.x encode a prompt with one CLIP encoder into a
  context; SDXL base with CLIP-L and OpenCLIP bigG into their penultimate layers side by side
  (2048 wide) plus bigG's pooled output; the refiner with bigG alone (1280 wide, pooled);
- the *added conditioning* ``y`` the SDXL UNet takes beside the context
  (:class:`AddedConditioning`): the pooled output and the sizes (original size, crop, target
  size; the refiner: original size, crop, aesthetic score), with diffusers' defaults;
- the refiner as a second stage (:class:`RefinerSwitch`), as AUTOMATIC1111 runs it: one sampler
  run whose model calls go to the refiner once the noise level has come down to
  ``refiner_switch`` of the way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sd_clip import CLIPTextModel, CLIPTokenizer, encode_prompt_sdxl
from sd_lora.names import declare_sdxl_part
from sd_unet import sdxl_conditioning

__all__ = [
    "SDXL_NATIVE_SIZE",
    "AddedConditioning",
    "RefinerStage",
    "RefinerSwitch",
    "TextConditioner",
    "find_refiner",
    "infotext_fields",
    "request_fields",
    "text_conditioner",
]

# SDXL base and refiner were trained at 1024 x 1024 (SGM's sd_xl_base.yaml, diffusers'
# sample_size 128 latents).
SDXL_NATIVE_SIZE = 1024
# diffusers' StableDiffusionXLImg2ImgPipeline defaults (and AUTOMATIC1111's "SDXL low/high
# aesthetic score" settings): the refiner is told the prompt is a 6.0 picture, the negative 2.5.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


class TextConditioner:
    """SD 1.x / 2.x: one CLIP encoder; ``encode(texts)`` is the context (n, 77 k, width)."""

    pooled = False  # whether encode also returns a pooled output (SDXL)

    def __init__(self, encoders: Sequence[CLIPTextModel], tokenizers: Sequence[CLIPTokenizer]):
        self.encoders = nn.ModuleList(encoders)  # one module, so offloading moves them together
        self.tokenizers = list(tokenizers)

    @property
    def layers(self) -> int:
        """The most layers ``clip_skip`` may skip to (the smallest encoder's)."""
        return min(e.config.layers for e in self.encoders)

    def encode(
        self, texts: list[str], *, embeddings, clip_skip, normalize, comma_padding_backtrack
    ):
        return self.encoders[0].encode_prompt(
            texts, tokenizer=self.tokenizers[0], embeddings=embeddings, clip_skip=clip_skip,
            normalize=normalize, comma_padding_backtrack=comma_padding_backtrack,
        )  # fmt: skip

    def added(self, request) -> AddedConditioning | None:
        """The UNet's added conditioning for a request: none for SD 1.x / 2.x."""
        return None


class SDXLTextConditioner(TextConditioner):
    """SDXL: ``encode(texts)`` is ``(context, pooled)`` from :func:`sd_clip.encode_prompt_sdxl`
    (AUTOMATIC1111's prompt language on every encoder, the pooled output of each text's first
    chunk); ``refiner``: the aesthetic score takes the target size's place in ``y``."""

    pooled = True

    def __init__(self, encoders, tokenizers, *, refiner: bool):
        super().__init__(encoders, tokenizers)
        self.refiner = refiner

    def encode(
        self, texts: list[str], *, embeddings, clip_skip, normalize, comma_padding_backtrack
    ):
        return encode_prompt_sdxl(
            texts, list(self.encoders), self.tokenizers, embeddings, clip_skip, normalize,
            comma_padding_backtrack,
        )  # fmt: skip

    def added(self, request) -> AddedConditioning:
        size = (request.height, request.width)
        original = request.original_size or size
        crop = request.crop_top_left or (0, 0)
        if self.refiner:
            scores = (request.aesthetic_score, request.negative_aesthetic_score)
            return AddedConditioning(original, crop, aesthetic_scores=scores)
        return AddedConditioning(original, crop, target_size=request.target_size or size)


def text_conditioner(
    family: str,
    encoders: Sequence[CLIPTextModel | None],
    tokenizers: Sequence[CLIPTokenizer | None],
) -> TextConditioner:
    """The conditioner of a UNet ``family`` (``sd_unet.UNetConfig.family``) for its encoders
    (those given, in order: SDXL base's CLIP-L and bigG, the refiner's bigG) and their
    tokenizers (None: the bundled vocabulary, padded as the family's tokenizer pads)."""
    pairs = [(e, t) for e, t in zip(encoders, tokenizers) if e is not None]
    if not pairs:
        raise ValueError("a pipeline needs a text encoder")
    encoders = [e for e, _ in pairs]
    if not family.startswith("sdxl"):
        tok = pairs[0][1] or CLIPTokenizer(max_length=encoders[0].config.max_positions)
        return TextConditioner(encoders[:1], [tok])
    wanted = 1 if family == "sdxl-refiner" else 2
    if len(encoders) != wanted or encoders[-1].config.projection_dim is None:
        shapes = ", ".join(f"{e.config.width} wide" + (", with projection" if e.config.projection_dim
                           else "") for e in encoders)  # fmt: skip
        need = "OpenCLIP bigG" if wanted == 1 else "CLIP-L and OpenCLIP bigG"
        raise ValueError(
            f"an {family} UNet needs {need} (the last with its text_projection); got {shapes}"
        )
    for encoder, part in zip(encoders, ("te1", "te2")[2 - wanted :]):
        declare_sdxl_part(encoder, part)  # so that an SDXL LoRA's te1 / te2 layers find them
    # the bigG tokenizer pads with "!" (id 0), CLIP-L's with the end token
    tokenizers = [t or CLIPTokenizer(pad_id=0 if i == len(pairs) - 1 else None)
                  for i, (_, t) in enumerate(pairs)]  # fmt: skip
    return SDXLTextConditioner(encoders, tokenizers, refiner=family == "sdxl-refiner")


@dataclasses.dataclass(frozen=True)
class AddedConditioning:
    """SDXL's added conditioning for the UNet's rows: each row's pooled text embedding with the
    sizes, as ``sd_unet.sdxl_conditioning`` builds it. Sizes are (height, width), the crop
    (top, left), as in diffusers. The base model gets ``target_size``; the refiner gets
    ``aesthetic_scores`` (prompt, negative prompt) instead."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_scores: tuple[float, float] | None = None

    def __call__(self, pooled: list[torch.Tensor], negative: list[bool]) -> torch.Tensor:
        """``y`` (rows, adm_in_channels) for rows of pooled outputs (1, width) each; ``negative``
        says which rows are a negative prompt's."""
        rows = torch.cat(pooled).float()
        if self.aesthetic_scores is None:
            return sdxl_conditioning(rows, self.original_size, self.crop_top_left,
                                     self.target_size)  # fmt: skip
        good, bad = self.aesthetic_scores
        scores = torch.tensor([bad if n else good for n in negative], device=rows.device)
        return sdxl_conditioning(rows, self.original_size, self.crop_top_left,
                                 aesthetic_score=scores)  # fmt: skip


class RefinerSwitch:
    """``model(x_t, t)`` for the sampler: the base model's guided prediction until the noise
    has come down to ``switch`` of the way, the refiner's from then on, in the same sampler run.

    As AUTOMATIC1111 decides it by default (by sigma, not by step count): a call at timestep t
    (rounded, out of ``timesteps``) is the refiner's once ``(timesteps - 1 - t) / timesteps``
    reaches ``switch``; with 1000 timesteps and 0.8, from t = 199 down. That is diffusers'
    ``denoising_end`` / ``denoising_start`` split too (its base runs t >= 200) wherever the
    timesteps are whole numbers; once switched it stays switched."""

    def __init__(self, base: Callable, refiner: Callable, switch: float, timesteps: int):
        self.base, self.refiner = base, refiner
        self.last = (timesteps - 1) - switch * timesteps  # the refiner's from this timestep down
        self.switched = False

    def __call__(self, x: torch.Tensor, t, **kwargs):
        if not self.switched:
            latest = round(float(torch.as_tensor(t).max()))
            if latest <= self.last + 1e-6:
                self.switched = True
                self.refiner.calls = self.base.calls  # the prompt schedules' step count goes on
        return (self.refiner if self.switched else self.base)(x, t, **kwargs)

    @property
    def step(self) -> int:
        return self.base.step

    @step.setter
    def step(self, value: int) -> None:
        self.base.step = self.refiner.step = value

    def check_finite(self) -> None:
        self.base.check_finite()
        self.refiner.check_finite()


@dataclasses.dataclass
class RefinerStage:
    """The second stage of a request: the refiner pipeline and its encoding of the prompts."""

    pipe: Any  # a StableDiffusion
    conditioning: Any  # sd_pipeline.conditioning.Conditioning

    @classmethod
    def of(cls, pipe, request) -> RefinerStage | None:
        """The stage a request asks for (``request.refiner``), its model loaded once per path."""
        if request.refiner is None:
            return None
        refiner = load_refiner(pipe, request.refiner)
        own = refiner.embeddings  # the base's embeddings too, as AUTOMATIC1111 shares them
        refiner.embeddings = {**pipe.embeddings, **own}
        try:
            return cls(refiner, refiner.encode_prompt(request))
        finally:
            refiner.embeddings = own

    @staticmethod
    def on_device(stage: RefinerStage | None):
        """With offloading, the refiner's UNet on the device while sampling runs."""
        if stage is None:
            return contextlib.nullcontext()
        return stage.pipe._on_device(stage.pipe.unet)


def load_refiner(pipe, refiner):
    """``refiner`` as a pipeline: one given is used as it is; a path is loaded (once, then kept
    on ``pipe``) onto the base's device and dtype. Its latents must be the base's kind."""
    if isinstance(refiner, (str, os.PathLike)):
        key = Path(refiner).resolve()
        if key not in pipe._refiners:
            pipe._refiners[key] = type(pipe).from_checkpoint(
                refiner, device=pipe.device, dtype=pipe.dtype, offload=pipe.offload
            )
        refiner = pipe._refiners[key]
    ours, theirs = pipe.vae.config, refiner.vae.config
    if (ours.latent_channels, ours.downscale) != (theirs.latent_channels, theirs.downscale):
        raise ValueError(
            f"the refiner {refiner.name or ''} works on {theirs.latent_channels}-channel latents "
            f"at 1/{theirs.downscale} size; this model's are {ours.latent_channels} at "
            f"1/{ours.downscale}"
        )
    return refiner


REFINER_SUFFIXES = (".safetensors", ".ckpt")
_SHORT_TITLE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")  # "name [hash]"


# The infotext fields of SDXL's added conditioning, written where a request sets them (as
# AUTOMATIC1111's Size: width x height; the crop: left x top). AUTOMATIC1111 has none: it always
# conditions on the defaults (and reads its aesthetic scores from its settings).
SIZE_FIELDS = {"original_size": "SDXL original size", "target_size": "SDXL target size",
               "crop_top_left": "SDXL crop"}  # fmt: skip
SCORE_FIELDS = {"aesthetic_score": ("Aesthetic score", AESTHETIC_SCORE),
                "negative_aesthetic_score": ("Negative aesthetic score",
                                             NEGATIVE_AESTHETIC_SCORE)}  # fmt: skip


def infotext_fields(pipe, request) -> dict[str, str]:
    """AUTOMATIC1111's ``Refiner: name [hash]`` and ``Refiner switch at``, and the added
    conditioning's settings that differ from the defaults."""
    out = {}
    for name, label in SIZE_FIELDS.items():
        value = getattr(request, name)
        if value is not None:
            out[label] = f"{value[1]}x{value[0]}"
    for name, (label, default) in SCORE_FIELDS.items():
        if getattr(request, name) != default:
            out[label] = f"{getattr(request, name):g}"
    if request.refiner is not None:
        refiner = load_refiner(pipe, request.refiner)
        title = refiner.name or "refiner"
        if refiner.model_hash:
            title += f" [{refiner.model_hash}]"
        out |= {"Refiner": title, "Refiner switch at": f"{request.refiner_switch:g}"}
    return out


def request_fields(extra: dict[str, str], source) -> dict:
    """Request fields from the fields :func:`infotext_fields` writes; ``refiner`` is then the
    refiner's name (a str: see :func:`find_refiner`)."""
    out = {}
    try:
        for name, label in SIZE_FIELDS.items():
            if label in extra:
                across, down = (int(v) for v in extra[label].lower().split("x"))
                out[name] = (down, across)
        for name, (label, _) in SCORE_FIELDS.items():
            if label in extra:
                out[name] = float(extra[label])
        if "Refiner" in extra:
            match = _SHORT_TITLE.match(extra["Refiner"].strip())
            out["refiner"] = match.group(1) if match else extra["Refiner"].strip()
            out["refiner_switch"] = float(extra.get("Refiner switch at", 0.8))
    except ValueError:
        raise ValueError(f"{source}: malformed SDXL or refiner fields in its parameters") from None
    return out


def find_refiner(name: str, checkpoint, png) -> Path:
    """The refiner a PNG names, as a file beside the checkpoint (``name.safetensors`` or
    ``.ckpt``), where AUTOMATIC1111 would find it among its models."""
    folder = Path(checkpoint).parent if checkpoint is not None else None
    for suffix in REFINER_SUFFIXES:
        if folder is not None and (folder / (name + suffix)).is_file():
            return folder / (name + suffix)
    where = f"beside {checkpoint}" if checkpoint is not None else "(no --checkpoint)"
    raise FileNotFoundError(
        f"{png} was made with the refiner {name!r}: no {name}.safetensors or .ckpt {where}; "
        "give --refiner FILE"
    )
