"""Where a pipeline's parts and settings come from: checkpoint files, diffusers folders, the
bundled model, or random weights."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch

import sd_clip
import sd_unet
import sd_vae
from sd_clip import CLIPTextModel, CLIPTokenizer
from sd_pipeline.request import LIMITS
from sd_pipeline.sdxl_loading import sdxl_parts, sdxl_tokenizer_options
from sd_pipeline.single_file import pipeline_settings
from sd_samplers import NoiseSchedule
from sd_unet import UNet
from sd_vae import AutoencoderKL

__all__ = ["CheckpointError", "bundled_checkpoint", "random_parts", "resolve_dtype"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# What txt2img/img2img/inpaint use when these are not given: AUTOMATIC1111's defaults, unless
# the model file names others (the bundled model does; see single_file.PIPELINE_METADATA).
GENERATION_DEFAULTS = {"steps": 20, "guidance_scale": 7.5, "sampler": "euler_a"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unreadable, or not a Stable Diffusion model.
    The one error to catch around ``StableDiffusion.from_checkpoint``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


# Errors the component loaders raise for a bad file; from_checkpoint re-raises them as one type.
COMPONENT_ERRORS = (sd_vae.CheckpointError, sd_clip.CheckpointError, sd_unet.CheckpointError)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name (``float16``, ``fp16``, ``bf16``, ...)."""
    if dtype is None:
        return None
    resolved = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unknown dtype {dtype!r}; choose from: float32, float16, bfloat16")
    return resolved


def existing(path, what: str) -> Path:
    """``path`` as a Path, or CheckpointNotFoundError naming ``what`` it should have been."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such {what} file or folder")
    return path


def bundled_checkpoint() -> Path | None:
    """The bundled model's weight file (or diffusers folder) under ``sd_pipeline/weights/``."""
    if not WEIGHTS_DIR.is_dir():
        return None
    if (WEIGHTS_DIR / "unet").is_dir():
        return WEIGHTS_DIR
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    full = [f for f in files if not f.stem.startswith(("vae", "text", "unet"))]
    return (full or files or [None])[0]


