"""Reading and writing files so that odd inputs never hang a run, and a crash, a kill or a full
disk never leaves a half-written or orphaned file behind.

- Every file sd-pipeline writes (images, checkpoints, training state, caches) goes through
  :func:`replacing`: the data goes to a hidden temporary file beside the target, which is
  renamed onto it only once complete (``os.replace`` is atomic within a folder).
- A temporary file or staging folder carries the writer's process id in its name
  (``.<name>.<pid>-<random>.tmp``, ``.sd-generate-<pid>-<random>``) and stays ``flock``-ed
  while in use; :func:`remove_stale_temporaries` removes the ones whose writer is gone, so the
  next run into a folder clears what a killed one left.
- :func:`open_regular` opens an input file without ever blocking: a FIFO, a socket or a device
  given as an image is refused at once (opening a FIFO for reading waits for a writer).
- :func:`handle_sigterm` turns SIGTERM into ``KeyboardInterrupt``, so that ``kill``, systemd
  and ``docker stop`` clean up exactly as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

try:  # POSIX; elsewhere nothing is locked and no stale file is removed
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

if TYPE_CHECKING:
    import torch

__all__ = [
    "STAGING_PREFIX",
    "handle_sigterm",
    "locked_folder",
    "new_file_mode",
    "open_regular",
    "remove_stale_temporaries",
    "replacing",
    "save_safetensors",
    "staging_folder",
]

log = logging.getLogger(__name__)

STAGING_PREFIX = ".sd-generate-"
# What this module names its temporary files and staging folders (mkstemp/mkdtemp add 8
# characters of [a-z0-9_]); nothing else in a folder is ever removed.
_TEMP_FILE = re.compile(r"^\..+\.(\d+)-[a-z0-9_]{8}\.tmp$")
_STAGING = re.compile(r"^" + re.escape(STAGING_PREFIX) + r"(\d+)-[a-z0-9_]{8}$")
# Staging folders of versions that did not record the pid: removed once clearly abandoned
# (a run places its images seconds after staging them).
_OLD_STAGING = re.compile(r"^" + re.escape(STAGING_PREFIX) + r"[a-z0-9_]{8}$")
_OLD_STAGING_AGE_S = 3600


class WriteError(OSError):
    """Writing ``path`` failed; ``str()`` names the path and the system's reason."""

    def __init__(self, path: str | os.PathLike, error: OSError | str):
        reason = error if isinstance(error, str) else describe_error(error)
        code = None if isinstance(error, str) else error.errno
        super().__init__(code, f"cannot write {path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)


def describe_error(error: OSError) -> str:
    """The system's reason for an ``OSError``, without the repeated file name."""
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason)
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if isinstance(error, PermissionError):
        return "permission denied"
    return error.strerror or str(error) or type(error).__name__


