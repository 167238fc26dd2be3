"""The trainer: one stage (see :mod:`sd_pipeline.training.stages`) over an in-memory image folder.

AdamW with a warm-up and a constant/cosine/linear schedule, gradient accumulation, autocast
mixed precision over float32 master weights (bf16, or fp16 with loss scaling), gradient
checkpointing, EMA, sample grids, a progress bar, a JSON-lines log, and checkpoints every N
steps (:mod:`sd_pipeline.training.state`). A non-finite loss stops the stage with an error
before the optimizer takes it, so the last checkpoint written is always a good one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from sd_pipeline.training import distributed, samples, state
from sd_pipeline.training.config import TrainConfig, TrainingError
from sd_pipeline.training.data import DataError, ImageFolder
from sd_pipeline.training.distributed import Dist
from sd_pipeline.training.stages import (
    Stage,
    batch_indices,
    build_models,
    lr_factor,
    sample_generator,
)

log = logging.getLogger("sd_pipeline.training")

__all__ = ["EMA", "Trainer", "enable_block_checkpointing"]


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


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP (DTensor) one, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of parameters (float32), with the usual warm-up.

    Kept on ``device`` (the CPU, to leave the accelerator's memory to training), and for FSDP
    parameters as this rank's shards only.
    """

    def __init__(self, params: dict[str, torch.Tensor], decay: float, device=None):
        self.decay = decay
        self.shadow = {}
        for k, v in params.items():
            v = local(v).detach()
            self.shadow[k] = v.to(device or v.device, torch.float32, copy=True)

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in params.items():
            shadow = self.shadow[k]
            shadow.lerp_(local(v).detach().to(shadow.device, torch.float32), 1 - d)