def random_parts(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Each part at its package's ``tiny()`` size, random weights (the UNet's context is the
    text encoder's width)."""
    from sd_clip import CLIPTextConfig
    from sd_unet import UNetConfig
    from sd_vae import AutoencoderKLConfig

    text_config = CLIPTextConfig.tiny()
    unet_config = dataclasses.replace(UNetConfig.tiny(), context_dim=text_config.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dict(
            vae=AutoencoderKL(AutoencoderKLConfig.tiny()).eval(),
            text_encoder=CLIPTextModel(text_config).eval(),
            unet=UNet(unet_config).eval(),
        )


def settings_options(path: Path, vae: AutoencoderKL) -> dict:
    """Pipeline options stored beside the weights: a diffusers root's tokenizer, scheduler and
    sample size, or a single file's sd-pipeline settings."""
    if path.is_dir():
        return diffusers_root_options(path, vae)
    return file_options(path)


def diffusers_root_options(root: Path, vae: AutoencoderKL) -> dict:
    """Tokenizer, schedule, prediction type and native size from a diffusers model root."""
    options: dict = {}
    tokenizer = root / "tokenizer"
    classic = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    if classic or (tokenizer / "tokenizer.json").is_file():  # (transformers 5 writes only that)
        options["tokenizer"] = CLIPTokenizer.from_folder(tokenizer)
    options.update(sdxl_tokenizer_options(root))
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        config = _json_object(scheduler)
        options["schedule"] = _diffusers_schedule(config, scheduler)
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise CheckpointError(
                f"{scheduler}: prediction_type {prediction!r} is not supported; "
                "expected 'epsilon' or 'v_prediction'"
            )
        options["prediction"] = "v" if prediction == "v_prediction" else prediction
    unet_config = root / "unet" / "config.json"
    if unet_config.is_file():
        sample_size = _json_object(unet_config).get("sample_size")
        if sample_size is not None:
            options["native_size"] = _native_size(
                sample_size, vae.config.downscale, f"{unet_config}: sample_size"
            )
    return options


def _diffusers_schedule(config: dict, source: Path) -> NoiseSchedule:
    kind = config.get("beta_schedule", "scaled_linear")
    start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    steps = config.get("num_train_timesteps", 1000)
    for name, value in (("beta_start", start), ("beta_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise CheckpointError(f"{source}: {name} must be a number in (0, 1), got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 < steps <= 100_000:
        raise CheckpointError(
            f"{source}: num_train_timesteps must be an integer in [2, 100000], got {steps!r}"
        )
    if kind == "scaled_linear":
        return NoiseSchedule.scaled_linear(start, end, steps)
    if kind == "linear":
        return NoiseSchedule.linear(start, end, steps)
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(steps)
    raise CheckpointError(
        f"{source}: unsupported beta_schedule {kind!r}; "
        "expected scaled_linear, linear or squaredcos_cap_v2"
    )


def file_options(path: Path) -> dict:
    """Native size, prediction type, schedule and generation defaults that sd-pipeline's
    training stores in a single file's metadata (see single_file.save)."""
    try:
        config = pipeline_settings(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    options: dict = {}
    defaults = {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}
    if defaults:
        options["defaults"] = defaults
    if config.get("resolution") is not None:
        options["native_size"] = _native_size(config["resolution"], 1, f"{path}: resolution")
    if config.get("prediction") in ("epsilon", "v"):
        options["prediction"] = config["prediction"]
    schedule = config.get("schedule")
    if isinstance(schedule, dict):
        options["schedule"] = NoiseSchedule.scaled_linear(
            schedule.get("beta_start", 0.00085),
            schedule.get("beta_end", 0.012),
            schedule.get("num_timesteps", 1000),
        )
    return options


def _native_size(value, scale: int, what: str) -> int:
    """A model's native image side in pixels (``value`` in units of ``scale`` pixels), refused
    when it is not a positive integer or beyond the pipeline's size limit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{what} must be a positive integer, got {value!r}")
    if value * scale > LIMITS.side:
        raise CheckpointError(
            f"{what} is {value} ({value * scale} px), beyond the {LIMITS.side} px limit; "
            "is the config damaged?"
        )
    return value * scale


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def checkpoint_keys(source) -> list[str]:
    """The tensor names of a single file (lazily for safetensors) or of a read state dict; []
    for a diffusers folder."""
    if isinstance(source, Mapping):
        return list(source)
    if source.is_dir():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt") as f:
            return list(f.keys())
    except Exception:  # the component loaders report what is wrong with the file
        return []


def family_options(keys: list[str]) -> dict:
    """What the model family implies beyond the weights: SD 2.x's OpenCLIP tokenizer pads with
    ``!`` (id 0), not the end token (SDXL's tokenizers: see ``sd_pipeline.sdxl``)."""
    from sd_clip.weights import find_text_encoder

    if any(k.startswith("conditioner.embedders.") for k in keys):
        return {}
    found = find_text_encoder(keys) if keys else None
    if found is not None and found[1] == "openclip":
        return {"tokenizer": CLIPTokenizer(pad_id=0)}
    return {}


def load_parts(path: Path, vae_path: Path | None, dtype: torch.dtype | None):
    """The three parts from a checkpoint (and a separate VAE), on the CPU, and the file's
    tensor names; component errors come out as CheckpointError. A safetensors file is handed
    to each part's loader, which reads only its own tensors; a pickle (``.ckpt``) is read
    once, safely, and its tensors shared by the three."""
    load = {"device": "cpu", "dtype": dtype or torch.float32}
    try:
        source = path
        if path.is_file() and path.suffix != ".safetensors":
            source = sd_unet.load_state_dict(path)
        keys = checkpoint_keys(source)
        family = family_options(keys)
        vae_source = source if vae_path is None else vae_path
        unet = UNet.from_checkpoint(source, **load)
        encoders, vae_options, more = sdxl_parts(source, vae_source, unet, load)
        family.update(more)
        parts = dict(
            unet=unet,
            **encoders,
            vae=AutoencoderKL.from_checkpoint(vae_source, **load, **vae_options),
        )
    except COMPONENT_ERRORS as e:
        raise CheckpointError(str(e)) from e
    for part in parts.values():  # loaded for inference: frozen, as the loaders leave them in eval
        part.requires_grad_(False)
    return parts, family
