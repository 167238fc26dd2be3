# Copied from sd_vae._checkpoint: edit the source, then copy it here (lint checks that the copies match).
"""Reading and writing weight files: the one private helper every component package shares.

Each component package (sd-vae, sd-clip, sd-unet) keeps an identical copy of this module, so
that none depends on another; lint fails if a copy drifts from this one (the source).

What it knows about:
- safetensors files, opened lazily so that only the tensors under one key prefix are read;
- pickled checkpoints (``.ckpt``/``.pt``/``.bin``), opened by a restricted unpickler (below): the
  tensors and plain data come out, a training framework's objects become inert placeholders,
  and anything else a pickle could call is refused; unwrapped from their ``state_dict`` wrapper;
- a state dict already read (``load_state_dict``), so that one pickle is read once for all three
  components;
- diffusers folders (``config.json`` + weights), or a model root holding one such subfolder, and
  the typed reading of their ``config.json``;
- the config a component stores in a safetensors file's metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
import stat
import tempfile
import types
from collections import OrderedDict
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
# A config.json is a few kilobytes; past this it is not one, and parsing it would only cost time.
MAX_JSON_BYTES = 1 << 20
# The largest integer a config may give for a size (a width, a layer count, a vocabulary): the
# biggest real models stay far below it, so a larger value is a damaged or hostile file.
MAX_CONFIG_INT = 1 << 20
# The largest `sample_size` a diffusers config.json may give (a side in latents or pixels; SD
# 1.x's UNet has 64, SDXL's VAE 1024): a pipeline allocates its latents from it.
MAX_SAMPLE_SIZE = 8192


class CheckpointError(ValueError):
    """A weight file that cannot be read, or does not hold what was asked of it."""


class StateDict(dict):
    """The tensors of a weight file (``load_state_dict``): a ``dict``, that also keeps the file's
    name (``source``, for messages) and its safetensors metadata (``metadata``, where each
    component finds the config an SD single file stores for it)."""

    def __init__(self, tensors=(), *, source: str = "state dict", metadata=None):
        super().__init__(tensors)
        self.source = source
        self.metadata = dict(metadata or {})


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Every tensor of a weight file, by name: a ``.safetensors`` file (memory-mapped), or a
    pickle (``.ckpt``/``.pt``/``.bin``) read without running code and taken out of its
    ``state_dict`` wrapper. Non-tensor entries (a training step, optimizer state) are left out.
    """
    source = Tensors(path)
    return StateDict(source.read(), source=source.name, metadata=source.metadata)


class Tensors:
    """What a loader reads from: a weight file or a state dict already read (a ``Mapping`` of
    names to tensors, as ``load_state_dict`` returns). A safetensors file is read lazily (only
    the tensors asked for), a pickle once, when this is made."""

    def __init__(self, where: str | os.PathLike | Mapping):
        self.path: Path | None = None
        self.metadata: dict[str, str] = {}
        if isinstance(where, Mapping):
            self.name = str(getattr(where, "source", "the given state dict"))
            metadata = getattr(where, "metadata", None)
            self.metadata = dict(metadata) if isinstance(metadata, Mapping) else {}
            self._state = _tensors_of(where, self.name)
        else:
            self.path = existing_file(where)
            self.name = str(self.path)
            if _is_safetensors(self.path):
                with _open_safetensors(self.path) as f:
                    self._keys = list(f.keys())
                    self.metadata = dict(f.metadata() or {})
                self._state = None
            else:
                self._state = _load_pickle(self.path)

    @property
    def is_safetensors_file(self) -> bool:
        return self._state is None

    def keys(self) -> list[str]:
        return self._keys if self._state is None else list(self._state)

    def read(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors whose names start with ``prefix``, with it stripped."""
        if self._state is not None:
            return {k[len(prefix) :]: v for k, v in self._state.items() if k.startswith(prefix)}
        with _open_safetensors(self.path) as f:
            names = [k for k in f.keys() if k.startswith(prefix)]
            try:
                return {k[len(prefix) :]: f.get_tensor(k) for k in names}
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(
                    f"{self.path}: cannot read tensors ({e}); is the file truncated?"
                ) from e


def _tensors_of(state: Mapping, name: str) -> Mapping[str, torch.Tensor]:
    """A mapping's tensors (non-tensor entries left out, as a pickle's are), out of a
    ``state_dict`` wrapper if it has one."""
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    bad = next((k for k, v in state.items() if isinstance(v, torch.Tensor)
                and not isinstance(k, str)), None)  # fmt: skip
    if bad is not None:
        raise CheckpointError(f"{name}: tensor names must be strings, found {bad!r}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_safetensors(path: Path) -> bool:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return True
    if path.suffix in PICKLE_SUFFIXES:
        return False
    # Unknown suffix: a safetensors file starts with an 8-byte header length, then '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_tensors(
    path: str | os.PathLike, prefix: str = "", *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read the tensors whose names start with ``prefix`` and return them with it stripped.

    A safetensors file is read lazily: tensors outside the prefix are never loaded.
    """
    tensors = Tensors(path).read(prefix)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def pick_prefix(keys: Iterable[str], prefixes: Iterable[str], probe: str) -> str | None:
    """The first of ``prefixes`` under which ``probe`` (a key this component always has) exists.

    ``""`` in ``prefixes`` stands for a bare component file. Returns None if none matches.
    """
    keys = set(keys)
    for prefix in prefixes:
        if prefix + probe in keys:
            return prefix
    return None


