"""Training: fine-tune a Stable Diffusion checkpoint, or train a small one from scratch.

``sd-train finetune``: the UNet (optionally the text encoder) of a checkpoint, on a folder of
captioned images (see :mod:`sd_pipeline.data`), with the noise-prediction loss (v-prediction
with ``--prediction v``).

``sd-train scratch``: the latent-diffusion recipe at a small size: first the VAE
(reconstruction L1 + MSE, plus a KL term), then, on the frozen VAE's latents, the text encoder
and the UNet together.

Both: AdamW, linear warm-up then a constant/cosine/linear schedule, gradient accumulation,
autocast mixed precision (bf16, or fp16 with loss scaling), gradient checkpointing, EMA, sample
grids every N steps, a progress bar, a JSON-lines log, and checkpoints every N steps:

    OUT/<stage>/model.safetensors   the weights (EMA when enabled) in the SD single-file layout
    OUT/<stage>/state.safetensors   raw weights, optimizer, EMA, step, RNG states and settings
    OUT/<stage>/log.jsonl           one line per logged step
    OUT/<stage>/samples/            sample grids
    OUT/model.safetensors           the finished model (``StableDiffusion.from_checkpoint``)

Each file is written atomically. ``--resume`` continues from the last state; the randomness of
each step (which images, crops, flips, noise, timesteps, caption dropout) is drawn from a
generator seeded by (seed, stage, step, sample), so a resumed run, or a data-parallel one under
``torchrun --nproc_per_node N``, computes exactly the same steps.

Options can come from a JSON recipe (``--recipe``); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from sd_pipeline.data import DataError, ImageFolder, check_resolution

log = logging.getLogger("sd_pipeline.train")

SD_PREFIXES = {
    "vae": "first_stage_model.",
    "text": "cond_stage_model.transformer.",
    "unet": "model.diffusion_model.",
}
PIPELINE_METADATA = "sd_pipeline.config"
CONFIG_METADATA = {"vae": "sd_vae.config", "text": "sd_clip.config", "unet": "sd_unet.config"}


# ---------------------------------------------------------------------------- settings


@dataclass
class TrainConfig:
    """Every setting of a run; a recipe JSON holds any subset of these fields."""

    mode: str = "finetune"  # finetune | scratch
    data: str = ""
    out: str = "sd-train-out"
    checkpoint: str | None = None  # finetune: the model to start from
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
    train_text_encoder: bool = False  # finetune only; scratch always trains it
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
    shapes: dict | None = None  # generate the data folder with sd_pipeline.shapes if missing
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
        def choose(name, options):
            if getattr(self, name) not in options:
                raise ValueError(
                    f"{name} {getattr(self, name)!r} is not valid; choose from: "
                    + ", ".join(options)
                )

        choose("mode", ("finetune", "scratch"))
        choose("lr_schedule", ("constant", "cosine", "linear"))
        choose("mixed_precision", ("no", "bf16", "fp16"))
        choose("prediction", ("epsilon", "v"))
        check_resolution(self.resolution)
        if not self.data:
            raise ValueError("no training data: pass --data FOLDER (or 'data' in the recipe)")
        if self.mode == "finetune" and not self.checkpoint:
            raise ValueError("finetune needs --checkpoint (the model to fine-tune)")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.vae_steps < 0 or self.decoder_steps < 0:
            raise ValueError("steps, vae_steps and decoder_steps must not be negative")
        if self.decoder_steps and self.mode != "scratch":
            raise ValueError("decoder_steps refines a VAE trained by `sd-train scratch` only")
        if not 0 <= self.cond_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("cond_dropout and ema_decay must be in [0, 1)")


def load_recipe(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such recipe file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(recipe) - known - {"comment", "_comment"})
    if unknown:
        raise ValueError(
            f"{path}: unknown recipe keys {unknown}; known: {', '.join(sorted(known))}"
        )
    recipe = {k: v for k, v in recipe.items() if k in known}
    # Relative paths in a recipe are relative to where sd-train runs, except none are guessed.
    return recipe


# ---------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(td.get_rank(), td.get_world_size())


def all_average_(grads: list[torch.Tensor], dist: Dist) -> None:
    """Average gradients over the processes (one flat all-reduce)."""
    if dist.world == 1 or not grads:
        return
    import torch.distributed as td

    flat = torch.cat([g.reshape(-1) for g in grads])
    td.all_reduce(flat)
    flat /= dist.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


# ---------------------------------------------------------------------------- helpers


def sample_generator(seed: int, stage: str, step: int, index: int) -> torch.Generator:
    """The generator for one training sample of one step: a pure function of its position."""
    stage_id = {"vae": 1, "diffusion": 2, "decoder": 3}[stage]
    g = torch.Generator()
    g.manual_seed(((seed * 7919 + stage_id) * 1_000_003 + step) * 65_536 + index)
    return g


def epoch_order(seed: int, stage: str, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=sample_generator(seed, stage, epoch, 65_535))


def batch_indices(seed: int, stage: str, step: int, global_batch: int, n: int) -> list[int]:
    """Dataset indices of one optimizer step: the step's slice of the shuffled epochs."""
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


