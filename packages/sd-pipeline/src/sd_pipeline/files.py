"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

Every file sd-pipeline writes (images, checkpoints, training state, caches) goes through
:func:`replacing`: the data goes to a hidden temporary file beside the target, which is renamed
onto it only once complete (``os.replace`` is atomic within a folder).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

__all__ = ["new_file_mode", "replacing", "save_safetensors"]


def new_file_mode() -> int:
    """The mode of a newly created file under this process's umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """A file object on a temporary file beside ``path``, renamed onto it (with a new file's
    mode: mkstemp makes it private) when the block ends, removed if the block fails.

    The temporary file is named ``.<name>.<random>.tmp`` so that a later run can recognise and
    remove what a killed one left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file atomically (see :func:`replacing`)."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: this writes safetensors; use a '.safetensors' file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = save(data, metadata=dict(metadata) if metadata else None)
    try:
        with replacing(path) as f:
            f.write(blob)
    except OSError as e:
        raise OSError(e.errno, f"{path}: could not write ({e.strerror or e})") from e
    return path
