"""Where generated images go: a file, or a folder of numbered files, written all or nothing.

- A folder (an existing one, or a path ending in ``/`` or without a suffix) receives files
  named ``00012-<seed>.png`` as AUTOMATIC1111 names them, numbered after the highest number
  already there, so nothing is ever overwritten. The numbers are claimed when the images are
  written, under a lock on the folder, so that runs writing into one folder at once each get
  their own numbers and keep every image (:func:`write_outputs` returns the real paths).
- A file path receives the image (``name-1.png``, ``name-2.png``, ... for a batch); an
  existing file is overwritten only when asked.
- Writing is checked before any work starts (the folder can be created and written to), and
  every file is first written to a hidden staging folder, then linked into place: an error or
  an interrupt (Ctrl-C, SIGTERM) leaves no partial or half-written output, and what a killed
  run left behind is removed by the next run into that folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from sd_pipeline.files import (
    WriteError,
    locked_folder,
    remove_stale_temporaries,
    staging_folder,
)
from sd_pipeline.metadata import save_image

_NUMBERED = re.compile(r"^(\d+)-")


class _NumberedPath(type(Path())):
    """A planned file of a numbered folder: its number is only a guess until written."""


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
        return [_NumberedPath(folder, name) for name in names]
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
    """Write every image or none; return the paths written.

    Each image is saved into a hidden staging folder beside its target first; only when all
    are saved are they linked into place, and an error or interrupt then removes what was
    placed. The files of a numbered folder (from :func:`plan_outputs`) take the next free
    numbers at that moment, under a lock on the folder, so the returned names can differ from
    the planned ones when other runs wrote there meanwhile. Any other file that appeared
    meanwhile is never replaced (unless ``overwrite``). Write errors name the target path.
    """
    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images for {len(paths)} paths")
    paths = [Path(p) if not isinstance(p, Path) else p for p in paths]
    folders = sorted({p.parent for p in paths}, key=str)
    placed: list[Path] = []
    with contextlib.ExitStack() as stack:
        stagings = {}
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temporaries(folder)
                stagings[folder] = stack.enter_context(staging_folder(folder))
            except OSError as e:
                raise WriteError(folder, e) from e
        staged = []
        for i, (image, path) in enumerate(zip(images, paths)):
            source = stagings[path.parent] / f"{i:05d}{path.suffix}"
            try:
                save_image(image, source, image.info.get("parameters"))
            except OSError as e:
                raise WriteError(path, e) from e
            staged.append(source)
        try:
            for folder in folders:
                stack.enter_context(locked_folder(folder))
            for source, path in zip(staged, paths):
                placed.append(_place(source, path, overwrite))
        except BaseException:
            for path in placed:
                path.unlink(missing_ok=True)
            raise
    return placed


def _place(source: Path, path: Path, overwrite: bool) -> Path:
    """Move ``source`` to ``path`` (a numbered one: to the next free number); return where."""
    if isinstance(path, _NumberedPath):
        number, rest = path.name.split("-", 1)
        number = max(int(number), next_number(path.parent))
        while True:
            target = path.parent / f"{number:05d}-{rest}"
            try:
                _link(source, target)
                return target
            except FileExistsError:  # a writer that does not take the folder's lock
                number = max(number + 1, next_number(path.parent))
    if overwrite:
        try:
            os.replace(source, path)
        except OSError as e:
            raise WriteError(path, e) from e
        return path
    try:
        _link(source, path)
    except FileExistsError:
        raise OutputError(f"{path} appeared while generating; not overwriting it") from None
    return path


# link(2)'s answers on a file system without hard links (FAT, some network shares).
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def _link(source: Path, path: Path) -> None:
    """Give ``source`` the name ``path``, failing with ``FileExistsError`` if it is taken."""
    try:
        os.link(source, path)  # fails if path exists: never overwrites
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise WriteError(path, e) from e
        # No hard links here: a rename, checked first (under the folder's lock, other runs
        # are not racing it).
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        try:
            os.rename(source, path)
        except OSError as e2:
            raise WriteError(path, e2) from e2
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