def enable_block_checkpointing(model: nn.Module) -> None:
    """Recompute the activations of each block of the model's ModuleLists during backward."""
    from torch.utils.checkpoint import checkpoint

    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
        return
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            if getattr(block, "_checkpointed", False):
                continue
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            block.forward = forward
            block._checkpointed = True


class EMA:
    """Exponential moving average of parameters (float32), with the usual warm-up."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - d)


def autocast(config: TrainConfig):
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
    return torch.autocast(torch.device(config.device).type, dtype=dtype)


def _json_config(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------- models


def build_models(config: TrainConfig, stage: str) -> dict[str, nn.Module]:
    """Fresh models at the recipe's sizes (scratch) or the checkpoint's models (finetune)."""
    from sd_clip import CLIPTextConfig, CLIPTextModel
    from sd_unet import UNet, UNetConfig
    from sd_vae import AutoencoderKL, AutoencoderKLConfig

    if config.mode == "finetune":
        path = config.checkpoint
        return {
            "vae": AutoencoderKL.from_checkpoint(path),
            "text": CLIPTextModel.from_checkpoint(path),
            "unet": UNet.from_checkpoint(path),
        }
    if stage == "decoder":  # the VAE stage's result, to refine
        return {
            "vae": AutoencoderKL.from_checkpoint(Path(config.out) / "vae" / "model.safetensors")
        }
    torch.manual_seed(config.seed)  # the initial weights
    vae = AutoencoderKL(AutoencoderKLConfig(**config.vae))
    if stage == "vae":
        return {"vae": vae}
    torch.manual_seed(config.seed + 1)
    text = CLIPTextModel(CLIPTextConfig(**config.text_encoder))
    unet = UNet(UNetConfig(**config.unet))
    return {"vae": vae, "text": text, "unet": unet}


def sd_state_dict(models: dict[str, nn.Module], overrides: dict | None = None,
                  prefixed: bool = True) -> dict:  # fmt: skip
    """The models' tensors, under the SD single-file prefixes unless ``prefixed`` is False
    (one model: a standalone file); ``overrides`` replace tensors by (model, key)."""
    out = {}
    for name, model in models.items():
        prefix = SD_PREFIXES[name] if prefixed else ""
        for k, v in model.state_dict().items():
            v = (overrides or {}).get((name, k), v)
            out[prefix + k] = v.detach().cpu().float().contiguous()
    return out


def model_metadata(models: dict[str, nn.Module], config: TrainConfig) -> dict[str, str]:
    meta = {"format": "pt"}
    for name, model in models.items():
        meta[CONFIG_METADATA[name]] = _json_config(model.config)
    pipeline = {
        "prediction": config.prediction,
        "schedule": config.schedule,
        "resolution": config.resolution,
        **config.defaults,
    }
    meta[PIPELINE_METADATA] = json.dumps(pipeline)
    return meta


def save_file_atomic(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from sd_vae._checkpoint import save_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, metadata)


# ---------------------------------------------------------------------------- the trainer


# Stages that train the VAE alone: all of it, or (after the diffusion stage) its decoder.
VAE_STAGES = ("vae", "decoder")


class Trainer:
    """One stage of training ('vae', 'diffusion' or 'decoder') over an in-memory image folder."""

    def __init__(
        self, config: TrainConfig, stage: str, data: ImageFolder, dist: Dist, resume: bool
    ):
        self.config, self.stage, self.data, self.dist = config, stage, data, dist
        self.resume = resume
        self.dir = Path(config.out) / stage
        self.device = torch.device(config.device)
        self.models = build_models(config, stage)
        for m in self.models.values():
            m.to(self.device)
        self.trainable = self._trainable_modules()
        for name, m in self.models.items():
            m.requires_grad_(name in self.trainable)
            m.train(name in self.trainable)
            if config.gradient_checkpointing and name in self.trainable:
                enable_block_checkpointing(m)
        if stage == "decoder":
            self.models["vae"].encoder.requires_grad_(False)
            self.models["vae"].quant_conv.requires_grad_(False)
        self.params = {
            f"{name}.{k}": p
            for name in self.trainable
            for k, p in self.models[name].named_parameters()
            if p.requires_grad
        }
        lr = config.vae_lr if stage in VAE_STAGES else config.lr
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=lr, weight_decay=config.weight_decay
        )
        self.base_lr = lr
        self.batch_size = (stage in VAE_STAGES and config.vae_batch_size) or config.batch_size
        self.total = {"vae": config.vae_steps, "decoder": config.decoder_steps}.get(
            stage, config.steps
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.mixed_precision == "fp16"
        )
        self.ema = EMA(self.params, config.ema_decay) if config.ema_decay > 0 else None
        self.step = 0
        self.latents = None
        if stage == "diffusion":
            self._setup_diffusion()

    # -- setup

    def _trainable_modules(self) -> list[str]:
        if self.stage in VAE_STAGES:
            return ["vae"]
        if self.config.mode == "scratch" or self.config.train_text_encoder:
            return ["text", "unet"]
        return ["unet"]

    def _setup_diffusion(self) -> None:
        from sd_clip.tokenizer import CLIPTokenizer
        from sd_samplers import NoiseSchedule

        c = self.config
        self.tokenizer = CLIPTokenizer(max_length=self.models["text"].config.max_positions)
        self.schedule = NoiseSchedule.scaled_linear(**c.schedule)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device)
        if c.mode == "scratch":
            vae_file = Path(c.out) / "vae" / "model.safetensors"
            from sd_vae import AutoencoderKL

            self.models["vae"] = AutoencoderKL.from_checkpoint(vae_file).to(self.device)
        vae = self.models["vae"].requires_grad_(False).eval()
        f = vae.config.downscale
        if c.resolution % f:
            raise DataError(f"resolution {c.resolution} is not a multiple of the VAE's {f}")
        if not c.random_crop:
            self.latents = self._cache_latents()

    @torch.no_grad()
    def _cache_latents(self) -> dict[bool, torch.Tensor]:
        """The frozen VAE's posterior (mean, std) for every image, and its mirror image."""
        vae, out = self.models["vae"], {}
        for flipped in (False, True) if self.config.random_flip else (False,):
            moments = []
            for i in range(0, len(self.data), 64):
                images, _ = self.data.batch(list(range(i, min(i + 64, len(self.data)))))
                if flipped:
                    images = images.flip(-1)
                post = vae.encode(images.to(self.device))
                moments.append(torch.stack([post.mean, post.std], 1))
            out[flipped] = torch.cat(moments)
        return out

    # -- one sample's randomness

    def _images(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        out = []
        for i, g in zip(indices, generators):
            images, _ = self.data.batch([i], g)
            out.append(images)
        return torch.cat(out).to(self.device)

    # -- losses

    def vae_loss(self, indices, generators) -> torch.Tensor:
        vae = self.models["vae"]
        images = self._images(indices, generators)
        with autocast(self.config):
            post = vae.encode(images)
            noise = torch.cat(
                [torch.randn(post.mean.shape[1:], generator=g)[None] for g in generators]
            )
            z = post.mean + post.std * noise.to(self.device)
            recon = vae.decode(z)
        recon = recon.float()
        rec = (recon - images).abs().mean() + F.mse_loss(recon, images)
        # KL(q || N(0, 1)) per image, summed over latent elements, per image pixel (LDM's
        # weighting: both terms are sums over the image in the original, weight 1e-6).
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1 - post.logvar.float())
        kl = kl.flatten(1).sum(1).mean() / images[0].numel()
        return rec + self.config.kl_weight * kl

    def diffusion_loss(self, indices, generators) -> torch.Tensor:
        c = self.config
        vae = self.models["vae"]
        flips, eps, ts, drop, post_noise = [], [], [], [], []
        shape = None
        if self.latents is not None:
            shape = self.latents[False].shape[2:]
        else:
            images = self._images(indices, generators)
            with torch.no_grad():
                post = vae.encode(images)
            shape = post.mean.shape[1:]
        for g in generators:
            flips.append(bool(c.random_flip and torch.rand((), generator=g) < 0.5))
            post_noise.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            ts.append(int(torch.randint(self.schedule.num_timesteps, (), generator=g)))
            drop.append(bool(torch.rand((), generator=g) < c.cond_dropout))
        post_noise = torch.stack(post_noise).to(self.device)
        if self.latents is not None:
            moments = torch.stack([self.latents[f][i] for i, f in zip(indices, flips)])
            z = moments[:, 0] + moments[:, 1] * post_noise
        else:
            z = post.mean + post.std * post_noise
        z = z * vae.config.scaling_factor
        noise = torch.stack(eps).to(self.device)
        t = torch.tensor(ts, device=self.device)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * z + (1 - ab).sqrt() * noise
        target = noise if c.prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * z
        captions = ["" if d else self.data.captions[i] for i, d in zip(indices, drop)]
        ids = self.tokenizer(captions).to(self.device)
        with autocast(c):
            context = self.models["text"](ids)
            pred = self.models["unet"](x_t, t.float(), context)
        return F.mse_loss(pred.float(), target)

    # -- the loop

    def run(self) -> None:
        c, dist = self.config, self.dist
        self.maybe_resume()
        if self.step >= self.total:
            if not (self.dir / "model.safetensors").exists():
                self.save()  # zero steps: the initial weights
            return
        per_step = self.batch_size * c.grad_accum * dist.world
        bar = None
        if c.progress and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.step, desc=self.stage, dynamic_ncols=True)
        loss_fn = self.vae_loss if self.stage in VAE_STAGES else self.diffusion_loss
        tic = time.perf_counter()
        while self.step < self.total:
            loss = self.train_step(loss_fn, per_step)
            self.step += 1
            elapsed, tic = time.perf_counter() - tic, time.perf_counter()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{per_step / elapsed:.1f}")
            if dist.main and (self.step % c.log_every == 0 or self.step == self.total):
                self.write_log({"loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                "seconds": round(elapsed, 4)})  # fmt: skip
            if c.sample_every and self.step % c.sample_every == 0 and dist.main:
                self.write_samples()
            if self.step % c.checkpoint_every == 0 or self.step == self.total:
                self.save()
        if bar is not None:
            bar.close()
        self.check_ranks_agree()

    def train_step(self, loss_fn, per_step: int) -> float:
        c, dist = self.config, self.dist
        factor = lr_factor(self.step, c, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * factor
        indices = batch_indices(c.seed, self.stage, self.step, per_step, len(self.data))
        total = 0.0
        for micro in range(c.grad_accum):
            start = (micro * dist.world + dist.rank) * self.batch_size
            mine = list(range(start, start + self.batch_size))
            gens = [sample_generator(c.seed, self.stage, self.step, j) for j in mine]
            loss = loss_fn([indices[j] for j in mine], gens) / c.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.item()
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        all_average_(grads, dist)
        self.scaler.unscale_(self.optimizer)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), c.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params, self.step)
        return self._mean_over_ranks(total)

    def _mean_over_ranks(self, value: float) -> float:
        if self.dist.world == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.float64)
        td.all_reduce(t)
        return t.item() / self.dist.world

    # -- outputs

    def write_log(self, entry: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        entry = {"stage": self.stage, "step": self.step, **entry}
        with open(self.dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def inference_models(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.models.items()}

    def ema_overrides(self) -> dict[tuple[str, str], torch.Tensor]:
        """EMA weights by (model, key) (empty without EMA)."""
        if self.ema is None:
            return {}
        return {tuple(name.split(".", 1)): v for name, v in self.ema.shadow.items()}

    def save(self) -> None:
        """model.safetensors (EMA weights if any) and state.safetensors, each atomically."""
        if self.dist.main:
            models = self.inference_models()
            save_file_atomic(
                sd_state_dict(models, self.ema_overrides(), prefixed=self.stage not in VAE_STAGES),
                self.dir / "model.safetensors",
                model_metadata(models, self.config),
            )
            tensors, meta = self.state_tensors()
            save_file_atomic(tensors, self.dir / "state.safetensors", meta)
            log.info("%s: saved step %d to %s", self.stage, self.step, self.dir)
        barrier(self.dist)

    def state_tensors(self) -> tuple[dict, dict]:
        """The raw weights, optimizer moments, EMA and RNG states, and their bookkeeping."""
        tensors = {f"param.{k}": p.detach().cpu() for k, p in self.params.items()}
        opt = self.optimizer.state_dict()
        names = list(self.params)
        for i, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optim.{k}.{names[i]}"] = torch.as_tensor(v).cpu()
        if self.ema is not None:
            tensors.update({f"ema.{k}": v.cpu() for k, v in self.ema.shadow.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "step": str(self.step),
            "stage": self.stage,
            "scaler": json.dumps(self.scaler.state_dict()),
            "config": json.dumps(dataclasses.asdict(self.config)),
            "world": str(self.dist.world),
        }
        return tensors, meta

    def maybe_resume(self) -> None:
        path = self.dir / "state.safetensors"
        if not (self.resume and path.exists()):
            return
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"param.{k}"])
        names = list(self.params)
        state = {}
        for i, name in enumerate(names):
            st = {
                key: tensors[f"optim.{key}.{name}"]
                for key in ("step", "exp_avg", "exp_avg_sq")
                if f"optim.{key}.{name}" in tensors
            }
            if st:
                state[i] = st
        opt = self.optimizer.state_dict()
        opt["state"] = state
        self.optimizer.load_state_dict(opt)
        if self.ema is not None:
            for k in self.ema.shadow:
                self.ema.shadow[k].copy_(tensors[f"ema.{k}"])
        torch.set_rng_state(tensors["rng.torch"])
        scaler = json.loads(meta.get("scaler", "{}"))
        if scaler:
            self.scaler.load_state_dict(scaler)
        self.step = int(meta["step"])
        self._truncate_log()
        log.info("%s: resumed at step %d from %s", self.stage, self.step, path)

    def _truncate_log(self) -> None:
        """Drop log lines past the resumed step (written after the last checkpoint)."""
        path = self.dir / "log.jsonl"
        if not self.dist.main or not path.exists():
            return
        keep = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= self.step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, path)

    def check_ranks_agree(self) -> None:
        """Under torchrun: compare a fingerprint of the weights across ranks and log it."""
        if self.dist.world == 1:
            return
        import torch.distributed as td

        fp = torch.tensor(
            [sum(p.detach().double().sum().item() for p in self.params.values()),
             sum(p.detach().double().abs().sum().item() for p in self.params.values())],
            dtype=torch.float64,
        )  # fmt: skip
        gathered = [torch.zeros_like(fp) for _ in range(self.dist.world)]
        td.all_gather(gathered, fp)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if self.dist.main:
            self.write_log({"rank_fingerprints": [g.tolist() for g in gathered], "agree": same})
        if not same:
            raise RuntimeError(f"ranks diverged: weight fingerprints {gathered}")

    @torch.no_grad()
    def write_samples(self) -> None:
        from PIL import Image

        images = self.sample_images()
        grid = make_grid(images)
        folder = self.dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(folder / f"step-{self.step:07d}.png")

    @torch.no_grad()
    def sample_images(self):
        """Sample grids: reconstructions (VAE stage) or prompts (diffusion stage)."""
        c = self.config
        vae = self.models["vae"]
        was_training = {k: m.training for k, m in self.models.items()}
        for m in self.models.values():
            m.eval()
        try:
            if self.stage in VAE_STAGES:
                images, _ = self.data.batch(list(range(min(8, len(self.data)))))
                out = torch.cat([images, vae.decode(vae.encode(images.to(self.device)).mean)])
            else:
                out = generate(
                    self.models["text"],
                    self.models["unet"],
                    vae,
                    self.tokenizer,
                    self.schedule,
                    c.sample_prompts,
                    steps=c.sample_steps,
                    guidance=c.sample_guidance,
                    seed=c.seed,
                    prediction=c.prediction,
                    resolution=c.resolution,
                )
        finally:
            for k, m in self.models.items():
                m.train(was_training[k])
        return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images, columns: int = 8):
    import numpy as np

    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = im
    return grid


