"""From AUTOMATIC1111's txt2img / img2img JSON to sd-pipeline's GenerationRequest, and back to
its answer: ``{images, parameters, info}`` with ``info`` AUTOMATIC1111's JSON string.

:func:`build` checks everything it can before the job is queued (a bad value is a 422 at
once, naming the API's field), :func:`run` is the job itself in the worker thread, and
:func:`info` writes what the images were made with.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from sd_pipeline import LIMITS, GenerationParameters, GenerationRequest, RequestError, to_mask
from sd_pipeline.sdxl import load_refiner
from sd_samplers import SAMPLERS, sampler_from_label, sampler_label, steps_for_strength
from sd_server._version import __version__
from sd_server.api_models import IMG2IMG_NOOP, TXT2IMG_NOOP, Img2ImgRequest, ignored_fields
from sd_server.images import BadInput, decode_image
from sd_server.worker import Job

__all__ = ["FIELDS", "Generation", "Result", "api_error", "build", "info", "run"]

# GenerationRequest's field -> the API's name for it, for error messages.
FIELDS = {
    "prompts": "prompt",
    "negative_prompts": "negative_prompt",
    "sampler": "sampler_name",
    "guidance_scale": "cfg_scale",
    "strength": "denoising_strength",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "image": "init_images",
    "task": "init_images",
    "refiner": "refiner_checkpoint",
    "refiner_switch": "refiner_switch_at",
}
MAX_PROMPT = 100_000  # characters: far past CLIP's 77 tokens, short of a tokenizer stall
LORA_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
# AUTOMATIC1111's ``inpainting_fill`` values; only "original" is what the pipeline does.
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
# Model-independent settings AUTOMATIC1111 takes per request in override_settings.
CLIP_SKIP = "CLIP_stop_at_last_layers"
# AUTOMATIC1111's spellings of "no refiner", and its UI's switch point
NO_REFINER = (None, "", "None", "none")
REFINER_SWITCH = 0.8


def api_error(e: RequestError) -> BadInput:
    """sd-pipeline's RequestError with the field renamed to the API's."""
    return BadInput(FIELDS.get(e.field, e.field), e.problem)


@dataclass
class Generation:
    """A checked request, ready to queue: the seed is fixed, other unset values stay for the
    model that will run it to fill."""

    task: str  # the endpoint: txt2img | img2img
    request: GenerationRequest
    n_iter: int
    send_images: bool
    save_images: bool
    parameters: dict[str, Any]  # the request as received, echoed in the answer
    warnings: list[str] = field(default_factory=list)


@dataclass
class Result:
    images: list[Image.Image]
    requests: list[GenerationRequest]  # the resolved request of each iteration
    parameters: list[GenerationParameters]
    model_name: str | None
    model_hash: str | None
    interrupted: bool
    inpainting_model: bool = False
    started: float = field(default_factory=time.time)


def build(
    body, task: str, model, clip_skip: int | None, controlnets=None, catalog=None
) -> Generation:
    """Check a txt2img or img2img body against the current model (its
    :class:`~sd_server.models.ModelInfo`); raises BadInput. ``catalog``: the checkpoints a
    ``refiner_checkpoint`` may name."""
    noop = IMG2IMG_NOOP if task == "img2img" else TXT2IMG_NOOP
    extra = dict(body.model_extra or {})
    scripts = extra.get("alwayson_scripts")
    if isinstance(scripts, dict) and controlnets is not None:  # the ControlNet extension's
        extra["alwayson_scripts"] = {k: v for k, v in scripts.items()
                                     if k.lower() != "controlnet"}  # fmt: skip
    warnings = ignored_fields(extra, noop)
    prompt = _prompt(body.prompt, "prompt", warnings, model.lora_dir)
    negative = _prompt(body.negative_prompt, "negative_prompt", warnings, None)
    clip_skip = _overrides(body.override_settings, clip_skip, warnings)
    fields: dict[str, Any] = dict(
        prompts=(prompt,),
        negative_prompts=(negative,),
        steps=body.steps,
        sampler=_sampler(body),
        guidance_scale=body.cfg_scale,
        seed=body.seed,
        width=body.width,
        height=body.height,
        batch_size=body.batch_size,
        clip_skip=clip_skip,
        guidance_rescale=body.guidance_rescale,
        zero_terminal_snr=body.zero_terminal_snr,
        **_refiner(body, catalog),
    )
    if controlnets is not None:
        fields["controls"] = controlnets.units(scripts, model, warnings)
    if task == "img2img":
        fields.update(_images(body, warnings))
    _check_count("n_iter", body.n_iter, body.batch_size)
    try:
        request = GenerationRequest(**fields).check()
        resolved = request.resolve(model.defaults, model.native_size, model.scale)
    except RequestError as e:
        raise api_error(e) from None
    layers = model.clip_layers
    if request.clip_skip is not None and request.clip_skip > layers:
        raise BadInput(FIELDS["clip_skip"], f"must be at most {layers} (the model's CLIP layers)")
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return Generation(
        task=task,
        request=dataclasses.replace(request, seed=resolved.seed),
        n_iter=body.n_iter,
        send_images=body.send_images,
        save_images=body.save_images,
        parameters=parameters,
        warnings=warnings,
    )


def _prompt(text: str, name: str, warnings: list[str], lora_dir) -> str:
    if len(text) > MAX_PROMPT:
        raise BadInput(name, f"is {len(text)} characters long; at most {MAX_PROMPT} are accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(name, f"holds a character that is not text (at {e.start}: a lone "
                       "surrogate); send UTF-8 text") from None  # fmt: skip
    return _usable_tags(text, name, warnings, lora_dir)


def _usable_tags(text: str, name: str, warnings: list[str], lora_dir) -> str:
    """The prompt with the extra-network tags the pipeline cannot use removed, each named in a
    warning (AUTOMATIC1111 skips a LoRA it cannot find, too): the pipeline merges the LoRAs of
    the tags left, from ``--lora-dir``."""
    from sd_pipeline.lora import find_lora, parse_prompt

    def usable(match: re.Match) -> str:
        tag = match.group(0)
        if lora_dir is None or tag.lower().startswith("<hypernet:"):
            why = "no --lora-dir" if lora_dir is None else "hypernetworks are not supported"
            warnings.append(f"{name}: {tag} removed and not applied ({why})")
            return ""
        try:
            for lora in parse_prompt(tag)[1]:
                find_lora(lora.name, lora_dir)
        except (FileNotFoundError, ValueError) as e:
            warnings.append(f"{name}: {tag} removed and not applied ({e})")
            return ""
        return tag

    return LORA_TAG.sub(usable, text)


def _refiner(body, catalog) -> dict[str, Any]:
    """``refiner_checkpoint`` as the pipeline's ``refiner`` (the file's path: each worker loads
    it once and keeps it) and ``refiner_switch``; an unknown name is a 422, as a model switch's."""
    name = body.refiner_checkpoint
    if name in NO_REFINER:
        return {}
    checkpoint = catalog.find(name) if catalog is not None else None
    if checkpoint is None or checkpoint.path is None:  # (the bundled model is no refiner)
        files = [c.title for c in catalog.checkpoints if c.path is not None] if catalog else []
        raise BadInput(
            "refiner_checkpoint", f"{name!r} is not a known model; one of: "
            f"{', '.join(files) or 'none (no --checkpoint or --models-dir)'}",
        )  # fmt: skip
    switch = REFINER_SWITCH if body.refiner_switch_at is None else body.refiner_switch_at
    return {"refiner": str(checkpoint.path), "refiner_switch": switch}