# ---------------------------------------------------------------------------- files


_KINDS = {stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character device",
          stat.S_ISBLK: "block device"}  # fmt: skip


def existing_path(path: str | os.PathLike) -> Path:
    """``path``, which exists: else FileNotFoundError, or a CheckpointError where it cannot be
    looked at (a folder on the way that this process may not search is not "no such file")."""
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from e
    return path


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a regular file that this process can read, or a clear error: a FIFO, socket
    or device is refused before it is opened (reading one would wait forever, or never end)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from e
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a folder, not a weight file")
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS.items() if test(mode)), "special file")
        raise CheckpointError(f"{path}: is a {kind}, not a regular file; expected a weight file")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise CheckpointError(
            f"{path}: cannot read it ({e.strerror or e}); check the file's permissions"
        ) from e
    return path


def _is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file; a FIFO, socket or device there is an error."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return stat.S_ISREG(mode)
    existing_file(path)  # raises, naming what it is
    return False


def find_diffusers_folder(path: Path, subfolder: str) -> Path | None:
    """The diffusers component folder at ``path`` (or ``path/subfolder``), or None."""
    for folder in (path, path / subfolder):
        if _is_regular(folder / "config.json") and diffusers_weight_file(folder) is not None:
            return folder
    return None


def diffusers_weight_file(folder: Path) -> Path | None:
    for name in DIFFUSERS_WEIGHT_NAMES:
        if _is_regular(folder / name):
            return folder / name
    return None


