"""Where generated images go: a file, or a folder of numbered files, written all or nothing.

- A folder (an existing one, or a path ending in ``/`` or without a suffix) receives files
  named ``00012-<seed>.png`` as AUTOMATIC1111 names them, numbered after the highest number
  already there, so nothing is ever overwritten.
- A file path receives the image (``name-1.png``, ``name-2.png``, ... for a batch); an
  existing file is overwritten only when asked.
- Writing is checked before any work starts (the folder can be created and written to), and
  every file is first written to a temporary name, then renamed into place: an error leaves
  no partial or half-written output.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sd_pipeline.metadata import save_image

_NUMBERED = re.compile(r"^(\d+)-")


class OutputError(ValueError):
    """An output path that cannot be written."""


def is_folder_target(target: str | os.PathLike) -> bool:
    text = os.fspath(target)
    path = Path(text)
    return path.is_dir() or text.endswith(("/", os.sep)) or path.suffix == ""


def plan_outputs(
    target: str | os.PathLike,
    seeds: Sequence[int | None],
    *,
    overwrite: bool = False,
    suffix: str = ".png",
) -> list[Path]:
    """The paths for ``len(seeds)`` images, checked to be writable (a missing folder is only
    created when writing)."""
    count = len(seeds)
    if is_folder_target(target):
        folder = Path(target)
        _ensure_writable_folder(folder)
        start = next_number(folder) if folder.is_dir() else 0
        names = [
            f"{start + i:05d}-{seed if seed is not None else 'x'}{suffix}"
            for i, seed in enumerate(seeds)
        ]
        return [folder / name for name in names]
    path = Path(target)
    if path.suffix.lower() not in Image.registered_extensions():
        raise OutputError(f"{path}: unknown image file type {path.suffix!r}; use .png")
    _ensure_writable_folder(path.parent if str(path.parent) else Path("."))
    if count == 1:
        paths = [path]
    else:
        paths = [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]
    if not overwrite:
        existing = [str(p) for p in paths if p.exists()]
        if existing:
            raise OutputError(
                f"{existing[0]} already exists; choose another name, a folder, or --overwrite"
            )
    return paths


def next_number(folder: Path) -> int:
    """One more than the highest ``NNNNN-`` number of the files in ``folder`` (0 if none)."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def write_outputs(
    images: Sequence[Image.Image], paths: Sequence[Path], *, overwrite: bool = False
) -> list[Path]:
    """Write every image or none: each to a temporary file first, then all renamed into place.

    A numbered file that appeared meanwhile is never replaced (the rename fails and everything
    written so far is removed).
    """
    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images for {len(paths)} paths")
    staged: list[Path] = []
    placed: list[Path] = []
    try:
        for image, path in zip(images, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".sd-generate-", dir=path.parent))
            staged.append(staging)
            save_image(image, staging / path.name, image.info.get("parameters"))
        for staging, path in zip(staged, paths):
            _place(staging / path.name, path, overwrite)
            placed.append(path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for staging in staged:
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    return list(paths)


def _place(source: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(source, path)
        return
    try:
        os.link(source, path)  # fails if path exists: never overwrites
    except FileExistsError:
        raise OutputError(f"{path} appeared while generating; not overwriting it") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise OutputError(f"{path} already exists; not overwriting it") from None
        os.replace(source, path)
        return
    source.unlink()


def _ensure_writable_folder(folder: Path) -> None:
    """Check that ``folder`` exists and takes files, or could be created (nothing is created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to {folder}: {existing} exists and is not a folder")
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write to {folder}: {existing} is not writable")
        return
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {folder}: {e.strerror or e}") from e