def _overrides(settings: dict[str, Any], clip_skip: int | None, warnings: list[str]):
    """override_settings: CLIP skip is taken; the rest is listed as ignored."""
    settings = dict(settings)
    if CLIP_SKIP in settings:
        clip_skip = settings.pop(CLIP_SKIP)
    if settings:
        warnings.append(
            f"override_settings not supported per request, ignored: {', '.join(sorted(settings))}"
            " (sd_model_checkpoint: switch models with POST /sdapi/v1/options)"
        )
    return clip_skip


def _sampler(body) -> str | None:
    """Our sampler name from AUTOMATIC1111's label (or our name) and its ``scheduler``."""
    label = body.sampler_name or body.sampler_index
    if label is None:
        return None
    try:
        sampler_from_label(label)
    except ValueError:
        labels = [s.label for s in SAMPLERS.values()]
        raise BadInput(
            "sampler_name",
            f"{label!r} is unknown; choose from: {', '.join(labels)} (or: {', '.join(SAMPLERS)})",
        ) from None
    try:
        return sampler_from_label(label, body.scheduler)
    except ValueError as e:
        raise BadInput("scheduler", f"{body.scheduler!r} does not fit: {e}") from None


def _check_count(name: str, n_iter: int, batch_size: int) -> None:
    if n_iter < 1:
        raise BadInput(name, f"must be a positive integer, got {n_iter}")
    if batch_size >= 1 and n_iter * batch_size > LIMITS.images:
        raise BadInput(
            name,
            f"x batch_size asks for {n_iter * batch_size} images; at most {LIMITS.images}",
        )