def read_json(path: Path) -> dict:
    """A JSON object from a file of at most ``MAX_JSON_BYTES``."""
    path = existing_file(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from e
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: over {MAX_JSON_BYTES} bytes; not a config.json")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


# ---------------------------------------------------------------------------- configs


def config_value(
    cfg: Mapping, name: str, default, source: str, *, low: int = 1, limit: int = MAX_CONFIG_INT
):
    """``cfg[name]`` (``default`` where absent or null), checked to be of ``default``'s type;
    an integer (a size, in a config.json) from ``low`` to ``limit``."""
    value = cfg.get(name)
    return default if value is None else typed(value, default, f"{source}: {name}", low, limit)


def typed(value, like, what: str, low: int = -1, limit: int = MAX_CONFIG_INT):
    """``value`` if it has the type of ``like`` (a list of ``like[0]``'s type for a tuple, as a
    tuple), else a CheckpointError naming ``what`` and the type expected. Integers must lie in
    ``low`` .. ``limit`` (-1, the default ``low``, is a config's "not set")."""
    if isinstance(like, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(like, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        if ok and not low <= value <= limit:
            raise CheckpointError(f"{what} is {value}; expected an integer from {low} to {limit}")
    elif isinstance(like, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok, expected = ok and math.isfinite(value), "a finite number"
    elif isinstance(like, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(like, tuple):
        if not isinstance(value, list | tuple) or not value:
            raise CheckpointError(f"{what} is {value!r}; expected a non-empty list")
        item = like[0] if like else 0
        return tuple(typed(v, item, f"{what}[{i}]", low, limit) for i, v in enumerate(value))
    else:
        return value
    if not ok:
        raise CheckpointError(f"{what} is {value!r}; expected {expected}")
    return float(value) if isinstance(like, float) else value


def build_config(cls: type, values: Mapping, where: str):
    """``cls(**values)`` for a config dataclass, each value checked against the type of its
    field's default, so that a bad value is one clear error and not a failure deep in the model."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise CheckpointError(
            f"{where}: unknown field {unknown[0]!r}; {cls.__name__} has {', '.join(fields)}"
        )
    checked = {k: typed(v, fields[k], f"{where}: {k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: not a valid {cls.__name__} ({e})") from e


def config_from_metadata(metadata: Mapping[str, str], key: str, cls: type, source: str):
    """The config stored as JSON under ``key`` in a safetensors file's metadata (by a component's
    ``save``, or by whatever wrote an SD single file), or None where there is none."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        values = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{source}: unreadable {key!r} metadata ({e})") from e
    if not isinstance(values, dict):
        raise CheckpointError(f"{source}: {key!r} metadata is not a JSON object")
    return build_config(cls, values, f"{source}: {key!r} metadata")


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


# ---------------------------------------------------------------------------- saving


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically (a crash leaves no partial file).
    A failed write (a full disk, say) raises an OSError that names ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save writes safetensors; use a '.safetensors' file name")
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = dict(metadata) if metadata else None
    _write_atomically(path, lambda tmp: save_file(data, tmp, metadata=meta))


def save_json(value, path: str | os.PathLike) -> None:
    """Write ``value`` as a JSON file atomically (as ``save_tensors``)."""
    text = json.dumps(value, indent=2)
    _write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text))


def _write_atomically(path: Path, write) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes it private; give it a new file's mode
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        why = f"cannot write {path}: {getattr(e, 'strerror', None) or e}"
        errno = getattr(e, "errno", None)
        raise (OSError(errno, why) if errno else OSError(why)) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def file_mode() -> int:
    """The mode of a newly created file under this process's umask (0o644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# ---------------------------------------------------------------------------- reading


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
    load = functools.partial(
        torch.load, path, map_location="cpu", pickle_module=_RESTRICTED, weights_only=False
    )
    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = load()  # the legacy (not zip) format cannot be memory-mapped
    except RefusedGlobal as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks to run code or build objects other than "
            f"tensors ({e}). Convert it to .safetensors from a trusted source."
        ) from e
    except Exception as e:  # a damaged pickle can raise nearly anything
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); expected a "
            ".safetensors, .ckpt, .pt or .bin file; is it truncated?"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return _tensors_of(obj, str(path))


# ---------------------------------------------------------------------------- the unpickler
#
# A pickle is a program: its GLOBAL opcodes name any importable callable and REDUCE calls it.
# Released SD checkpoints pickle more than tensors: PyTorch Lightning's callbacks and trainer
# state, numpy scalars, OrderedDicts. torch's `weights_only` unpickler refuses the first two, and
# its allow-list cannot match a whole package; so, as AUTOMATIC1111 and ComfyUI do, this one
# answers each name itself: torch's tensor rebuilding and plain containers are allowed; numpy
# values and anything from Lightning become inert placeholders (their data kept, nothing of
# theirs imported or run); every other name is refused.


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that could run code."""


class Placeholder(dict):
    """Stands in for an object of a library that is never imported: it keeps the arguments and
    state the pickle gives it, and does nothing (a dict, so that pickled items fill it)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs, self.state, self.items_ = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.items_.append(item)

    def extend(self, items):
        self.items_.extend(items)


PLACEHOLDER_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric")
PLACEHOLDER_NAMES = frozenset(
    f"numpy.{core}.{name}"
    for core in ("core.multiarray", "_core.multiarray", "core.numeric", "_core.numeric")
    for name in ("scalar", "_reconstruct", "_frombuffer")
) | {"numpy.dtype", "numpy.ndarray", "argparse.Namespace"}  # (old Lightning's hparams)
_OLD_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol 2 writes these


@functools.cache
def _allowed_globals() -> dict[str, object]:
    import _codecs
    import copyreg

    allowed = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "builtins.slice": slice,
        "builtins.object": object,
        "_codecs.encode": _codecs.encode,  # how protocol 2 stores bytes
        "copyreg._reconstructor": copyreg._reconstructor,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "torch.serialization._get_layout": torch.serialization._get_layout,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                 "_rebuild_parameter", "_rebuild_parameter_with_state"):  # fmt: skip
        if hasattr(torch._utils, name):
            allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
            allowed[f"torch.{name}"] = value
    return allowed


@functools.cache
def _placeholder(full_name: str) -> type:
    module, _, name = full_name.rpartition(".")
    return type(name, (Placeholder,), {"__module__": module, "__qualname__": name})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = _OLD_MODULES.get(module, module)
        full = f"{module}.{name}"
        if not all(part.isidentifier() for part in full.split(".")):
            # random bytes can look like a GLOBAL opcode; a real pickle names Python objects
            raise pickle.UnpicklingError(f"malformed global name {full!r}")
        if module.split(".")[0] in PLACEHOLDER_PACKAGES or full in PLACEHOLDER_NAMES:
            return _placeholder(full)
        allowed = _allowed_globals().get(full)
        if allowed is None:
            raise RefusedGlobal(f"refused global {full!r}")
        return allowed


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls the pickle module for: its Unpickler (subclassed by torch to map storage
# names) and load (for the legacy format's header records).
_RESTRICTED = types.ModuleType("restricted_pickle")
_RESTRICTED.Unpickler = _RestrictedUnpickler
_RESTRICTED.load = _restricted_load
_RESTRICTED.UnpicklingError = pickle.UnpicklingError