@torch.no_grad()
def generate(text, unet, vae, tokenizer, schedule, prompts, *, steps, guidance, seed,
             prediction, resolution) -> torch.Tensor:  # fmt: skip
    """Minimal txt2img for sample grids: Euler with classifier-free guidance."""
    from sd_samplers import sample

    device = next(unet.parameters()).device
    n = len(prompts)
    cond = text(tokenizer(list(prompts)).to(device))
    uncond = text(tokenizer([""] * n).to(device))
    f = vae.config.downscale
    g = torch.Generator().manual_seed(seed)
    shape = (n, unet.config.in_channels, resolution // f, resolution // f)
    noise = torch.randn(shape, generator=g).to(device)

    def model(x, t):
        out = unet(x, t, torch.cat([uncond, cond]))  # the latents shared by both halves
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    kwargs = {"prediction": prediction} if prediction != "epsilon" else {}
    z = sample("euler", model, noise, schedule, steps=steps, generator=g, progress=False, **kwargs)
    return vae.decode(z / vae.config.scaling_factor)


# ---------------------------------------------------------------------------- stages


def scaling_factor(vae, data: ImageFolder, count: int = 256) -> float:
    """1 / std of the latents, as the latent-diffusion paper's ``scale_by_std``."""
    with torch.no_grad():
        images, _ = data.batch(list(range(min(count, len(data)))))
        z = vae.encode(images.to(vae.device)).sample(torch.Generator().manual_seed(0))
    return float(1.0 / z.float().std())


def finish_vae_stage(config: TrainConfig, data: ImageFolder) -> None:
    """Scale the VAE so that its config's scaling factor gives unit-variance latents.

    The latent-diffusion paper sets the factor to 1 / std of the latents. Instead of storing a
    new factor, the latents themselves are rescaled (the mean rows of ``quant_conv`` and the
    input of ``post_quant_conv``; the log-variance shifts by 2 log k): an exact
    reparametrisation, so any loader's default factor is right for this VAE.
    """
    from sd_vae import AutoencoderKL

    path = Path(config.out) / "vae" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("sd_pipeline.vae_done") == "1":
        return
    vae = AutoencoderKL.from_checkpoint(path)
    k = scaling_factor(vae, data) / vae.config.scaling_factor
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    meta["sd_pipeline.vae_done"] = "1"
    meta["sd_pipeline.latent_rescale"] = repr(k)
    save_file_atomic(sd_state_dict({"vae": vae}, prefixed=False), path, meta)
    log.info("vae: latents rescaled by %.5f for scaling factor %g", k, vae.config.scaling_factor)


def prepare_data(config: TrainConfig, dist: Dist) -> ImageFolder:
    folder = Path(config.data)
    if config.shapes is not None and not folder.exists():
        if dist.main:
            from sd_pipeline.shapes import ShapesConfig, write_dataset

            spec = dict(config.shapes)
            count, seed = spec.pop("count", 10_000), spec.pop("seed", config.seed)
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            write_dataset(tmp, count, seed, ShapesConfig(**spec))
            os.replace(tmp, folder)
        barrier(dist)
    return ImageFolder.load(
        folder, config.resolution, random_crop=config.random_crop, random_flip=config.random_flip
    )


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run every stage of ``config``; returns the path of the finished model."""
    config.validate()
    dist = init_distributed(config.device)
    if dist.world > 1 and config.device.startswith("cuda"):
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', dist.rank))}"
    torch.manual_seed(config.seed)
    data = prepare_data(config, dist)
    out = Path(config.out)
    if config.mode == "scratch":
        stage = Trainer(config, "vae", data, dist, resume)
        stage.run()
        if dist.main:
            finish_vae_stage(config, data)
        barrier(dist)
        del stage
    stage = Trainer(config, "diffusion", data, dist, resume)
    stage.run()
    del stage
    if config.mode == "scratch" and config.decoder_steps:
        Trainer(config, "decoder", data, dist, resume).run()
    final = out / "model.safetensors"
    if dist.main:
        assemble_model(out, with_decoder=config.mode == "scratch" and config.decoder_steps > 0)
    barrier(dist)
    return final


def assemble_model(out: Path, with_decoder: bool) -> None:
    """OUT/model.safetensors: the diffusion stage's model, its VAE decoder refined if asked."""
    with safe_open(str(out / "diffusion" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if with_decoder:
        prefix = SD_PREFIXES["vae"]
        with safe_open(str(out / "decoder" / "model.safetensors"), framework="pt") as f:
            refined = {prefix + k: f.get_tensor(k) for k in f.keys()}
        if set(refined) != {k for k in tensors if k.startswith(prefix)}:
            raise RuntimeError(f"{out}: the refined decoder's VAE does not fit the model's VAE")
        tensors.update(refined)
    save_file_atomic(tensors, out / "model.safetensors", meta)


def export(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float16") -> None:
    """Copy a model file with its tensors cast (e.g. to float16 for shipping)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    target = getattr(torch, dtype)
    tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file_atomic(tensors, Path(dst), meta)


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for mode in ("finetune", "scratch"):
        s = sub.add_parser(mode, help=f"{mode} (see sd_pipeline.train)")
        s.add_argument("--recipe", help="JSON file of settings; command-line flags win")
        s.add_argument("--resume", action="store_true", help="continue from OUT's last state")
        s.add_argument("--data")
        s.add_argument("--out")
        if mode == "finetune":
            s.add_argument("--checkpoint", help="the model to fine-tune")
            s.add_argument("--train-text-encoder", action="store_true", default=None)
        for name, kind in [
            ("resolution", int), ("batch-size", int), ("grad-accum", int), ("steps", int),
            ("lr", float), ("weight-decay", float), ("warmup-steps", int),
            ("lr-schedule", str), ("max-grad-norm", float), ("mixed-precision", str),
            ("ema-decay", float), ("cond-dropout", float), ("prediction", str),
            ("seed", int), ("checkpoint-every", int), ("sample-every", int),
            ("sample-steps", int), ("log-every", int), ("device", str),
            ("vae-steps", int), ("vae-lr", float), ("kl-weight", float),
            ("decoder-steps", int),
        ]:  # fmt: skip
            s.add_argument(f"--{name}", type=kind)
        s.add_argument("--sample-prompt", action="append", dest="sample_prompts")
        s.add_argument("--gradient-checkpointing", action="store_true", default=None)
        s.add_argument("--random-crop", action="store_true", default=None)
        s.add_argument("--random-flip", action="store_true", default=None)
        s.add_argument("--no-progress", action="store_false", dest="progress", default=None)
    e = sub.add_parser("export", help="cast a model file's tensors (e.g. to float16)")
    e.add_argument("src")
    e.add_argument("dst")
    e.add_argument("--dtype", default="float16")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {"mode": args.command}
    if args.recipe:
        values.update(load_recipe(args.recipe))
        values["mode"] = args.command
    skip = {"command", "recipe", "resume"}
    values.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "export":
        export(args.src, args.dst, args.dtype)
        return 0
    try:
        config = config_from_args(args)
        final = train(config, resume=args.resume)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"sd-train: error: {e}", file=sys.stderr)
        return 2
    print(f"sd-train: wrote {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
