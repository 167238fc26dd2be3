"""Generation parameters in the AUTOMATIC1111 ``parameters`` PNG text chunk, written and read.

The format, as AUTOMATIC1111 writes it (and as ComfyUI, InvokeAI and image sites parse it)::

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64, Model hash: 0a1b2c3d4e, Model: shapes

The last line holds ``key: value`` pairs separated by commas (a value holding a comma or a colon
is written as a JSON string); the lines before it are the prompt, then, from the line starting
with ``Negative prompt:``, the negative prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

import sd_samplers
from sd_pipeline.files import replacing

log = logging.getLogger(__name__)

# One ``key: value`` pair of the last line; the value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*([A-Za-z][\w \-/+.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def sampler_label(name: str) -> str:
    """AUTOMATIC1111's label for a sampler name (``dpmpp_2m_karras`` -> ``DPM++ 2M Karras``),
    as sd-samplers' registry records it; a name it does not know is written as it is."""
    try:
        return sd_samplers.sampler_label(name)
    except ValueError:
        return name


def sampler_name(label: str, schedule_type: str | None = None) -> str:
    """Our sampler name for an AUTOMATIC1111 label (and its 1.9+ ``Schedule type`` field).

    Labels sd-samplers does not know come back unchanged, so that reading a PNG never fails on
    them and the request's check can name them.
    """
    try:
        return sd_samplers.sampler_from_label(label, schedule_type)
    except ValueError:
        return label.strip()


@dataclass
class GenerationParameters:
    """What produced an image: enough to generate it again with the same model."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "euler_a"
    cfg_scale: float = 7.5
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    model: str | None = None
    denoising_strength: float | None = None
    clip_skip: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # fields we do not use, kept verbatim

    def to_text(self) -> str:
        """The ``parameters`` chunk text, in AUTOMATIC1111's format."""
        fields: dict[str, object] = {
            "Steps": self.steps,
            "Sampler": sampler_label(self.sampler),
            "CFG scale": f"{self.cfg_scale:g}",
        }
        if self.seed is not None:
            fields["Seed"] = self.seed
        if self.width is not None and self.height is not None:
            fields["Size"] = f"{self.width}x{self.height}"
        if self.model_hash:
            fields["Model hash"] = self.model_hash
        if self.model:
            fields["Model"] = self.model
        if self.denoising_strength is not None:
            fields["Denoising strength"] = f"{self.denoising_strength:g}"
        if self.clip_skip is not None and self.clip_skip > 1:
            fields["Clip skip"] = self.clip_skip
        fields.update(self.extra)
        last = ", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items())
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(last)
        return "\n".join(lines)

    @classmethod
    def from_text(cls, text: str) -> GenerationParameters:
        """Parse an AUTOMATIC1111 ``parameters`` text (the inverse of ``to_text``)."""
        lines = text.strip("\n").split("\n")
        last = lines[-1] if lines else ""
        pairs = {k.strip(): _unquote(v.strip()) for k, v in _PARAM.findall(last)}
        if "Steps" in pairs:
            lines = lines[:-1]
        else:
            pairs = {}
        prompt, negative, in_negative = [], [], False
        for line in lines:
            if line.startswith("Negative prompt:"):
                in_negative = True
                line = line[len("Negative prompt:") :].lstrip()
            (negative if in_negative else prompt).append(line)
        params = cls(prompt="\n".join(prompt), negative_prompt="\n".join(negative))
        if not pairs:
            return params
        try:
            params.steps = int(pairs.pop("Steps"))
            if "Sampler" in pairs:
                params.sampler = sampler_name(
                    pairs.pop("Sampler"), pairs.pop("Schedule type", None)
                )
            if "CFG scale" in pairs:
                params.cfg_scale = float(pairs.pop("CFG scale"))
            if "Seed" in pairs:
                params.seed = int(pairs.pop("Seed"))
            if "Size" in pairs:
                width, height = pairs.pop("Size").lower().split("x")
                params.width, params.height = int(width), int(height)
            params.model_hash = pairs.pop("Model hash", None)
            params.model = pairs.pop("Model", None)
            if "Denoising strength" in pairs:
                params.denoising_strength = float(pairs.pop("Denoising strength"))
            if "Clip skip" in pairs:
                params.clip_skip = int(pairs.pop("Clip skip"))
        except ValueError as e:
            raise ValueError(f"malformed generation parameters {last!r}: {e}") from e
        params.extra = pairs
        return params


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if ("," in value or ":" in value) else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def read_parameters(path: str | os.PathLike) -> GenerationParameters:
    """The generation parameters stored in a PNG's ``parameters`` text chunk."""
    try:
        with Image.open(path) as im:
            im.load()
            text = im.info.get("parameters")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    if not isinstance(text, str):
        raise ValueError(
            f"{path}: carries no generation parameters (no 'parameters' text chunk); "
            "give a PNG written by sd-generate or AUTOMATIC1111"
        )
    return GenerationParameters.from_text(text)


def save_image(
    image: Image.Image,
    path: str | os.PathLike,
    parameters: GenerationParameters | str | None = None,
) -> Path:
    """Write an image atomically (no partial file on error); PNGs carry ``parameters``.

    ``parameters`` defaults to the image's own (``image.info["parameters"]``, set by the
    pipeline). The format follows the suffix (PNG, JPEG, WebP, ...); only PNG stores them.
    """
    path = Path(path)
    if parameters is None:
        parameters = image.info.get("parameters")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image file type {path.suffix!r}; use .png")
    options = {}
    if fmt == "PNG" and parameters is not None:
        info = PngImagePlugin.PngInfo()
        text = parameters if isinstance(parameters, str) else parameters.to_text()
        info.add_text("parameters", text)
        options["pnginfo"] = info
    with replacing(path, "wb") as f:
        image.save(f, format=fmt, **options)
    return path


# ---------------------------------------------------------------------------- the model hash


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's ``Model hash``: the first 10 hex digits of the file's SHA-256.

    Hashing a 4 GB checkpoint takes seconds, so the digest is cached, as AUTOMATIC1111 caches
    it: in ``$XDG_CACHE_HOME/sd-pipeline/model-hashes.json`` (``~/.cache`` by default), keyed by
    the file's resolved path and valid while its size and modification time are unchanged. A
    cache that cannot be read or written is ignored (the hash is then computed each time).
    """
    path = Path(path).resolve()
    info = path.stat()
    stamp = [info.st_size, info.st_mtime_ns]
    cache_file = _hash_cache_file()
    cache = _read_hash_cache(cache_file)
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and "sha256" in entry:
        return str(entry["sha256"])[:10]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _write_hash_cache(cache_file, cache)
    return cache[str(path)]["sha256"][:10]


def _hash_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sd-pipeline" / "model-hashes.json"


def _read_hash_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_hash_cache(path: Path, cache: dict) -> None:
    """Atomically (a temporary file renamed into place); a failure only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1)
    except OSError as e:
        log.debug("model hash cache %s not written: %s", path, e)