def new_file_mode() -> int:
    """The mode of a newly created file under this process's umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _lock(fd: int) -> None:
    """Hold an exclusive ``flock`` on ``fd`` (released when its last descriptor closes), so
    that :func:`remove_stale_temporaries` in another process leaves the file alone."""
    if fcntl is None:
        return
    with contextlib.suppress(OSError):  # a file system without locks: the pid check remains
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """A file object on a temporary file beside ``path``, renamed onto it (with a new file's
    mode: mkstemp makes it private) when the block ends, removed if the block fails.

    The temporary file is named ``.<name>.<pid>-<random>.tmp`` and locked until renamed, so that
    :func:`remove_stale_temporaries` can tell what a killed run left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    _lock(fd)
    try:
        # A second descriptor keeps the lock until after the rename; the file object's own
        # closes when the block ends.
        with os.fdopen(os.dup(fd), mode, **kwargs) as f:
            yield f
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A new hidden folder ``.sd-generate-<pid>-<random>`` inside ``folder``, locked while the
    block runs and removed (with the files left in it) when it ends."""
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    fd = os.open(staging, os.O_RDONLY)
    _lock(fd)
    try:
        yield staging
    finally:
        try:
            _remove_folder_of_files(staging)
        finally:
            os.close(fd)


def _remove_folder_of_files(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) or entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    os.rmdir(folder)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself while the block runs: processes that
    number files in one folder take turns (nothing is created; a file system without locks
    runs unlocked)."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        _wait_for_lock(fd, folder)
        yield
    finally:
        os.close(fd)  # releases the lock


# A run holds a folder's lock for the milliseconds its placement takes; one that holds it for
# longer is stopped or hung, and the others go on without it (links still never overwrite).
_LOCK_WAIT_S = 60.0


def _wait_for_lock(fd: int, folder) -> None:
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("%s: another process holds its lock; writing without it", folder)
                return
            time.sleep(0.02)
        except OSError:  # a file system without locks
            return


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _unlocked(path: str) -> bool | None:
    """Whether nobody holds ``path``'s lock (True), somebody does (False), or locks do not
    work here (None). A free lock is taken, and dropped when the descriptor closes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and staging folders that sd-pipeline processes which no
    longer run left in ``folder`` (a kill, a crash, a power cut); return what was removed.

    Only names this module makes are considered, and one is removed only when the process
    named in it is gone and nobody holds its lock: a live run's files (in another container
    with its own process ids, too) are never touched. A failure to remove one is ignored.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if fcntl is None or not folder.is_dir():
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not _stale(entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                _remove_folder_of_files(Path(entry.path))
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError as e:
            log.debug("left %s in place: %s", entry.path, e)
    if removed:
        log.info("removed %d file(s) left by interrupted runs in %s", len(removed), folder)
    return removed


def _stale(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is one of our temporary files or staging folders, abandoned."""
    name = entry.name
    if ((match := _TEMP_FILE.match(name)) and entry.is_file(follow_symlinks=False)) or (
        (match := _STAGING.match(name)) and entry.is_dir(follow_symlinks=False)
    ):
        pid = int(match.group(1))
    elif _OLD_STAGING.match(name) and entry.is_dir(follow_symlinks=False):
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > _OLD_STAGING_AGE_S
    else:
        return False
    return not _pid_running(pid) and _unlocked(entry.path) is not False


# ---------------------------------------------------------------------------- reading


def open_regular(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading, refusing at once (never blocking) anything that is
    not a regular file: a FIFO, a socket, a device, a folder.

    Errors are ``FileNotFoundError`` / ``PermissionError`` / ``ValueError`` whose message names
    the path and says what it is (``what`` names the expected kind: "image file").
    """
    text = os.fspath(path)
    try:
        info = os.stat(text)
    except FileNotFoundError:
        if os.path.islink(text):
            target = os.readlink(text)
            raise FileNotFoundError(
                f"{text}: a broken symbolic link (to {target}, which does not exist)"
            ) from None
        raise FileNotFoundError(f"{text}: no such {what}") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{text}: no such {what} (a part of the path is a file)") from None
    except PermissionError:
        raise PermissionError(
            errno.EACCES, f"{text}: permission denied (a folder on the way is not readable)"
        ) from None
    _check_regular(text, info.st_mode, what)
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, opening it still
        # returns at once (and the check below refuses it).
        fd = os.open(text, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise PermissionError(
            errno.EACCES, f"{text}: permission denied (the file exists but cannot be read)"
        ) from None
    except OSError as e:
        raise ValueError(f"{text}: cannot be opened ({describe_error(e)})") from None
    try:
        _check_regular(text, os.fstat(fd).st_mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def _check_regular(path: str, mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise ValueError(f"{path} is {kind}, not a regular file; give {article} {what}")


# ---------------------------------------------------------------------------- signals


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def handle_sigterm() -> None:
    """From now on SIGTERM raises ``KeyboardInterrupt`` (as Ctrl-C's SIGINT does), so that a
    terminated run removes its temporary files and partial outputs on the way out.

    Only in the main thread, and only where SIGTERM still has its default action (an
    application's own handler is left in place).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


# ---------------------------------------------------------------------------- safetensors


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
