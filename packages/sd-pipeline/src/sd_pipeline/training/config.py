"""The settings of a training run: :class:`TrainConfig`, read from a JSON recipe and flags.

A recipe holds any subset of the fields; the command line's flags win over it. Every value is
checked here, before any model is built: a wrong type, an unknown key or a model size that its
package refuses is one line naming the field and what would be right.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sd_pipeline.training.data import check_resolution

__all__ = ["TrainConfig", "TrainingError", "load_recipe"]


class TrainingError(ValueError):
    """A run that cannot start or continue as asked (bad settings, damaged state, divergence)."""


@dataclass
class TrainConfig:
    """Every setting of a run; a recipe JSON holds any subset of these fields."""

    mode: str = "finetune"  # finetune | scratch | lora
    data: str = ""
    out: str = "sd-train-out"
    checkpoint: str | None = None  # finetune and lora: the model to start from
    resolution: int = 512
    random_crop: bool = False
    random_flip: bool = False
    batch_size: int = 1  # per process and micro-step
    grad_accum: int = 1
    steps: int = 1000  # diffusion (text encoder + UNet) optimizer steps
    lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (after the warm-up)
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA
    ema_on_cpu: bool = False  # keep the EMA weights in CPU memory, not on the device
    fused_adam: bool = False  # torch's fused AdamW kernel (one kernel per step, same maths)
    fsdp: bool = False  # finetune: shard weights, gradients and optimizer state (FSDP2)
    # kohya's cache_latents: encode every image with the frozen VAE once (not with random_crop)
    cache_latents: bool = True
    # kohya's cache_text_encoder_outputs: encode every caption once (a frozen text encoder only)
    cache_text_encoder_outputs: bool = False
    # kohya's aspect-ratio bucketing: each image trains at the bucket (sides multiples of 64, about
    # resolution**2 pixels) nearest its aspect ratio; every batch is drawn from one bucket.
    enable_bucket: bool = False
    min_bucket_reso: int | None = None  # default resolution / 2
    max_bucket_reso: int | None = None  # default resolution * 2
    train_text_encoder: bool = False  # finetune and lora (its adapters); scratch always trains it
    # lora: adapters on the frozen checkpoint (kohya's network_dim, network_alpha); targets:
    # attention (the attention projections), transformer (kohya's default: every linear layer
    # of the transformers) or all (LoCon: the ResBlocks' convolutions too)
    network_dim: int = 4
    network_alpha: float = 1.0
    network_targets: str = "attention"
    train_unet: bool = True  # lora: adapt the UNet (off: the text encoder's adapters only)
    cond_dropout: float = 0.1  # chance of an empty caption, for classifier-free guidance
    prediction: str = "epsilon"  # epsilon | v
    schedule: dict = field(
        default_factory=lambda: {"beta_start": 0.00085, "beta_end": 0.012, "num_timesteps": 1000}
    )
    # scratch only: the VAE stage and the model sizes
    vae_steps: int = 1000
    vae_lr: float = 1e-4
    vae_batch_size: int | None = None
    kl_weight: float = 1e-6
    # scratch: after the diffusion stage, refine the VAE's decoder alone for this many steps.
    # The encoder stays frozen, so the latents the UNet learned stay valid (SD's ft-MSE VAE was
    # made the same way).
    decoder_steps: int = 0
    vae: dict = field(default_factory=dict)  # AutoencoderKLConfig fields
    text_encoder: dict = field(default_factory=dict)  # CLIPTextConfig fields
    unet: dict = field(default_factory=dict)  # UNetConfig fields
    shapes: dict | None = None  # generate the data folder with training.shapes if missing
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0  # 0: never
    sample_prompts: list = field(default_factory=lambda: ["a photo of a cat"])
    sample_steps: int = 20
    sample_guidance: float = 5.0
    log_every: int = 10
    progress: bool = True
    device: str = "cpu"
    defaults: dict = field(default_factory=dict)  # generation defaults stored with the model

    def validate(self) -> None:
        """Raise a :class:`TrainingError` naming the first setting that is not usable."""
        for name in ("data", "out", "checkpoint"):  # paths may come as Path objects
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_types(dataclasses.asdict(self), "settings")
        self._check_choices()
        self._check_ranges()
        if self.mode == "scratch":
            model_configs(self)
        schedule_arguments(self.schedule)
        if self.shapes is not None:
            shapes_config(self.shapes)

    def _check_choices(self) -> None:
        for name, options in (
            ("mode", ("finetune", "scratch", "lora")),
            ("network_targets", ("attention", "transformer", "all")),
            ("lr_schedule", ("constant", "cosine", "linear")),
            ("mixed_precision", ("no", "bf16", "fp16")),
            ("prediction", ("epsilon", "v")),
        ):
            if getattr(self, name) not in options:
                raise TrainingError(
                    f"{name} {getattr(self, name)!r} is not valid; choose from: "
                    + ", ".join(options)
                )
        if not self.data:
            raise TrainingError("no training data: pass --data FOLDER (or 'data' in the recipe)")
        if self.mode in ("finetune", "lora") and not self.checkpoint:
            raise TrainingError(f"{self.mode} needs --checkpoint (the model to fine-tune)")
        if self.mode == "lora" and not (self.train_unet or self.train_text_encoder):
            raise TrainingError("a LoRA of nothing: keep the UNet's (drop --no-train-unet) or "
                                "add --train-text-encoder")  # fmt: skip
        if self.decoder_steps and self.mode != "scratch":
            raise TrainingError("decoder_steps refines a VAE trained by `sd-train scratch` only")
        if self.fsdp and self.mode != "finetune":
            raise TrainingError(
                f"fsdp shards the fine-tuning of a whole checkpoint (sd-train finetune); a "
                f"{self.mode} run's trained weights are small enough for the default data "
                "parallelism (DDP): drop --fsdp"
            )
        frozen_text = self.mode in ("finetune", "lora") and not self.train_text_encoder
        if self.cache_text_encoder_outputs and not frozen_text:
            raise TrainingError(
                "cache_text_encoder_outputs needs a frozen text encoder: finetune or lora "
                "without --train-text-encoder"
            )

    def _check_ranges(self) -> None:
        check_resolution(self.resolution)
        for name in ("batch_size", "grad_accum", "checkpoint_every", "log_every", "sample_steps",
                     "network_dim"):  # fmt: skip
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.vae_batch_size is not None and self.vae_batch_size < 1:
            raise TrainingError(f"vae_batch_size must be at least 1, got {self.vae_batch_size}")
        for name in ("steps", "vae_steps", "decoder_steps", "warmup_steps", "sample_every"):
            if getattr(self, name) < 0:
                raise TrainingError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("lr", "vae_lr", "network_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise TrainingError(f"{name} must be a positive number, got {value}")
        for name in ("weight_decay", "max_grad_norm", "kl_weight", "sample_guidance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise TrainingError(f"{name} must be a finite number >= 0, got {value}")
        if self.enable_bucket:
            check_resolution(self.resolution, 64)
            low = self.min_bucket_reso or self.resolution // 2
            high = self.max_bucket_reso or self.resolution * 2
            if low % 64 or high % 64 or not 64 <= low <= self.resolution <= high:
                raise TrainingError(
                    f"bucket sides must be multiples of 64 with min_bucket_reso <= resolution <= "
                    f"max_bucket_reso, got {low} <= {self.resolution} <= {high}"
                )
        if not 0 <= self.cond_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise TrainingError("cond_dropout and ema_decay must be in [0, 1)")


# ---------------------------------------------------------------------------- types


def _expected(hint) -> tuple[tuple[type, ...], str]:
    """The accepted Python types of a field's annotation, and how to say them."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds, words = (), []
        for arg in typing.get_args(hint):
            k, w = _expected(arg)
            kinds, words = kinds + k, [*words, w]
        return kinds, " or ".join(words)
    base = typing.get_origin(hint) or hint
    return {
        int: ((int,), "an integer"),
        float: ((int, float), "a number"),
        bool: ((bool,), "true or false"),
        str: ((str,), "a string"),
        dict: ((dict,), "a JSON object"),
        list: ((list,), "a list of strings"),
        type(None): ((type(None),), "null"),
    }[base]


