"""What a stage writes and reads back: its model file, its training state and its log.

    OUT/<stage>/model.safetensors   the weights (EMA when enabled): an SD single file, or a
                                    standalone VAE file for the VAE stages
    OUT/<stage>/state.safetensors   raw weights, optimizer moments, EMA, RNG state, step, settings
    OUT/<stage>/log.jsonl           one JSON object per logged step

Files are written atomically (:mod:`sd_pipeline.files`), and never with non-finite weights.
Reading a state back checks everything it holds against the run being resumed, so a damaged or
mismatched file is one line naming it and what to do, not a traceback halfway into a step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from sd_pipeline import single_file
from sd_pipeline.files import replacing, save_safetensors
from sd_pipeline.training.config import TrainingError
from sd_pipeline.training.stages import FRESH

log = logging.getLogger("sd_pipeline.training")

__all__ = ["read_safetensors", "remove_stale_temporaries", "save_state", "write_model"]

# The temporary files of sd_pipeline.files.replacing (``.<name>.<8 random>.tmp``) and of the
# sd-train before it (``<name>.<8 random>.tmp``), for the files a run writes. Nothing else in
# a run's folders is ever removed.
_OURS = r"(model\.safetensors|state\.safetensors|state\.json|log\.jsonl|step-\d+\.png)"
STALE = re.compile(rf"^\.?{_OURS}\.[a-z0-9_]{{8}}\.tmp$|^log\.tmp$")


def remove_stale_temporaries(folder: Path) -> None:
    """Remove what a killed run left half-written in ``folder`` (and its ``samples/``)."""
    if folder.is_dir():
        remove_unused_shards(folder)
    for where in (folder, folder / "samples"):
        if not where.is_dir():
            continue
        for path in where.iterdir():
            if STALE.match(path.name) and path.is_file():
                log.info("removing %s, left behind by an interrupted run", path)
                path.unlink(missing_ok=True)


def read_safetensors(path: Path, what: str, remedy: str) -> tuple[dict, dict]:
    """All tensors and the metadata of ``path``, or a TrainingError naming it and ``remedy``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types, and OSError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainingError(f"{path}: unreadable {what} ({reason}); {remedy}") from None
    return tensors, meta


def is_readable(path: Path) -> bool:
    """Whether ``path`` is a complete safetensors file (its header and its tensors)."""
    try:
        read_safetensors(path, "file", "")
    except TrainingError:
        return False
    return True


# ---------------------------------------------------------------------------- writing


def check_finite(trainer) -> None:
    """Refuse to write weights that are NaN or infinite (a diverged run keeps its last good
    checkpoint instead)."""
    from sd_pipeline.training.trainer import local

    tensors = {k: local(v) for k, v in trainer.params.items()}
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in trainer.ema.shadow.items()})
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    # FSDP's ranks check different shards: any rank's bad shard stops all of them together.
    if trainer.sharded and trainer.dist.mean(float(bool(bad))) > 0 and not bad:
        bad = ["a shard of another rank"]
    if bad:
        raise TrainingError(
            f"{trainer.stage.name}: the weights are not finite (NaN or inf) at step "
            f"{trainer.step} ({bad[0]}{' and others' if len(bad) > 1 else ''}); nothing was "
            f"written, the last good checkpoint is kept in {trainer.dir}. Lower the learning "
            "rate (or use bf16 rather than fp16) and resume with --resume"
        )


def pipeline_settings(config) -> dict:
    """What StableDiffusion.from_checkpoint reads from the model file beside the weights."""
    return {
        "prediction": config.prediction,
        "schedule": config.schedule,
        "resolution": config.resolution,
        **config.defaults,
    }


