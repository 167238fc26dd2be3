"""Sample grids written while training: reconstructions (VAE stages) or pictures of the sample
prompts made by :class:`sd_pipeline.StableDiffusion` itself from the models being trained, so
that guidance, sampling and decoding are the pipeline's, not a second copy of them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sd_pipeline.files import replacing
from sd_pipeline.training.losses import autocast

__all__ = ["make_grid", "sample_images", "write_samples"]

# Sample grids use a deterministic sampler, so that grids of successive steps compare.
SAMPLER = "euler"


def make_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures side by side, ``columns`` to a row."""
    n, h, w, _ = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = im
    return grid


def write_samples(trainer) -> None:
    """OUT/<stage>/samples/step-NNNNNNN.png (written atomically, by rank 0). Under FSDP every
    rank calls this: each block's weights are gathered from all of them as it runs."""
    from PIL import Image

    images = sample_images(trainer)
    if not trainer.dist.main:
        return
    folder = trainer.dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(make_grid(images))
    with replacing(folder / f"step-{trainer.step:07d}.png") as f:
        grid.save(f, format="PNG")


@torch.no_grad()
def sample_images(trainer) -> np.ndarray:
    """The stage's sample pictures as (N, H, W, 3) uint8, with every model in eval mode for
    the while (and each put back in the mode it was in)."""
    was_training = {k: m.training for k, m in trainer.models.items()}
    for m in trainer.models.values():
        m.eval()
    try:
        out = _prompts(trainer) if trainer.stage.on_latents else _reconstructions(trainer)
    finally:
        for k, m in trainer.models.items():
            m.train(was_training[k])
    return ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _reconstructions(trainer) -> torch.Tensor:
    """Up to 8 training images above their VAE round trips."""
    vae = trainer.models["vae"]
    images, _ = trainer.data.batch(trainer.data.same_size(list(range(len(trainer.data))))[0][:8])
    images = images.to(trainer.device)
    return torch.cat([images, vae.decode(vae.encode(images).mean)])


def _prompts(trainer) -> torch.Tensor:
    """One picture per sample prompt, by the pipeline made of the models being trained."""
    from sd_pipeline import StableDiffusion

    c, m = trainer.config, trainer.models
    pipe = StableDiffusion(
        m["vae"], m["text_encoder"], m["unet"], trainer.tokenizer, trainer.schedule,
        prediction=c.prediction, native_size=c.resolution, device=trainer.device,
        dtype=torch.float32, name=f"sd-train {trainer.stage.name} step {trainer.step}",
    )  # fmt: skip
    pipe.keep_freed_memory = False  # leave the training process's allocator as it is
    # FSDP's mixed-precision policy gathers the weights in half precision: the pipeline's float32
    # inputs need the training's autocast to meet them.
    precision = c.mixed_precision if trainer.sharded else "no"
    with autocast(precision, trainer.device):
        return _txt2img(pipe, c)


def _txt2img(pipe, c) -> torch.Tensor:
    return pipe.txt2img(
        list(c.sample_prompts), steps=c.sample_steps, guidance_scale=c.sample_guidance,
        sampler=SAMPLER, seed=c.seed, output_type="tensor", progress=False,
    )  # fmt: skip