def _json_name(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a JSON object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def check_types(values: dict, source: str) -> None:
    """Each value of ``values`` (TrainConfig fields) has its field's type, else TrainingError."""
    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():
        kinds, words = _expected(hints[name])
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if ok and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise TrainingError(
                f"{source}: {name!r} is {_json_name(value)} ({value!r}); expected {words}"
            )


def _fits(value, hint) -> bool:
    """Whether a JSON value suits a model config field's annotation (unknown kinds pass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint in (int, float, bool, str):
        kinds = (int, float) if hint is float else (hint,)
        return isinstance(value, kinds) and (hint is bool or not isinstance(value, bool))
    return True


def _build(cls, values: dict, name: str):
    """``cls(**values)`` for a recipe's sub-object, with its mistakes said as one line."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TrainingError(f"{name}: unknown fields {unknown}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _fits(value, hints[key]):
            want = getattr(hints[key], "__name__", None) or str(hints[key])
            raise TrainingError(f"{name}.{key} is {_json_name(value)} ({value!r}); expected {want}")
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise TrainingError(f"{name}: {e}") from None


def model_configs(config: TrainConfig) -> dict:
    """The three model configs of a scratch recipe, checked against each other."""
    from sd_clip import CLIPTextConfig
    from sd_unet import UNetConfig
    from sd_vae import AutoencoderKLConfig

    vae = _build(AutoencoderKLConfig, config.vae, "vae")
    text = _build(CLIPTextConfig, config.text_encoder, "text_encoder")
    unet = _build(UNetConfig, config.unet, "unet")
    if unet.context_dim != text.width:
        raise TrainingError(
            f"unet.context_dim ({unet.context_dim}) must equal text_encoder.width ({text.width})"
        )
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        raise TrainingError(
            f"unet.in_channels and out_channels ({unet.in_channels}, {unet.out_channels}) must "
            f"equal vae.latent_channels ({vae.latent_channels})"
        )
    return {"vae": vae, "text_encoder": text, "unet": unet}


SCHEDULE_KEYS = ("beta_start", "beta_end", "num_timesteps")


def schedule_arguments(schedule: dict) -> dict:
    """The ``schedule`` object checked: the arguments of ``NoiseSchedule.scaled_linear``."""
    unknown = sorted(set(schedule) - set(SCHEDULE_KEYS))
    if unknown:
        raise TrainingError(f"schedule: unknown keys {unknown}; known: {', '.join(SCHEDULE_KEYS)}")
    for key, value in schedule.items():
        kind = int if key == "num_timesteps" else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise TrainingError(f"schedule.{key} must be a positive number, got {value!r}")
    return schedule


def shapes_config(spec: dict):
    """The ``shapes`` object checked: ShapesConfig fields plus ``count`` and ``seed``."""
    from sd_pipeline.training.shapes import ShapesConfig

    spec = dict(spec)
    for key in ("count", "seed"):
        value = spec.pop(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrainingError(f"shapes.{key} must be a non-negative integer, got {value!r}")
    return _build(ShapesConfig, spec, "shapes")


def load_recipe(path: str | os.PathLike) -> dict:
    """The settings of a JSON recipe, each checked for its field's type."""
    path = Path(path)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: cannot read the recipe ({e})") from None
    except json.JSONDecodeError as e:
        raise TrainingError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(recipe, dict):
        raise TrainingError(
            f"{path}: a recipe is a JSON object of settings, got {_json_name(recipe)}"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(recipe) - known - {"comment", "_comment"})
    if unknown:
        raise TrainingError(
            f"{path}: unknown recipe keys {unknown}; known: {', '.join(sorted(known))}"
        )
    recipe = {k: v for k, v in recipe.items() if k in known}
    check_types(recipe, str(path))
    return recipe
