"""The files the server offers: checkpoints (``--checkpoint``, ``--models-dir``, the bundled
model), LoRAs and embeddings, named as AUTOMATIC1111 names them in its lists."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sd_pipeline import StableDiffusion

__all__ = ["BUNDLED", "Catalog", "Checkpoint", "ModelInfo", "ModelSpec"]

log = logging.getLogger(__name__)

BUNDLED = "sd-pipeline-shapes"  # the title of the model that ships inside sd-pipeline
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class Checkpoint:
    """One model the server can load. ``path`` None: the bundled model."""

    title: str  # what /sd-models and sd_model_checkpoint call it
    path: Path | None

    @property
    def model_name(self) -> str:
        return Path(self.title).stem if self.path is not None else self.title

    def matches(self, name: str) -> bool:
        """AUTOMATIC1111 clients name a model by its title (``x.safetensors [hash]``), its
        name or its file name."""
        name = name.strip()
        bare = name.split(" [")[0] if name.endswith("]") else name
        names = {self.title, self.model_name}
        if self.path is not None:
            names |= {self.path.name, str(self.path)}
        return name in names or bare in names

    def load(self, device: str | None, dtype: str | None) -> StableDiffusion:
        if self.path is None:
            pipe = StableDiffusion.default(device=device, dtype=dtype)
        else:
            pipe = StableDiffusion.from_checkpoint(self.path, device=device, dtype=dtype)
        # The file's hash (seconds for a 4 GB file the first time; cached on disk after) is
        # computed here, while loading, not in the event loop when /options first asks.
        _ = pipe.model_hash
        return pipe


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load the served model, picklable so that a worker process
    loads its own copy: the checkpoint, where and how, and what to equip it with."""

    checkpoint: Checkpoint
    device: str | None = None
    dtype: str | None = None
    lora_dir: Path | None = None
    embeddings: tuple[Path, ...] = ()

    def on(self, device: str | None) -> ModelSpec:
        return replace(self, device=device)

    def load(self) -> StableDiffusion:
        return self.equip(self.checkpoint.load(self.device, self.dtype))

    def equip(self, pipe: StableDiffusion) -> StableDiffusion:
        """Give a (newly loaded) pipeline the LoRA folder (for ``<lora:...>`` in prompts) and
        the embeddings; an embedding that does not load is logged."""
        pipe.lora_dir = self.lora_dir
        for path in self.embeddings:
            try:
                pipe.load_embeddings(path)
            except (ValueError, OSError) as e:
                log.warning("embedding %s not loaded: %s", path, e)
        return pipe


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP side knows of the loaded model: enough to check a request and answer the
    lists and options, without holding the model (worker processes hold it)."""

    name: str | None
    model_hash: str | None
    sha256: str | None
    defaults: dict[str, Any]
    native_size: int
    scale: int
    lora_dir: Path | None
    clip_layers: int
    text_width: int
    device: Any  # torch.device of the pipeline (ControlNets load there in one process)
    dtype: Any
    # trigger word -> (the widths it fits, its vectors)
    embeddings: dict[str, tuple[tuple[int, ...], int]]

    @classmethod
    def of(cls, pipe: StableDiffusion) -> ModelInfo:
        return cls(
            name=pipe.name,
            model_hash=pipe.model_hash,
            sha256=pipe.sha256,
            defaults=dict(pipe.defaults),
            native_size=pipe.native_size,
            scale=pipe.scale,
            lora_dir=pipe.lora_dir,
            clip_layers=pipe.text_encoder.config.layers,
            text_width=pipe.text_encoder.config.width,
            device=pipe.device,
            dtype=pipe.dtype,
            embeddings={k: (tuple(e.widths), e.num_vectors) for k, e in pipe.embeddings.items()},
        )


class Catalog:
    """What is on disk, listed again by :meth:`refresh` (``/refresh-checkpoints``)."""

    def __init__(
        self,
        checkpoint: Path | None = None,
        models_dir: Path | None = None,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
    ):
        self.checkpoint, self.models_dir = checkpoint, models_dir
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.checkpoints: list[Checkpoint] = []
        self.refresh()

    def refresh(self) -> None:
        found = []
        if self.checkpoint is not None:
            found.append(Checkpoint(self.checkpoint.name, self.checkpoint))
        for path in _files(self.models_dir, CHECKPOINT_SUFFIXES):
            if self.checkpoint is None or path.resolve() != self.checkpoint.resolve():
                found.append(Checkpoint(path.relative_to(self.models_dir).as_posix(), path))
        found.append(Checkpoint(BUNDLED, None))
        self.checkpoints = found

    @property
    def initial(self) -> Checkpoint:
        """The model to start with: ``--checkpoint``, else the bundled one."""
        return self.checkpoints[0]

    def find(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.matches(name)), None)

    def loras(self) -> list[Path]:
        return _files(self.lora_dir, LORA_SUFFIXES)

    def embeddings(self) -> list[Path]:
        return _files(self.embeddings_dir, EMBEDDING_SUFFIXES)

    def spec(self, checkpoint: Checkpoint, device: str | None, dtype: str | None) -> ModelSpec:
        """How to load ``checkpoint`` with this catalog's LoRA folder and embeddings."""
        return ModelSpec(checkpoint, device, dtype, self.lora_dir, tuple(self.embeddings()))


def _files(folder: Path | None, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` with one of ``suffixes``, sorted; none when it is not a folder."""
    if folder is None or not folder.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if f.lower().endswith(suffixes)]
    return found
