"""AUTOMATIC1111's infotext fields for what the pipeline adds beyond the basic ones (seed
extras, the hires fix), written under its names so that its tools and ``--from-png`` read
them."""

from __future__ import annotations

from sd_pipeline.metadata import GenerationParameters
from sd_pipeline.request import HIRES_UPSCALER_LABELS, GenerationRequest
from sd_samplers import sampler_label

__all__ = [
    "CFG_RESCALE_FIELDS",
    "control_fields",
    "denoising_strength",
    "extra_fields",
    "image_parameters",
    "read_guidance_fields",
    "variation_fields",
]


def denoising_strength(request: GenerationRequest) -> float | None:
    if request.hires is not None:
        return request.hires.denoise
    return request.strength if request.task != "txt2img" else None


# CFG rescale's phi as the CFG Rescale extensions write it (the A1111 cfg-rescale branch's
# name; Seshelle's extension writes "CFG Rescale", Neutral Prompt "CFG Rescale phi": all read)
CFG_RESCALE_FIELD = "CFG Rescale φ"
CFG_RESCALE_FIELDS = (CFG_RESCALE_FIELD, "CFG Rescale phi", "CFG Rescale")
# AUTOMATIC1111's "Noise schedule for sampling" setting, as its infotext records it
NOISE_SCHEDULE_FIELD, ZERO_SNR_LABEL = "Noise Schedule", "Zero Terminal SNR"


def extra_fields(request: GenerationRequest) -> dict[str, str]:
    """AUTOMATIC1111's infotext fields beyond GenerationParameters' own, under its names."""
    extra = {"RNG": request.rng.upper()} if request.rng != "gpu" else {}
    if request.guidance_rescale:
        extra[CFG_RESCALE_FIELD] = f"{request.guidance_rescale:g}"
    if request.zero_terminal_snr:
        extra[NOISE_SCHEDULE_FIELD] = ZERO_SNR_LABEL
    if request.token_merging_ratio:
        extra["Token merging ratio"] = f"{request.token_merging_ratio:g}"  # AUTOMATIC1111's
    if request.deepcache_interval > 1:
        extra["DeepCache interval"] = str(request.deepcache_interval)
    if request.seed_resize_from is not None:
        extra["Seed resize from"] = "{}x{}".format(*request.seed_resize_from)
    hires = request.hires
    if hires is not None:
        extra["Hires upscale"] = f"{hires.scale:g}"
        if hires.steps is not None:
            extra["Hires steps"] = str(hires.steps)
        extra["Hires upscaler"] = HIRES_UPSCALER_LABELS[hires.upscaler]
        if hires.sampler is not None:
            extra["Hires sampler"] = sampler_label(hires.sampler)
        if hires.prompt is not None:
            extra["Hires prompt"] = hires.prompt
        if hires.negative_prompt is not None:
            extra["Hires negative prompt"] = hires.negative_prompt
    return extra


def variation_fields(request: GenerationRequest, subseed: int | None) -> dict[str, str]:
    if subseed is None or not request.subseed_strength:
        return {}
    return {"Variation seed": str(subseed),
            "Variation seed strength": f"{request.subseed_strength:g}"}  # fmt: skip


CONTROL_MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
                       "control": "ControlNet is more important"}  # fmt: skip
RESIZE_MODE_LABELS = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize",
                      "resize_and_fill": "Resize and Fill"}  # fmt: skip


def control_fields(request: GenerationRequest) -> dict[str, str]:
    """``ControlNet i`` fields as AUTOMATIC1111's ControlNet extension writes them."""
    fields = {}
    for i, unit in enumerate(request.controls):
        name = getattr(unit.model, "name", None) or type(unit.model).__name__
        parts = [
            f"Module: {unit.preprocessor}", f"Model: {name}", f"Weight: {unit.weight:g}",
            f"Resize Mode: {RESIZE_MODE_LABELS[unit.resize_mode]}",
            f"Guidance Start: {unit.start:g}", f"Guidance End: {unit.end:g}",
            f"Control Mode: {CONTROL_MODE_LABELS[unit.mode]}",
        ]  # fmt: skip
        fields[f"ControlNet {i}"] = ", ".join(parts)
    return fields


def image_parameters(
    request: GenerationRequest, extra: dict[str, str], model_hash: str | None, model: str | None
) -> list[GenerationParameters]:
    """Each image's parameters, as its PNG records them: the request's settings, the
    pipeline's ``extra`` fields, and the image's own seeds."""
    return [
        GenerationParameters(
            prompt=prompt,
            negative_prompt=negative,
            steps=request.steps,
            sampler=request.sampler,
            scheduler=request.scheduler,
            cfg_scale=float(request.guidance_scale),
            seed=seed,
            width=request.width,
            height=request.height,
            model_hash=model_hash,
            model=model,
            denoising_strength=denoising_strength(request),
            clip_skip=request.clip_skip,
            extra={**extra, **variation_fields(request, subseed)},
        )
        for (prompt, negative), seed, subseed in zip(
            request.image_prompts, request.seeds, request.subseeds
        )
    ]


def read_guidance_fields(extra: dict[str, str]) -> dict:
    """``guidance_rescale`` and ``zero_terminal_snr`` from a PNG's fields (see
    :func:`extra_fields`); ValueError for a rescale that is not a number."""
    fields = {}
    for name in CFG_RESCALE_FIELDS:
        if name in extra:
            fields["guidance_rescale"] = float(extra[name])
            break
    schedule = extra.get(NOISE_SCHEDULE_FIELD)
    if schedule is not None:
        fields["zero_terminal_snr"] = schedule.strip().lower() == ZERO_SNR_LABEL.lower()
    return fields