def _images(body: Img2ImgRequest, warnings: list[str]) -> dict[str, Any]:
    """The starting image and mask, decoded and checked, and what they imply."""
    if not body.init_images:
        raise BadInput("init_images", "needs one base64 image (the picture to start from)")
    if len(body.init_images) > 1:
        warnings.append(f"init_images: only the first of {len(body.init_images)} is used")
    image = decode_image(body.init_images[0], "init_images[0]")
    fields: dict[str, Any] = dict(task="img2img", image=image, strength=body.denoising_strength)
    if body.mask is None:
        return fields
    mask = decode_image(body.mask, "mask", rgb=False)
    try:
        mask = to_mask(mask, size=image.size)
    except ValueError as e:
        raise BadInput("mask", f"does not fit: {e}") from None
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if body.inpainting_fill != 1:
        fill = FILLS.get(body.inpainting_fill, str(body.inpainting_fill))
        warnings.append(
            f"inpainting_fill={body.inpainting_fill} ({fill}) is not supported: the masked "
            "area starts from the original picture (1)"
        )
    if body.inpaint_full_res:
        warnings.append(
            "inpaint_full_res (only masked) is not supported: the whole picture is inpainted"
        )
    blur = 4.0 if body.mask_blur is None else body.mask_blur  # AUTOMATIC1111's default
    return {**fields, "task": "inpaint", "mask": mask, "mask_blur": blur}


def sampling_steps(request: GenerationRequest) -> int:
    """The step callbacks a resolved request makes (img2img runs the last part of the ladder:
    sd-samplers' ``sample`` docstring)."""
    if request.image is None or request.strength is None:
        return request.steps
    return steps_for_strength(request.steps, request.strength)


def run(job: Job, pipe, generation: Generation) -> Result:
    """The job: ``n_iter`` runs of the pipeline (image i of the whole job has seed + i, as
    AUTOMATIC1111 numbers them); interrupt stops after the current step and returns what is
    there, skip moves on to the next iteration."""
    request = generation.request
    job.preview_vae = pipe.vae
    if request.refiner is not None:  # loaded (once) before the first step, or a clear 422
        try:
            load_refiner(pipe, request.refiner)
        except (ValueError, OSError) as e:
            raise BadInput("refiner_checkpoint", f"does not load as a refiner: {e}") from None
    images, requests, parameters = [], [], []
    for k in range(generation.n_iter):
        if job.interrupted or job.gone.is_set():
            break
        job.skipped = False
        step = dataclasses.replace(request, seed=request.seed + k * request.count)
        try:
            resolved = step.resolve(pipe.defaults, pipe.native_size, pipe.scale)
        except RequestError as e:  # the model changed between the check and the run
            raise api_error(e) from None
        job.iteration, job.step, job.steps = k, 0, sampling_steps(resolved)
        job.size = (resolved.width, resolved.height)
        batch = pipe.run(resolved, callback=job.on_step, progress=False)
        images += batch
        requests.append(resolved)
        # what each picture carries (the run's LoRAs included), read back from it
        parameters += [GenerationParameters.from_text(im.info["parameters"]) for im in batch]
    return Result(
        images=images,
        requests=requests,
        parameters=parameters,
        model_name=pipe.name,
        model_hash=pipe.model_hash,
        interrupted=job.interrupted,
        inpainting_model=pipe.is_inpainting_model,
    )


def info(generation: Generation, result: Result) -> dict[str, Any]:
    """AUTOMATIC1111's ``info`` (``Processed.js()``): what each image was made with."""
    params = result.parameters
    first = result.requests[0] if result.requests else generation.request
    seeds = [p.seed for p in params]
    return {
        "prompt": first.prompts[0],
        "all_prompts": [p.prompt for p in params],
        "negative_prompt": first.negative_prompts[0],
        "all_negative_prompts": [p.negative_prompt for p in params],
        "seed": seeds[0] if seeds else first.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": sampler_label(first.sampler) if first.sampler else None,
        "cfg_scale": first.guidance_scale,
        "steps": first.steps,
        "batch_size": first.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.model_name,
        "sd_model_hash": result.model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.strength if first.image is not None else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [p.to_text() for p in params],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(result.started)),
        "clip_skip": first.clip_skip or 1,
        "is_using_inpainting_conditioning": first.mask is not None and result.inpainting_model,
        "version": f"sd-server {__version__}",
        "interrupted": result.interrupted,
        "warnings": generation.warnings,
    }