def lora_metadata(trainer) -> dict[str, str]:
    """kohya's ``ss_*`` training metadata that is cheap to know (AUTOMATIC1111 shows it)."""
    c = trainer.config
    return {
        "ss_output_name": Path(c.out).name,
        "ss_sd_model_name": Path(c.checkpoint or "").name,
        "ss_learning_rate": str(c.lr),
        "ss_unet_lr": str(c.lr) if c.train_unet else "0",
        "ss_text_encoder_lr": str(c.lr) if c.train_text_encoder else "0",
        "ss_max_train_steps": str(trainer.stage.steps),
        "ss_steps": str(trainer.step),
        "ss_resolution": f"({c.resolution}, {c.resolution})",
        "ss_num_train_images": str(len(trainer.data)),
        "ss_batch_size_per_device": str(trainer.stage.batch_size),
        "ss_gradient_accumulation_steps": str(c.grad_accum),
        "ss_mixed_precision": c.mixed_precision,
        "ss_seed": str(c.seed),
        "ss_network_train_unet_only": str(not c.train_text_encoder),
        "ss_network_train_text_encoder_only": str(not c.train_unet),
    }


def write_model(trainer) -> None:
    """OUT/<stage>/model.safetensors: the inference weights (EMA ones where kept)."""
    overrides = {}
    if trainer.sharded:
        overrides = gathered_weights(trainer)  # collective: every rank takes part
        if not trainer.dist.main:
            return
    elif trainer.ema is not None:
        overrides = {tuple(k.split(".", 1)): v for k, v in trainer.ema.shadow.items()}
    path = trainer.dir / "model.safetensors"
    if trainer.stage.adapts:  # a LoRA: the kohya file of the adapters alone
        network = trainer.models["lora"]
        tensors = network.kohya_state_dict({k: v for (part, k), v in overrides.items()})
        save_safetensors(tensors, path, {**network.metadata(), **lora_metadata(trainer)})
        return
    if not trainer.stage.standalone:
        single_file.save(path, trainer.models, pipeline_settings(trainer.config),
                         overrides=overrides)  # fmt: skip
        return
    vae = trainer.models["vae"]  # a standalone VAE file: the same names, without the prefix
    tensors = {k: overrides.get(("vae", k), v) for k, v in vae.state_dict().items()}
    save_safetensors(tensors, path, single_file.metadata({"vae": vae}))


