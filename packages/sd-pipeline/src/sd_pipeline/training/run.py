"""A whole run: the data, every stage of the plan in turn, the finished model; and ``export``.

OUT/<stage>/...                 each stage's files (see :mod:`sd_pipeline.training.state`)
OUT/model.safetensors           the finished model (``StableDiffusion.from_checkpoint``)
OUT/lora.safetensors            or, for ``lora``, the kohya LoRA file (``--lora``, ``load_lora``)
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch

from sd_pipeline import single_file
from sd_pipeline.files import save_safetensors
from sd_pipeline.training import distributed, state
from sd_pipeline.training.config import TrainConfig, TrainingError, shapes_config
from sd_pipeline.training.data import ImageFolder, bucket_sizes
from sd_pipeline.training.distributed import Dist
from sd_pipeline.training.stages import plan
from sd_pipeline.training.trainer import Trainer

log = logging.getLogger("sd_pipeline.training")

__all__ = ["export", "train"]

STAGE_FILE_REMEDY = "delete it and run again with --resume: it is written again from its stage"


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run every stage of ``config``; returns the path of the finished model."""
    config.validate()
    dist = distributed.init(config.device, need_group=config.fsdp)
    config.device = distributed.train_device(config.device, dist)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    if dist.main:
        state.remove_stale_temporaries(out)
    data = prepare_data(config, dist)
    stages = plan(config)
    for stage in stages:
        trainer = Trainer(config, stage, data, dist, resume)
        trainer.run()
        del trainer
        if stage.rescales_latents and dist.main:
            finish_vae_stage(out / stage.name / "model.safetensors", data)
        dist.barrier()
    final = out / "model.safetensors"
    if stages[-1].adapts:  # a LoRA run's result is its adapter file, as kohya_ss names it
        final = out / "lora.safetensors"
        if dist.main:
            tensors, meta = state.read_safetensors(
                out / stages[-1].name / "model.safetensors", "LoRA stage file", STAGE_FILE_REMEDY
            )
            save_safetensors(tensors, final, meta)
    elif dist.main:
        refined = [s.name for s in stages if s.standalone and not s.rescales_latents]
        assemble_model(out, refined[0] if refined else None)
    dist.barrier()
    return final


def prepare_data(config: TrainConfig, dist: Dist) -> ImageFolder:
    """The training images; the shapes dataset is drawn first where the recipe asks for it."""
    folder = Path(config.data)
    if config.shapes is not None and not folder.exists():
        if dist.main:
            from sd_pipeline.training.shapes import write_dataset

            spec = dict(config.shapes)
            count, seed = spec.pop("count", 10_000), spec.pop("seed", config.seed)
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            write_dataset(tmp, count, seed, shapes_config(spec))
            os.replace(tmp, folder)
        dist.barrier()
    buckets = None
    if config.enable_bucket:
        r = config.resolution
        buckets = bucket_sizes(r, config.min_bucket_reso or r // 2, config.max_bucket_reso or 2 * r)
    return ImageFolder.load(
        folder, config.resolution, random_crop=config.random_crop,
        random_flip=config.random_flip, buckets=buckets,
    )  # fmt: skip


def scaling_factor(vae, data: ImageFolder, count: int = 256) -> float:
    """1 / std of the latents, as the latent-diffusion paper's ``scale_by_std``."""
    g, zs = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for group in data.same_size(list(range(min(count, len(data))))):  # one per bucket
            images, _ = data.batch(group)
            zs.append(vae.encode(images.to(vae.device)).sample(g).float().flatten())
    return float(1.0 / torch.cat(zs).std())


def finish_vae_stage(path: Path, data: ImageFolder) -> None:
    """Scale the VAE so that its config's scaling factor gives unit-variance latents.

    The latent-diffusion paper sets the factor to 1 / std of the latents. Instead of storing a
    new factor, the latents themselves are rescaled (the mean rows of ``quant_conv`` and the
    input of ``post_quant_conv``; the log-variance shifts by 2 log k): an exact
    reparametrisation, so any loader's default factor is right for this VAE.
    """
    from sd_vae import AutoencoderKL

    _, meta = state.read_safetensors(path, "VAE stage model", STAGE_FILE_REMEDY)
    if meta.get("sd_pipeline.vae_done") == "1":
        return
    vae = AutoencoderKL.from_checkpoint(path, dtype=torch.float32)
    k = scaling_factor(vae, data) / vae.config.scaling_factor
    if not (math.isfinite(k) and k > 0):
        raise TrainingError(f"{path}: the VAE's latents have no usable scale (1/std = {k})")
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    meta = {**meta, "sd_pipeline.vae_done": "1", "sd_pipeline.latent_rescale": repr(k)}
    save_safetensors(vae.state_dict(), path, meta)
    log.info("vae: latents rescaled by %.5f for scaling factor %g", k, vae.config.scaling_factor)


def assemble_model(out: Path, refined_stage: str | None) -> None:
    """OUT/model.safetensors: the diffusion stage's model, its VAE replaced by the refined one
    of ``refined_stage`` (a standalone VAE file) when there is one."""
    tensors, meta = state.read_safetensors(
        out / "diffusion" / "model.safetensors", "diffusion stage model", STAGE_FILE_REMEDY
    )
    if refined_stage is not None:
        prefix = single_file.PREFIXES["vae"]
        vae, _ = state.read_safetensors(
            out / refined_stage / "model.safetensors", "refined VAE", STAGE_FILE_REMEDY
        )
        refined = {prefix + k: v for k, v in vae.items()}
        if set(refined) != {k for k in tensors if k.startswith(prefix)}:
            raise TrainingError(f"{out}: the refined decoder's VAE does not fit the model's VAE")
        tensors.update(refined)
    save_safetensors(tensors, out / "model.safetensors", meta)


EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float16") -> Path:
    """Copy a model file with its floating-point tensors cast (e.g. to float16 for shipping)."""
    if dtype not in EXPORT_DTYPES:
        raise TrainingError(
            f"--dtype {dtype}: not a floating-point type for weights; choose from: "
            + ", ".join(EXPORT_DTYPES)
            + (" (an integer type would truncate every weight)" if "int" in str(dtype) else "")
        )
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        what = "is a folder" if src.is_dir() else "no such file"
        raise FileNotFoundError(f"{src}: {what}; export reads one .safetensors model file")
    if dst.suffix != ".safetensors":
        raise TrainingError(f"{dst}: export writes safetensors; use a '.safetensors' file name")
    if dst.is_dir():
        raise TrainingError(f"{dst}: is a folder; give the file name to write")
    tensors, meta = state.read_safetensors(
        src, "model file", "export reads a .safetensors file (sd-train's model.safetensors)"
    )
    target = EXPORT_DTYPES[dtype]
    cast = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    for k, v in cast.items():  # a weight past float16's range would become inf: refuse
        if v.is_floating_point() and not bool(torch.isfinite(v[torch.isfinite(tensors[k])]).all()):
            raise TrainingError(
                f"{src}: {k!r} has values beyond {dtype}'s range; export to bfloat16 or float32"
            )
    return save_safetensors(cast, dst, meta)
