"""LoRAs in the pipeline: applied to the UNet and text encoder together, named in prompts as
AUTOMATIC1111 names them, and recorded in PNG parameters as it records them.

    loras = [(LoRA.from_file("style.safetensors"), 0.8, 0.5)]   # (LoRA, UNet weight, TE weight)
    apply_loras(unet, text_encoder, loras)                      # merged into the weights
    remove_loras(unet, text_encoder)                            # the original weights back

    prompt, wanted = parse_prompt("a cat <lora:style:0.8> <lora:ink:1:0.5>")
    # "a cat  ", [PromptLora("style", te_weight=0.8, unet_weight=0.8), PromptLora("ink", 1.0, 0.5)]
    path = find_lora("style", "models/Lora")
    lora_hashes([("style", lora_hash(path))])                   # 'style: 0123456789ab'

AUTOMATIC1111's conventions (extensions-builtin/Lora): ``<lora:name:te:unet>``, the text encoder
weight first, the UNet weight defaulting to it, both to 1; named ``te=`` and ``unet=`` override
them. Its ``Lora hashes`` parameter lists ``name: hash`` pairs, comma-separated (the infotext
writer quotes the value), the name as written in the prompt without ``:`` and ``,``, the hash
the first 12 hex digits of the file's sha256: for a ``.safetensors`` file the "addnet" hash
(kohya's), of the bytes after the header, so that editing the metadata keeps it; or the
``sshs_model_hash`` the file's metadata records, when it records one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sd_lora import LoRA, LoRAError, applied, remove_all

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what AUTOMATIC1111 lists in its Lora folder
PROMPT_TAGS = ("lora", "lyco")  # "lyco": the LyCORIS extension's tag, an alias in A1111 1.5+
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # AUTOMATIC1111's extra-network syntax


# ---------------------------------------------------------------------------------------------
# Applying to the two models


def apply_loras(
    unet: nn.Module,
    text_encoder: nn.Module | Sequence[nn.Module],
    loras: Iterable[tuple[LoRA, float, float | None]],
    *,
    merge: bool = True,
    in_place: bool = False,
) -> None:
    """Apply each (LoRA, UNet weight, text encoder weight) to the part(s) it adapts: merged
    into the weights (``in_place``: added into their memory, sd-lora's ``merge(in_place=)``),
    or with ``merge=False`` attached on the fly (weights untouched).
    A text encoder weight of None means the UNet weight. ``text_encoder``: the model's one, or
    SDXL's (CLIP-L, bigG), each taking its own layers (sd-lora's ``names.sdxl_part``). All or
    nothing: when one does not fit, those this call applied are removed again before the
    error is raised."""
    done: list[tuple[LoRA, nn.Module]] = []
    encoders = _encoders(text_encoder)
    try:
        for lora, unet_weight, te_weight in loras:
            te_weight = unet_weight if te_weight is None else te_weight
            parts = [("unet", unet, unet_weight)] + [("te", e, te_weight) for e in encoders]
            for component, module, weight in parts:
                # (an SDXL LoRA's te1/te2 layers go to every part, which picks its own, or
                # refuses it by name on an SD 1.x/2.x model)
                if component in lora.components() or not lora.components() <= {"unet", "te"}:
                    if merge:
                        lora.merge(module, weight, in_place=in_place)
                    else:
                        lora.attach(module, weight)
                    done.append((lora, module))
    except Exception:
        for lora, module in reversed(done):
            (lora.unmerge if merge else lora.detach)(module)
        raise


def remove_loras(
    unet: nn.Module,
    text_encoder: nn.Module | Sequence[nn.Module],
    loras: Sequence[LoRA] | None = None,
) -> None:
    """Take the given LoRAs (all, without ``loras``) out of the models, merged or attached:
    once none is left the weights are the originals, bit for bit (to float32 rounding where
    one was merged in place)."""
    for module in (unet, *_encoders(text_encoder)):
        if loras is None:
            remove_all(module)
            continue
        for lora, _, how in applied(module):
            if any(lora is wanted for wanted in loras):
                (lora.unmerge if how == "merged" else lora.detach)(module)


def loaded_loras(
    unet: nn.Module, text_encoder: nn.Module | Sequence[nn.Module]
) -> list[tuple[LoRA, float | None, float | None]]:
    """(LoRA, UNet weight, text encoder weight) of each LoRA on the models, in order; a
    weight is None where the LoRA is not on that model."""
    out: dict[int, list] = {}
    for index, module in [(0, unet)] + [(1, e) for e in _encoders(text_encoder)]:
        for lora, weight, _ in applied(module):
            entry = out.setdefault(id(lora), [lora, None, None])
            entry[1 + index] = weight if entry[1 + index] is None else entry[1 + index]
    return [tuple(entry) for entry in out.values()]


def _encoders(text_encoder) -> list[nn.Module]:
    return [text_encoder] if isinstance(text_encoder, nn.Module) else list(text_encoder)


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptLora:
    """A ``<lora:name:te:unet>`` of a prompt."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def parse_prompt(prompt: str) -> tuple[str, list[PromptLora]]:
    """The prompt without its ``<lora:...>`` (and ``<lyco:...>``) tags, and the tags parsed.

    As AUTOMATIC1111: ``<lora:name>`` is weight 1 for both, ``<lora:name:w>`` w for both,
    ``<lora:name:te:unet>`` each its own; ``te=``/``unet=`` name them. A tag is removed, the
    spaces around it kept. Other extra networks (``<hypernet:...>``) are left in the prompt.
    """
    found: list[PromptLora] = []

    def take(match: re.Match) -> str:
        if match.group(1) not in PROMPT_TAGS:
            return match.group(0)
        found.append(_parse_tag(match.group(0), match.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def _parse_tag(tag: str, items: list[str]) -> PromptLora:
    positional, named = [], {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(item)
    unknown = set(named) - {"te", "unet"}
    if unknown or len(positional) > 3:
        extra = sorted(unknown) or positional[3:]
        raise ValueError(
            f"{tag}: {extra} not supported; write <lora:name>, <lora:name:weight> or "
            "<lora:name:te_weight:unet_weight> (or te=/unet=)"
        )
    name = positional[0].strip() if positional else ""
    if not name:
        raise ValueError(f"{tag}: no LoRA name; write <lora:name:weight>")
    te = _number(tag, named.get("te", positional[1] if len(positional) > 1 else "1"))
    unet = _number(tag, named.get("unet", positional[2] if len(positional) > 2 else str(te)))
    return PromptLora(name, te, unet)


def _number(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{tag}: weight {text.strip()!r} is not a number; e.g. <lora:name:0.8>")
    return value


def parse_lora_option(text: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` (the CLI's ``--lora``) as (path, weight); the weight defaults to 1. A
    colon not followed by a number belongs to the path (``C:\\loras\\x.safetensors``)."""
    head, colon, tail = text.rpartition(":")
    if colon and head and not tail.startswith(("/", "\\")):
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            if weight != weight or weight in (float("inf"), float("-inf")):
                raise ValueError(f"--lora {text}: the weight must be a finite number")
            return Path(head), weight
    return Path(text), 1.0


@dataclass(frozen=True)
class ResolvedLora:
    """A prompt's ``<lora:...>`` with the file it names and that file's short hash."""

    name: str
    path: Path
    te_weight: float
    unet_weight: float
    hash: str


def resolve_prompt(
    prompt: str, lora_dir: str | os.PathLike, recorded: dict[str, str] | None = None
) -> tuple[str, list[ResolvedLora]]:
    """The prompt without its LoRA tags, and each tag's file in ``lora_dir``: by name, or (for
    a PNG's parameters, whose ``Lora hashes`` are ``recorded``) by hash where the name is not
    found. ``lora_hashes((r.name, r.hash) for r in resolved)`` is the value to record."""
    cleaned, wanted = parse_prompt(prompt)
    resolved = []
    for tag in wanted:
        try:
            path = find_lora(tag.name, lora_dir)
        except FileNotFoundError:
            short = (recorded or {}).get(tag.name.replace(":", "").replace(",", ""))
            path = find_by_hash(short, lora_dir) if short else None
            if path is None:
                raise
        resolved.append(
            ResolvedLora(tag.name, path, tag.te_weight, tag.unet_weight, lora_hash(path))
        )
    return cleaned, resolved


# ---------------------------------------------------------------------------------------------
# Files in a LoRA folder


def find_lora(name: str, lora_dir: str | os.PathLike) -> Path:
    """The file ``<lora:name>`` means in ``lora_dir`` (searched with its subfolders, as
    AUTOMATIC1111 does): ``name.safetensors`` (or ``.pt``, ``.ckpt``), ``sub/name`` for one in a
    subfolder, or a file whose kohya metadata names it (``ss_output_name``)."""
    folder = Path(lora_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such LoRA folder")
    files = _lora_files(folder)
    matches = [
        f
        for f in files
        if f.stem == name or f.relative_to(folder).with_suffix("").as_posix() == name
    ]
    if not matches:
        matches = [f for f in files if _output_name(f) == name]
    if len(matches) > 1:
        raise LoRAError(
            f"<lora:{name}>: several files in {folder} match: {', '.join(map(str, matches))}"
        )
    if not matches:
        names = sorted(f.stem for f in files)
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise FileNotFoundError(
            f"<lora:{name}>: no {name}.safetensors (or .pt / .ckpt) in {folder}; "
            f"it holds: {shown or 'no LoRA files'}"
        )
    return matches[0]


def find_by_hash(short_hash: str, lora_dir: str | os.PathLike) -> Path | None:
    """The file in ``lora_dir`` whose ``lora_hash`` is ``short_hash`` (None if none)."""
    for path in _lora_files(Path(lora_dir)):
        if lora_hash(path) == short_hash.lower():
            return path
    return None


def _lora_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100_000_000:
            raise LoRAError(f"{path}: not a .safetensors file (header of {size} bytes)")
        return size, json.loads(f.read(size))


def _output_name(path: Path) -> str | None:
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        return (_safetensors_header(path)[1].get("__metadata__") or {}).get("ss_output_name")
    except (OSError, ValueError, struct.error, LoRAError):
        return None


# ---------------------------------------------------------------------------------------------
# Hashes, as AUTOMATIC1111 writes them


def lora_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's short hash of a LoRA file: 12 hex digits (see the module docstring)."""
    path = Path(path)
    digest = hashlib.sha256()
    start = 0
    if path.suffix.lower() == ".safetensors":
        size, header = _safetensors_header(path)
        recorded = (header.get("__metadata__") or {}).get("sshs_model_hash")
        if recorded:
            return str(recorded)[:12].lower()
        start = 8 + size
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_hashes(entries: Iterable[tuple[str, str]]) -> str:
    """The value of the ``Lora hashes`` parameter: ``name: hash, name: hash`` (unquoted)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in entries)


def parse_lora_hashes(value: str) -> dict[str, str]:
    """``{name: hash}`` from a ``Lora hashes`` value (with or without its quotes)."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    out = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        name, colon, h = entry.rpartition(":")
        if not colon or not name.strip() or not h.strip():
            raise ValueError(f"Lora hashes: {entry!r} is not 'name: hash'")
        out[name.strip()] = h.strip()
    return out
