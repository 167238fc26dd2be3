"""The stages of a run, each a frozen record of what it builds, trains and optimises.

``finetune``: one ``diffusion`` stage on a checkpoint's models. ``lora``: one ``lora`` stage
that trains LoRA adapters (sd-lora) on the checkpoint's frozen UNet and/or text encoder.
``scratch``: the latent diffusion recipe, ``vae`` (reconstruction), then ``diffusion`` on the
frozen VAE's latents, then optionally ``decoder`` (the VAE's decoder alone). The trainer reads
everything stage-specific from the record; nothing branches on a stage's name.

The randomness of a step (which images, crops, flips, noise, timesteps, caption dropout) is
drawn from generators seeded by (seed, stage, step, sample): a resumed run, or a data-parallel
one, computes exactly the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sd_pipeline.training import losses
from sd_pipeline.training.config import TrainConfig, model_configs

__all__ = ["Stage", "batch_indices", "build_models", "lr_factor", "plan", "sample_generator"]

# Where a part's starting weights come from.
CHECKPOINT = "checkpoint"  # the finetune checkpoint
FRESH = "fresh"  # a new model at the recipe's size, seeded
VAE_STAGE = "vae-stage"  # OUT/vae/model.safetensors, the VAE stage's result
ADAPTER = "adapter"  # LoRA adapters injected into the parts the stage adapts (sd_lora.training)


@dataclass(frozen=True)
class Stage:
    """One stage: its folder name, its models and their sources, what it trains and how."""

    name: str
    seed_id: int  # part of every generator's seed, so that stages draw different numbers
    sources: Mapping[str, str]  # part ("vae", "text_encoder", "unet") -> CHECKPOINT/FRESH/...
    trains: tuple[str, ...]  # the parts whose weights it optimises
    loss: Callable  # loss(trainer, indices, generators) -> scalar tensor
    steps: int
    batch_size: int
    lr: float
    settings: tuple[str, ...] = ("lr", "batch_size")  # the TrainConfig fields of lr and batch
    frozen: tuple[str, ...] = ()  # submodules of trained parts kept fixed ("encoder", ...)
    rescales_latents: bool = False  # afterwards, scale its VAE's latents to unit variance
    on_latents: bool = False  # trains on a frozen VAE's latents (cached when it can be)
    adapts: tuple[str, ...] = ()  # frozen parts that carry the trained adapter (its file: kohya)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.sources)

    @property
    def standalone(self) -> bool:
        """Whether its model file is a standalone VAE file rather than an SD single file."""
        return self.parts == ("vae",)


VAE_SETTINGS = ("vae_lr", "vae_batch_size")


def plan(config: TrainConfig) -> list[Stage]:
    """The stages ``config`` runs, in order."""
    c = config
    vae_batch = c.vae_batch_size or c.batch_size
    sources = dict.fromkeys(("vae", "text_encoder", "unet"), CHECKPOINT)
    if c.mode == "finetune":
        trains = ("text_encoder", "unet") if c.train_text_encoder else ("unet",)
        return [_diffusion(c, sources, trains)]
    if c.mode == "lora":
        adapts = ("text_encoder",) * c.train_text_encoder + ("unet",) * c.train_unet
        return [Stage("lora", 4, {**sources, "lora": ADAPTER}, ("lora",), losses.diffusion,
                      c.steps, c.batch_size, c.lr, on_latents=True, adapts=adapts)]  # fmt: skip
    stages = [
        Stage("vae", 1, {"vae": FRESH}, ("vae",), losses.reconstruction, c.vae_steps,
              vae_batch, c.vae_lr, VAE_SETTINGS, rescales_latents=True),
        _diffusion(c, {"vae": VAE_STAGE, "text_encoder": FRESH, "unet": FRESH},
                   ("text_encoder", "unet")),
    ]  # fmt: skip
    if c.decoder_steps:
        stages.append(
            Stage("decoder", 3, {"vae": VAE_STAGE}, ("vae",), losses.reconstruction,
                  c.decoder_steps, vae_batch, c.vae_lr, VAE_SETTINGS,
                  frozen=("encoder", "quant_conv"))
        )  # fmt: skip
    return stages


def _diffusion(c: TrainConfig, sources: dict, trains: tuple[str, ...]) -> Stage:
    return Stage("diffusion", 2, sources, trains, losses.diffusion, c.steps, c.batch_size, c.lr,
                 on_latents=True)  # fmt: skip


def build_models(config: TrainConfig, stage: Stage) -> dict[str, nn.Module]:
    """The stage's models, from their sources, in float32 (the master weights: autocast does
    any half precision, so a float16 checkpoint trains as well as a float32 one)."""
    from sd_clip import CLIPTextModel
    from sd_unet import UNet
    from sd_vae import AutoencoderKL

    classes = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "unet": UNet}
    configs = model_configs(config) if FRESH in stage.sources.values() else {}
    models = {}
    for part, source in stage.sources.items():
        if source == CHECKPOINT:
            models[part] = classes[part].from_checkpoint(config.checkpoint, dtype=torch.float32)
        elif source == ADAPTER:
            models[part] = _adapter(config, stage, models)
        elif source == VAE_STAGE:
            path = Path(config.out) / "vae" / "model.safetensors"
            models[part] = classes[part].from_checkpoint(path, dtype=torch.float32)
        else:
            # The seeds of the initial weights: the VAE's, then the text encoder's and UNet's.
            if part in ("vae", "text_encoder"):
                torch.manual_seed(config.seed + (part != "vae"))
            models[part] = classes[part](configs[part])
    return models


def _adapter(config: TrainConfig, stage: Stage, models: dict[str, nn.Module]) -> nn.Module:
    """One LoRA network over the parts the stage adapts, its initial weights seeded."""
    from sd_lora.training import inject

    g = torch.Generator().manual_seed(config.seed * 7919 + stage.seed_id)
    network = None
    for part in stage.adapts:
        network = inject(models[part], config.network_dim, config.network_alpha,
                         config.network_targets, network=network, generator=g)  # fmt: skip
    return network


def sample_generator(seed: int, stage: Stage, step: int, index: int) -> torch.Generator:
    """The generator for one training sample of one step: a pure function of its position."""
    g = torch.Generator()
    g.manual_seed(((seed * 7919 + stage.seed_id) * 1_000_003 + step) * 65_536 + index)
    return g


def epoch_order(seed: int, stage: Stage, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=sample_generator(seed, stage, epoch, 65_535))


def bucket_batches(
    seed: int, stage: Stage, epoch: int, groups: list[list[int]], size: int
) -> list[list[int]]:
    """One epoch's batches under aspect-ratio bucketing: each bucket's images shuffled and cut
    into batches of ``size`` (a short last batch topped up from the same bucket's start), then
    the batches shuffled. Every batch holds images of one size; each epoch has as many."""
    g = sample_generator(seed, stage, epoch, 65_534)
    batches = []
    for members in groups:
        order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            while len(chunk) < size:
                chunk += order[: size - len(chunk)]
            batches.append(chunk)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batch_indices(
    seed: int,
    stage: Stage,
    step: int,
    global_batch: int,
    n: int,
    groups: list[list[int]] | None = None,
) -> list[int]:
    """Dataset indices of one optimizer step: the step's slice of the shuffled epochs (with
    ``groups``, the indices of each bucket: the step's batch of :func:`bucket_batches`)."""
    if groups is not None:
        per_epoch = sum(-(-len(m) // global_batch) for m in groups)
        epoch, k = divmod(step, per_epoch)
        return bucket_batches(seed, stage, epoch, groups, global_batch)[k]
    out, start = [], step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(seed, stage, epoch, n)
        out += order[offset : offset + global_batch - len(out)].tolist()
    return out


def lr_factor(step: int, config: TrainConfig, total: int) -> float:
    """Learning-rate multiplier at an optimizer step: warm-up, then the chosen schedule."""
    warm = config.warmup_steps
    if step < warm:
        return (step + 1) / warm
    if config.lr_schedule == "constant" or total <= warm:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if config.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress
