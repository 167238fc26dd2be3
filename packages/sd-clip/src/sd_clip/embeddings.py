"""Textual-inversion embeddings: learned token vectors that a trigger word in a prompt stands for.

Read as AUTOMATIC1111 reads them (``modules/textual_inversion/textual_inversion.py``):

- ``.pt`` (AUTOMATIC1111 and the original textual-inversion code): a dict whose
  ``string_to_param`` holds one tensor (vectors x width), under ``"*"``;
- ``.safetensors`` with one tensor, ``emb_params`` (kohya's trainer) or any other name;
- ``.bin`` (diffusers): ``{token: tensor}`` with one entry, a single vector may be 1-d;
- SDXL embeddings (``.safetensors`` or ``.pt``) with ``clip_l`` and ``clip_g``: one tensor per
  text encoder; each encoder takes the one of its width.

The file name without its extension is the trigger word (``easynegative.safetensors`` ->
``easynegative``); the tokenizer matches it as tokens, so case does not matter. Pickles are
opened with ``torch.load(weights_only=True)``: a file that would run code is refused. Whether an
embedding fits a text encoder is checked when a prompt uses it (see ``Embedding.vectors_for``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sd_clip._checkpoint import CheckpointError

__all__ = ["Embedding", "load_embedding", "load_embeddings", "ti_hashes"]

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL's two text encoders: CLIP ViT-L (768) and OpenCLIP bigG


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding.

    ``tensors`` maps a text encoder's key to its vectors (vectors x width): ``{"*": t}`` for a
    single-encoder embedding, ``{"clip_l": ..., "clip_g": ...}`` for SDXL. ``sha256`` is the
    file's hash (``None`` for one built in memory); ``shorthash`` its first 12 hex digits,
    what AUTOMATIC1111 writes in ``TI hashes``.
    """

    name: str
    tensors: Mapping[str, torch.Tensor]
    path: Path | None = None
    sha256: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.tensors, torch.Tensor):
            object.__setattr__(self, "tensors", {"*": self.tensors})
        where = self.path or self.name
        tensors = {}
        for key, t in self.tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim not in (1, 2):
                raise CheckpointError(
                    f"{where}: embedding tensor {key!r} must be a float tensor (vectors x width), "
                    f"got {_describe(t)}"
                )
            tensors[key] = t.reshape(1, -1) if t.ndim == 1 else t  # as given: may be trained
        counts = {t.shape[0] for t in tensors.values()}
        if not tensors or len(counts) != 1 or 0 in counts:
            raise CheckpointError(
                f"{where}: an embedding needs one or more vectors, the same number for each text "
                f"encoder; got { ({k: tuple(t.shape) for k, t in tensors.items()}) }"
            )
        object.__setattr__(self, "tensors", tensors)

    @property
    def num_vectors(self) -> int:
        """How many token positions the embedding takes in a prompt."""
        return next(iter(self.tensors.values())).shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(t.shape[1] for t in self.tensors.values())

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:12] if self.sha256 else None

    def vectors_for(self, width: int) -> torch.Tensor:
        """The vectors for a text encoder of this width; a clear error if the file has none."""
        for t in self.tensors.values():
            if t.shape[1] == width:
                return t
        have = " or ".join(str(w) for w in self.widths)
        raise ValueError(
            f"embedding {self.name!r} ({self.path or 'in memory'}) has vectors {have} wide, but "
            f"this text encoder is {width} wide: the embedding was trained for another model "
            "(SD 1.x: 768, SD 2.x: 1024, SDXL: clip_l 768 + clip_g 1280)"
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(t.shape)}" for k, t in self.tensors.items())
        return f"Embedding({self.name!r}, {{{shapes}}}, shorthash={self.shorthash!r})"


def ti_hashes(embeddings: Iterable[Embedding]) -> str:
    """The ``TI hashes`` value AUTOMATIC1111 writes in an image's parameters.

    ``name: shorthash`` for each embedding, in the order given, each name once (AUTOMATIC1111
    drops ``:`` and ``,`` from names); embeddings without a file hash are left out. For a
    prompt, give its embeddings in the order its chunks use them:
    ``[slot.embedding for chunk in chunks for slot in chunk.embedding_slots]``.
    """
    seen: dict[str, str] = {}
    for embedding in embeddings:
        if embedding.shorthash and embedding.name not in seen:
            seen[embedding.name] = embedding.shorthash
    return ", ".join(
        f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in seen.items()
    )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def load_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read one embedding file (``.pt``, ``.bin`` or ``.safetensors``); the trigger word is
    ``name``, or the file name without its extension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embedding file")
    tensors = {key: t.detach() for key, t in _vectors(_read(path), path).items()}
    return Embedding(name or path.stem, tensors, path=path, sha256=_file_sha256(path))


def load_embeddings(folder: str | os.PathLike) -> dict[str, Embedding]:
    """Every embedding in a folder and its subfolders, by trigger word (the file name's stem).

    As in AUTOMATIC1111, a file that cannot be read is left out with a warning naming it and
    why, empty files and other suffixes (preview images) are skipped, and the names are sorted.
    Two files with the same stem: the first in path order is kept, with a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such embeddings folder")
    found: dict[str, Embedding] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
            continue
        if path.stat().st_size == 0:
            continue
        if path.stem in found:
            logger.warning(
                "embedding %s: the name %r is already taken by %s; this file is left out",
                path,
                path.stem,
                found[path.stem].path,
            )
            continue
        try:
            found[path.stem] = load_embedding(path)
        except (CheckpointError, ValueError, OSError) as error:
            logger.warning("embedding %s left out: %s", path, error)
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def _read(path: Path):
    """The file's contents: safetensors as a dict of tensors, pickles through weights_only."""
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        with _safe_parameter_dict():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks to run code or build objects other than "
            f"tensors{' (' + why[0] + ')' if why else ''}; convert it to .safetensors from a "
            "trusted source"
        ) from e
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise CheckpointError(f"{path}: not a readable embedding file ({e})") from e


class _safe_parameter_dict:
    """Let weights_only unpickle ``torch.nn.ParameterDict``, in which the original
    textual-inversion code (and old AUTOMATIC1111 versions) stored ``string_to_param``; it
    builds a container of tensors and runs no code of the file's."""

    def __enter__(self):
        safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        self._ctx = safe_globals([torch.nn.ParameterDict]) if safe_globals else nullcontext()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _vectors(data, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an embedding file's contents, in AUTOMATIC1111's order of formats."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds {_describe(data)}, not an embedding")
    if "string_to_param" in data:  # AUTOMATIC1111 / textual_inversion .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # a pickled ParameterDict
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError(
                f"{path}: string_to_param must hold exactly one tensor, got "
                f"{len(params) if isinstance(params, Mapping) else _describe(params)}"
            )
        return {"*": next(iter(params.values()))}
    if all(key in data for key in SDXL_KEYS):  # SDXL: one tensor per text encoder
        return {key: data[key] for key in SDXL_KEYS}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers {token: tensor}, kohya {"emb_params": tensor}
        return {"*": next(iter(tensors.values()))}
    raise CheckpointError(
        f"{path}: not an embedding: expected string_to_param (.pt), one tensor such as "
        f"emb_params (.safetensors) or {{token: tensor}} (.bin), or clip_l and clip_g (SDXL); "
        f"found keys {sorted(map(str, data))[:8]}"
    )


def _file_sha256(path: Path) -> str:
    """The SHA-256 of the whole file, as AUTOMATIC1111's ``hashes.sha256`` for embeddings."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