class StageModel(nn.Module):
    """The parts a stage trains as one module whose forward is the stage's loss: the unit that
    DDP and FSDP wrap, whatever the mode trains (an adapter would be one more part)."""

    def __init__(self, trainer: Trainer):
        super().__init__()
        self.parts = nn.ModuleDict({n: trainer.models[n] for n in trainer.stage.trains})
        object.__setattr__(self, "_trainer", trainer)  # a plain reference, not a submodule

    def forward(self, indices: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        trainer = self._trainer
        return trainer.stage.loss(trainer, indices, generators)


class Trainer:
    """One stage of training, as its :class:`Stage` record describes it."""

    def __init__(
        self, config: TrainConfig, stage: Stage, data: ImageFolder, dist: Dist, resume: bool
    ):
        self.config, self.stage, self.data, self.dist = config, stage, data, dist
        self.resume = resume
        self.dir = Path(config.out) / stage.name
        self.device = torch.device(config.device)
        self.models = build_models(config, stage)
        self._prepare_models()
        self.sharded = config.fsdp
        self.module = StageModel(self)
        if self.sharded:
            trained = [self.models[n] for n in stage.trains]
            distributed.shard(self.module, trained, config.mixed_precision)
        # What the steps call: DDP around the stage's module under torchrun, FSDP's module as
        # it is (sharding replaced its parameters in place), or the module alone.
        self.forward = self.module
        if dist.world > 1 and not self.sharded:
            self.forward = distributed.wrap_ddp(self.module, self.device)
        self.params = {
            f"{name}.{k}": p
            for name in stage.trains
            for k, p in self.models[name].named_parameters()
            if p.requires_grad
        }
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=stage.lr, weight_decay=config.weight_decay,
            fused=True if config.fused_adam else None,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.mixed_precision == "fp16"
        )
        self.ema = None
        if config.ema_decay > 0:
            self.ema = EMA(self.params, config.ema_decay, "cpu" if config.ema_on_cpu else None)
        self.step = 0
        self.latents = None
        self.contexts = None
        if stage.on_latents:
            self._setup_diffusion()

    # -- setup

    def _prepare_models(self) -> None:
        """Float32 on the device; the trained parts in train mode, the rest frozen in eval."""
        for name, m in self.models.items():
            trained = name in self.stage.trains
            m.to(self.device, torch.float32).requires_grad_(trained).train(trained)
            # an adapted part is frozen, but the adapter's gradients run back through it
            if self.config.gradient_checkpointing and (trained or name in self.stage.adapts):
                enable_block_checkpointing(m)
            for sub in self.stage.frozen if trained else ():
                getattr(m, sub).requires_grad_(False)

    def _setup_diffusion(self) -> None:
        from sd_clip import CLIPTokenizer
        from sd_samplers import NoiseSchedule

        c = self.config
        self.tokenizer = CLIPTokenizer(max_length=self.models["text_encoder"].config.max_positions)
        self.schedule = NoiseSchedule.scaled_linear(**c.schedule)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device)
        f = self.models["vae"].config.downscale
        if c.resolution % f:
            raise DataError(f"resolution {c.resolution} is not a multiple of the VAE's {f}")
        if c.cache_latents and not c.random_crop:
            self.latents = self._cache_latents()
        elif c.cache_latents:
            log.info("latents are encoded every step: random crops differ from step to step")
        if c.cache_text_encoder_outputs:
            self.contexts = self._cache_contexts()

    @torch.no_grad()
    def _cache_latents(self) -> dict[bool, list[torch.Tensor]]:
        """The frozen VAE's posterior (mean, std) for every image, and its mirror image: one
        (2, C, h, w) tensor each (images of different buckets have different sizes)."""
        vae, out = self.models["vae"], {}
        for flipped in (False, True) if self.config.random_flip else (False,):
            moments: list[torch.Tensor | None] = [None] * len(self.data)
            for group in self.data.same_size(list(range(len(self.data)))):
                for i in range(0, len(group), 64):
                    chunk = group[i : i + 64]
                    images, _ = self.data.batch(chunk)
                    if flipped:
                        images = images.flip(-1)
                    post = vae.encode(images.to(self.device))
                    for j, m in zip(chunk, torch.stack([post.mean, post.std], 1)):
                        moments[j] = m
            out[flipped] = moments
        return out

    @torch.no_grad()
    def _cache_contexts(self) -> dict[str, torch.Tensor]:
        """The frozen text encoder's output for every distinct caption and the empty one (the
        caption dropout's), computed as the loss would compute them (same autocast)."""
        from sd_pipeline.training.losses import autocast

        texts = sorted({"", *self.data.captions})
        encoder, out = self.models["text_encoder"], {}
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            with autocast(self.config.mixed_precision, self.device):
                hidden = encoder(self.tokenizer(chunk).to(self.device))
            out.update({t: h[None] for t, h in zip(chunk, hidden)})
        return out

    # -- the loop

    def run(self) -> None:
        """Train the stage to its last step (resuming first when asked)."""
        if self.dist.main:
            state.remove_stale_temporaries(self.dir)
        path = self.state_path
        if self.resume and path.exists():
            (state.load_sharded_state if self.sharded else state.load_state)(self, path)
            if self.dist.main:
                state.truncate_log(self.dir / "log.jsonl", self.step)
            log.info("%s: resumed at step %d from %s", self.stage.name, self.step, path)
        if self.step >= self.stage.steps:
            self._finish_done_stage()
            return
        self._loop()
        self.check_ranks_agree()

    def _finish_done_stage(self) -> None:
        """A stage with nothing left to train: make sure its model file is there and whole
        (zero steps: the initial weights; a damaged file is written again from the state)."""
        model = self.dir / "model.safetensors"
        if model.exists() and state.is_readable(model):
            return
        if model.exists():
            log.warning("%s: unreadable; writing it again from %s", model, "state.safetensors")
        self.save(write_state=not self.state_path.exists())

    @property
    def state_path(self) -> Path:
        """The training state: one file, or (FSDP) the index of a sharded checkpoint folder."""
        return self.dir / ("state.json" if self.sharded else "state.safetensors")

    def _loop(self) -> None:
        c, dist, total = self.config, self.dist, self.stage.steps
        per_step = self.stage.batch_size * c.grad_accum * dist.world
        bar = None
        if c.progress and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, desc=self.stage.name, dynamic_ncols=True)
        tic = time.perf_counter()
        while self.step < total:
            loss = self.train_step(per_step)
            self.step += 1
            elapsed, tic = time.perf_counter() - tic, time.perf_counter()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{per_step / elapsed:.1f}")
            if dist.main and (self.step % c.log_every == 0 or self.step == total):
                self.write_log({"loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                                "seconds": round(elapsed, 4)})  # fmt: skip
            if c.sample_every and self.step % c.sample_every == 0 and (dist.main or self.sharded):
                samples.write_samples(self)
            if self.step % c.checkpoint_every == 0 or self.step == total:
                self.save()
        if bar is not None:
            bar.close()

    def train_step(self, per_step: int) -> float:
        """One optimizer step (all its micro-steps); returns the loss, averaged over ranks."""
        c, dist, stage = self.config, self.dist, self.stage
        for group in self.optimizer.param_groups:
            group["lr"] = stage.lr * lr_factor(self.step, c, stage.steps)
        groups = self.data.buckets()
        indices = batch_indices(c.seed, stage, self.step, per_step, len(self.data), groups)
        total = 0.0
        for micro in range(c.grad_accum):
            start = (micro * dist.world + dist.rank) * stage.batch_size
            mine = list(range(start, start + stage.batch_size))
            gens = [sample_generator(c.seed, stage, self.step, j) for j in mine]
            # DDP exchanges the gradients (in buckets, during the backward) on the last
            # micro-step only; FSDP reduce-scatters each one's.
            with distributed.accumulating(self.forward, last=micro == c.grad_accum - 1):
                loss = self.forward([indices[j] for j in mine], gens) / c.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.item()
        total = dist.mean(total)
        self._check_loss(total)
        self.scaler.unscale_(self.optimizer)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), c.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params, self.step)
        return total

    def _check_loss(self, loss: float) -> None:
        """Stop at a non-finite loss, before the optimizer applies it (every rank sees the
        same averaged loss, so all stop together)."""
        if math.isfinite(loss):
            return
        saved = self.dir / "model.safetensors"
        kept = f"the last good checkpoint is kept in {self.dir}" if saved.exists() else (
            "no checkpoint had been written yet"
        )  # fmt: skip
        raise TrainingError(
            f"{self.stage.name}: the loss is {loss} at step {self.step + 1}: training "
            f"diverged; stopped, {kept}. Lower the learning rate (or raise warmup_steps, or use "
            "bf16 rather than fp16), then resume with --resume"
        )

    # -- outputs

    def write_log(self, entry: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        entry = {"stage": self.stage.name, "step": self.step, **entry}
        with open(self.dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def save(self, write_state: bool = True) -> None:
        """model.safetensors (EMA weights if any) and state.safetensors, each atomically, on
        rank 0; never non-finite weights (every rank checks, so all stop together)."""
        state.check_finite(self)
        if self.sharded:  # every rank writes its shards and helps gather the model file
            state.write_model(self)
            if write_state:
                state.save_sharded_state(self)
        elif self.dist.main:
            state.write_model(self)
            if write_state:
                state.save_state(self)
            log.info("%s: saved step %d to %s", self.stage.name, self.step, self.dir)
        self.dist.barrier()

    def check_ranks_agree(self) -> None:
        """Under torchrun: compare a fingerprint of the weights across ranks and log it."""
        if self.dist.world == 1 or self.sharded:  # FSDP's ranks hold different shards
            return
        values = [p.detach().double() for p in self.params.values()]
        fp = torch.tensor([sum(v.sum().item() for v in values),
                           sum(v.abs().sum().item() for v in values)], dtype=torch.float64)  # fmt: skip
        gathered = self.dist.gather(fp)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if self.dist.main:
            self.write_log({"rank_fingerprints": [g.tolist() for g in gathered], "agree": same})
        if not same:
            raise RuntimeError(f"ranks diverged: weight fingerprints {gathered}")
