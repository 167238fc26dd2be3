"""``--from-png``: what a PNG's AUTOMATIC1111 parameters become as request fields.

The basic fields (prompt, steps, sampler, CFG, seed, size, ...) come from
:func:`sd_pipeline.metadata.read_parameters`; the others (variation seeds, hires fix, CFG
rescale, the speed-ups, SDXL's sizes and refiner, LoRA hashes) from their infotext names, as
the writers in ``infotext.py`` and ``sdxl.py`` put them. The CLI lays its flags over them.
"""

from __future__ import annotations

from pathlib import Path

from sd_pipeline.infotext import read_guidance_fields
from sd_pipeline.lora import parse_lora_hashes
from sd_pipeline.metadata import read_parameters, sampler_name
from sd_pipeline.request import HIRES_UPSCALER_LABELS, HiresFix
from sd_pipeline.sdxl import request_fields as sdxl_fields

__all__ = ["PNG_FIELDS", "parse_size", "request_fields"]

# Which PNG field each request field is read from (for error messages).
PNG_FIELDS = {
    "prompts": "prompt",
    "negative_prompts": "Negative prompt",
    "steps": "Steps",
    "sampler": "Sampler",
    "scheduler": "Schedule type",
    "guidance_scale": "CFG scale",
    "guidance_rescale": "CFG Rescale φ",
    "zero_terminal_snr": "Noise Schedule",
    "seed": "Seed",
    "width": "Size",
    "height": "Size",
    "strength": "Denoising strength",
    "clip_skip": "Clip skip",
    "subseed": "Variation seed",
    "subseed_strength": "Variation seed strength",
    "seed_resize_from": "Seed resize from",
    "rng": "RNG",
    "hires": "Hires",
    "refiner": "Refiner",
    "refiner_switch": "Refiner switch at",
    "token_merging_ratio": "Token merging ratio",
    "deepcache_interval": "DeepCache interval",
}


def request_fields(path: Path) -> tuple[dict, dict]:
    """Request fields from a PNG's AUTOMATIC1111 parameters, and each one's source (its PNG
    field, for error messages); a ValueError names what is unreadable."""
    try:
        params = read_parameters(path)
    except OSError as e:
        raise ValueError(str(e)) from e
    fields = dict(
        prompts=(params.prompt,),
        negative_prompts=(params.negative_prompt,),
        steps=params.steps,
        sampler=params.sampler,
        scheduler=params.scheduler,
        guidance_scale=params.cfg_scale,
        seed=params.seed,
        width=params.width,
        height=params.height,
        strength=params.denoising_strength,
        clip_skip=params.clip_skip,
    )
    fields.update(_extras(params.extra, path))
    fields.update(sdxl_fields(params.extra, path))
    if "Lora hashes" in params.extra:
        fields["lora_hashes"] = parse_lora_hashes(params.extra["Lora hashes"])
    if "hires" in fields:
        fields.pop("strength", None)  # the Denoising strength is the hires pass's
    fields = {k: v for k, v in fields.items() if v is not None}
    sources = {k: f"{path}: its {PNG_FIELDS.get(k, k)} field" for k in fields}
    return fields, sources


def _extras(extra: dict, path: Path) -> dict:
    """Request fields from AUTOMATIC1111's infotext fields beyond the basic ones."""
    fields = {}
    try:
        if "Variation seed" in extra:
            fields["subseed"] = int(extra["Variation seed"])
            fields["subseed_strength"] = float(extra.get("Variation seed strength", 0))
        if "Seed resize from" in extra:
            fields["seed_resize_from"] = parse_size(extra["Seed resize from"], "")
        fields.update(read_guidance_fields(extra))
        # AUTOMATIC1111 writes RNG only when it is not its default, the GPU's: emulated here
        fields["rng"] = extra.get("RNG", "NV").lower()
        if "Token merging ratio" in extra:
            fields["token_merging_ratio"] = float(extra["Token merging ratio"])
        if "DeepCache interval" in extra:
            fields["deepcache_interval"] = int(extra["DeepCache interval"])
        if "Hires upscale" in extra:
            names = {v.lower(): k for k, v in HIRES_UPSCALER_LABELS.items()}
            upscaler = extra.get("Hires upscaler", "Latent")
            fields["hires"] = HiresFix(
                scale=float(extra["Hires upscale"]),
                steps=int(extra["Hires steps"]) if "Hires steps" in extra else None,
                denoise=float(extra.get("Denoising strength", 0.7)),
                upscaler=names.get(upscaler.lower(), upscaler),
                sampler=_sampler_or_none(extra.get("Hires sampler")),
                prompt=extra.get("Hires prompt"),
                negative_prompt=extra.get("Hires negative prompt"),
            )
    except ValueError as e:
        raise ValueError(f"{path}: malformed generation parameters ({e})") from e
    return fields


def _sampler_or_none(label):
    return None if label is None else sampler_name(label)


def parse_size(text: str | None, flag: str) -> tuple[int, int] | None:
    """(width, height) from ``WxH`` (None for None); ``flag`` names it in the error."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} must be WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    return (width, height)