def _ema_dtensors(trainer) -> dict:
    """The EMA's shards as DTensors laid out as their parameters (what DCP saves and loads)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, shard in trainer.ema.shadow.items():
        p = trainer.params[k]
        out[k] = DTensor.from_local(shard.to(p.device), p.device_mesh, p.placements,
                                    shape=p.shape, stride=p.stride())  # fmt: skip
    return out


def gathered_weights(trainer) -> dict[tuple[str, str], torch.Tensor]:
    """FSDP: the whole trained weights (the EMA's where kept) on rank 0's CPU, by part and key;
    other ranks get an empty dict. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if trainer.ema is not None:
        full = {}
        for k, t in _ema_dtensors(trainer).items():
            t = t.full_tensor().cpu()
            if trainer.dist.main:
                full[k] = t
        return {tuple(k.split(".", 1)): v for k, v in full.items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(trainer.module, options=options)
    return {tuple(k.removeprefix("parts.").split(".", 1)): v for k, v in full.items()}


def _sharded_content(trainer) -> dict:
    """What a sharded state holds: model and optimizer (sharded), EMA, the RNG state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(trainer.module, trainer.optimizer)
    content = {"model": model, "optim": optim, "rng": torch.get_rng_state()}
    if trainer.ema is not None:
        content["ema"] = _ema_dtensors(trainer)
    return content


def _meta(trainer) -> dict[str, str]:
    return {
        "step": str(trainer.step),
        "stage": trainer.stage.name,
        "scaler": json.dumps(trainer.scaler.state_dict()),
        "config": json.dumps(dataclasses.asdict(trainer.config)),
        "world": str(trainer.dist.world),
    }


SHARDED = re.compile(r"^state-\d{7}$")


def save_sharded_state(trainer) -> None:
    """FSDP: OUT/<stage>/state-NNNNNNN/ (a torch.distributed.checkpoint, each rank its shards),
    then OUT/<stage>/state.json naming it, written atomically once every shard is complete; the
    older folders are removed after that. A run killed while saving keeps the previous one."""
    import torch.distributed.checkpoint as dcp

    folder = trainer.dir / f"state-{trainer.step:07d}"
    if trainer.dist.main:
        shutil.rmtree(folder, ignore_errors=True)  # a partial one of a killed run
    trainer.dist.barrier()
    dcp.save(_sharded_content(trainer), checkpoint_id=folder)
    trainer.dist.barrier()
    if trainer.dist.main:
        index = {**_meta(trainer), "folder": folder.name}
        with replacing(trainer.dir / "state.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=1))
        remove_unused_shards(trainer.dir)


def remove_unused_shards(folder: Path) -> None:
    """The sharded-state folders that state.json does not name (superseded, or half-written)."""
    try:
        keep = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("folder")
    except (OSError, ValueError, AttributeError):
        return  # no usable index: leave everything for the user to judge
    for path in folder.iterdir():
        if SHARDED.match(path.name) and path.name != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def load_sharded_state(trainer, path: Path) -> None:
    """FSDP: continue from the sharded state that ``path`` (state.json) names, on any number of
    ranks (DCP splits the saved tensors into this run's shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    remedy = "delete it (and its state-* folder) to run this stage again from step 0"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        folder = path.parent / meta["folder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{path}: unreadable training state index ({e}); {remedy}") from None
    step = _step(meta, path, remedy)
    _compare_settings(trainer, meta, path)
    content = _sharded_content(trainer)
    try:
        dcp.load(content, checkpoint_id=folder)
    except Exception as e:  # DCP wraps every reader's failure in its own exception types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TrainingError(
            f"{folder}: unusable sharded training state ({reason}); it was written for other "
            f"models, or damaged: resume with the settings it was started with, or {remedy}"
        ) from None
    set_state_dict(trainer.module, trainer.optimizer, model_state_dict=content["model"],
                   optim_state_dict=content["optim"])  # fmt: skip
    if trainer.ema is not None:
        for k, t in content["ema"].items():
            trainer.ema.shadow[k].copy_(t.to_local())
    scaler = json.loads(meta.get("scaler", "{}"))
    if scaler:
        trainer.scaler.load_state_dict(scaler)
    torch.set_rng_state(content["rng"])
    trainer.step = step


def save_state(trainer) -> None:
    """OUT/<stage>/state.safetensors: everything a resumed run needs to continue bit-exactly."""
    tensors = {f"param.{k}": p.detach().cpu() for k, p in trainer.params.items()}
    names = list(trainer.params)
    for i, st in trainer.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{k}.{names[i]}"] = torch.as_tensor(v).cpu()
    if trainer.ema is not None:
        tensors.update({f"ema.{k}": v.cpu() for k, v in trainer.ema.shadow.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = _meta(trainer)
    save_safetensors(tensors, trainer.dir / "state.safetensors", meta)


# ---------------------------------------------------------------------------- resuming


def load_state(trainer, path: Path) -> None:
    """Continue ``trainer`` from the state at ``path``, after checking that it fits."""
    remedy = (
        "delete it to run this stage again from step 0 (or restore a good copy), or start "
        "a new run in another --out folder"
    )
    tensors, meta = read_safetensors(path, "training state", remedy)
    step = _step(meta, path, remedy)
    if meta.get("stage", trainer.stage.name) != trainer.stage.name:
        raise TrainingError(
            f"{path}: a state of stage {meta['stage']!r}, found in the "
            f"{trainer.stage.name!r} folder; {remedy}"
        )
    _compare_settings(trainer, meta, path)
    _check_tensors(trainer, tensors, path, step)
    _apply(trainer, tensors, meta, path)
    trainer.step = step


def _step(meta: dict, path: Path, remedy: str) -> int:
    text = meta.get("step")
    if text is None or not text.isdigit():
        found = "no 'step'" if text is None else f"step {text!r}"
        raise TrainingError(
            f"{path}: {found} in its metadata, so not a state sd-train wrote; {remedy}"
        )
    return int(text)


def _saved_config(meta: dict, path: Path) -> dict:
    try:
        saved = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise TrainingError(f"{path}: unreadable 'config' metadata; delete it to start again")
    return saved


def _compare_settings(trainer, meta: dict, path: Path) -> None:
    """Another architecture is an error; another seed, learning rate or batch a warning."""
    saved = _saved_config(meta, path)
    now = json.loads(json.dumps(dataclasses.asdict(trainer.config)))  # as the file has it
    for part, source in trainer.stage.sources.items():
        if source == FRESH and part in saved and saved[part] != now[part]:
            raise TrainingError(
                f"{path}: the recipe's {part} ({now[part]}) is not the architecture this run "
                f"was started with ({saved[part]}); resume with the recipe it was started "
                "with, or start a new run in another --out folder"
            )
    lr_name, batch_name = trainer.stage.settings
    saved["world"], now["world"] = meta.get("world", trainer.dist.world), trainer.dist.world
    # The steps are a function of the global batch (per process x accumulation x processes),
    # not of how it is split: resuming on another number of processes with the same global
    # batch continues the same run.
    for values in (saved, now):
        try:
            per = values.get(batch_name) or values["batch_size"]
            values["global_batch"] = int(per) * int(values["grad_accum"]) * int(values["world"])
        except (KeyError, TypeError, ValueError):
            values["global_batch"] = None
    for k in ("seed", lr_name, "global_batch", "network_alpha"):
        if k in saved and str(saved[k]) != str(now[k]):
            log.warning(
                "%s: resuming with %s=%s, but the run was started with %s=%s: the remaining "
                "steps will differ from an uninterrupted run", path, k, now[k], k, saved[k],
            )  # fmt: skip


def _check_tensors(trainer, tensors: dict, path: Path, step: int) -> None:
    expected = {f"param.{k}": p for k, p in trainer.params.items()}
    if trainer.ema is not None:
        expected.update({f"ema.{k}": v for k, v in trainer.ema.shadow.items()})
    expected["rng.torch"] = torch.get_rng_state()
    for key, like in expected.items():
        found = tensors.get(key)
        if found is None or tuple(found.shape) != tuple(like.shape):
            what = "no" if found is None else f"shape {tuple(found.shape)} for"
            raise TrainingError(
                f"{path}: {what} {key!r} (the model has {tuple(like.shape)}): it was written "
                "for other models (another recipe, checkpoint or --train-text-encoder); "
                "resume with the settings it was started with, or delete it to start again"
            )
        if found.is_floating_point() and not bool(torch.isfinite(found).all()):
            raise TrainingError(
                f"{path}: the weights saved at step {step} are not finite ({key!r} holds NaN "
                "or inf); delete it to run this stage again from step 0"
            )


def _apply(trainer, tensors: dict, meta: dict, path: Path) -> None:
    with torch.no_grad():
        for k, p in trainer.params.items():
            p.copy_(tensors[f"param.{k}"])
    state = {}
    for i, name in enumerate(trainer.params):
        st = {key: tensors[f"optim.{key}.{name}"] for key in ("step", "exp_avg", "exp_avg_sq")
              if f"optim.{key}.{name}" in tensors}  # fmt: skip
        if st:
            state[i] = st
    opt = trainer.optimizer.state_dict()
    opt["state"] = state
    try:
        trainer.optimizer.load_state_dict(opt)
        scaler = json.loads(meta.get("scaler", "{}"))
        if scaler:
            trainer.scaler.load_state_dict(scaler)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise TrainingError(
            f"{path}: unusable optimizer state ({e}); delete it to start again"
        ) from None
    if trainer.ema is not None:
        for k in trainer.ema.shadow:
            trainer.ema.shadow[k].copy_(tensors[f"ema.{k}"])
    torch.set_rng_state(tensors["rng.torch"])


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the last checkpoint), and any line that is
    not a log entry (a run killed while appending leaves half a line)."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry_step = entry["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s: line %d is not a log entry (%.40r...); dropped", path, n, line)
            continue
        if isinstance(entry_step, int) and entry_step <= step:
            keep.append(line)
    with replacing(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))
