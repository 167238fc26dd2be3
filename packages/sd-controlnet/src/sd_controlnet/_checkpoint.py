# Copied from sd_vae._checkpoint: edit the source, then copy it here (lint checks that the copies match).
"""Reading and writing weight files: the one private helper every component package shares.

Each component package (sd-vae, sd-clip, sd-unet) keeps an identical copy of this module, so
that none depends on another; lint fails if a copy drifts from this one (the source).

What it knows about:
- safetensors files, opened lazily so that only the tensors under one key prefix are read;
- pickled checkpoints (``.ckpt``/``.pt``/``.bin``), opened with ``weights_only=True`` (a file
  that tries to run code is refused) and unwrapped from their ``state_dict`` wrapper;
- diffusers folders (``config.json`` + weights), or a model root holding one such subfolder.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


class CheckpointError(ValueError):
    """A weight file that cannot be read, or does not hold what was asked of it."""


def _is_safetensors(path: Path) -> bool:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return True
    if path.suffix in PICKLE_SUFFIXES:
        return False
    # Unknown suffix: a safetensors file starts with an 8-byte header length, then '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """The tensor names in a weight file, without reading any tensor of a safetensors file."""
    path = _existing_file(path)
    if _is_safetensors(path):
        with _open_safetensors(path) as f:
            return list(f.keys())
    return list(_load_pickle(path).keys())


def load_tensors(
    path: str | os.PathLike,
    prefix: str = "",
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Read the tensors whose names start with ``prefix`` and return them with it stripped.

    A safetensors file is read lazily: tensors outside the prefix are never loaded. With
    ``channels_last`` (for a model that runs in that layout on the CPU) the tensors are read into
    memory of their own, 4-d ones (convolution weights) straight into channels_last (see
    ``_read_owned``).
    """
    path = _existing_file(path)
    if channels_last and _is_safetensors(path) and str(device) == "cpu":
        return _read_owned(path, prefix)
    if _is_safetensors(path):
        with _open_safetensors(path) as f:
            names = [k for k in f.keys() if k.startswith(prefix)]
            try:
                tensors = {k[len(prefix) :]: f.get_tensor(k) for k in names}
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(
                    f"{path}: cannot read tensors ({e}); is the file truncated?"
                ) from e
    else:
        state = _load_pickle(path)
        tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def _read_owned(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of a .safetensors file, copied (not left memory-mapped) into
    memory of their own: only their bytes are read, and once the model holds them no mapping of
    the file stays resident. Each is copied from a private mapping of its own bytes, unmapped
    once copied: a copy that runs on torch's threads, and that puts 4-d tensors (convolution
    weights) straight into channels_last, with no second copy (SD 1.5's pipeline: 3.7 s to load
    with the layout changed after reading, 2.7 s through a read buffer, 1.9 s this way)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        start, file_size = 8 + size, os.fstat(f.fileno()).st_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__" or not name.startswith(prefix):
                continue
            if info["dtype"] not in _DTYPES:
                return load_tensors(path, prefix)  # e.g. float8: let safetensors do it
            begin, end = (start + offset for offset in info["data_offsets"])
            if end > file_size:  # (a mapping past the end would crash on reading)
                raise CheckpointError(f"{path}: cannot read {name!r}; is the file truncated?")
            shape = info["shape"]
            layout = torch.channels_last if len(shape) == 4 else None
            tensor = torch.empty(shape, dtype=_DTYPES[info["dtype"]], memory_format=layout)
            if end - begin != tensor.nbytes:
                raise CheckpointError(
                    f"{path}: {name!r} holds {end - begin} bytes, not the {tensor.nbytes} of "
                    f"its shape {shape} and dtype {info['dtype']}; is the file damaged?"
                )
            if end > begin:
                _copy_mapped(f, begin, end, tensor)
            tensors[name[len(prefix) :]] = tensor
    return tensors


def _copy_mapped(f, begin: int, end: int, tensor: torch.Tensor) -> None:
    """Copy the file's bytes ``begin .. end - 1`` (a contiguous tensor of ``tensor``'s shape and
    dtype) into ``tensor``, whatever its layout, through a private mapping of those bytes."""
    first = begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(f.fileno(), end - first, offset=first, access=mmap.ACCESS_COPY) as window:
        count = (end - begin) // tensor.element_size()
        source = torch.frombuffer(window, dtype=tensor.dtype, count=count, offset=begin - first)
        tensor.copy_(source.view(tensor.shape))
        del source  # the mapping closes only once no tensor views it


def pick_prefix(keys: Iterable[str], prefixes: Iterable[str], probe: str) -> str | None:
    """The first of ``prefixes`` under which ``probe`` (a key this component always has) exists.

    ``""`` in ``prefixes`` stands for a bare component file. Returns None if none matches.
    """
    keys = set(keys)
    for prefix in prefixes:
        if prefix + probe in keys:
            return prefix
    return None


def find_diffusers_folder(path: Path, subfolder: str) -> Path | None:
    """The diffusers component folder at ``path`` (or ``path/subfolder``), or None."""
    for folder in (path, path / subfolder):
        if (folder / "config.json").is_file() and diffusers_weight_file(folder) is not None:
            return folder
    return None


def diffusers_weight_file(folder: Path) -> Path | None:
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from e


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    source: str,
    ignore: Iterable[str] = (),
) -> None:
    """Raise a CheckpointError naming the first missing, unexpected or mis-shaped key."""
    ignore = tuple(ignore)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not k.endswith(ignore)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
        raise CheckpointError(f"{source}: keys do not fit the model: " + ", ".join(parts))
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: shape mismatch at {k!r}: the model expects {tuple(v.shape)}, "
                f"the file has {tuple(found[k].shape)}"
            )


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically (a crash leaves no partial file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save writes safetensors; use a '.safetensors' file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=dict(metadata) if metadata else None)
        os.chmod(tmp, file_mode())  # mkstemp makes it private; give it a new file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_mode() -> int:
    """The mode of a newly created file under this process's umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weight file")
    return path


class _open_safetensors:
    """``safe_open`` with errors that name the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self._ctx = safe_open(str(self.path), framework="pt", device="cpu")
            return self._ctx.__enter__()
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: not a readable safetensors file ({e}); is it truncated? "
                "Expected a complete .safetensors, .ckpt, .pt or .bin checkpoint"
            ) from e

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as e:
        why = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks to run code or build objects other than "
            f"tensors{' (' + why[0] + ')' if why else ''}. "
            "Convert it to .safetensors from a trusted source."
        ) from e
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({e}); expected a .safetensors, .ckpt, .pt or "
            ".bin file; is it truncated?"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
