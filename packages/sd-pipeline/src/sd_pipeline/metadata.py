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
import string
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

import sd_samplers
from sd_pipeline.files import WriteError, open_regular, replacing

log = logging.getLogger(__name__)


def sampler_label(name: str) -> str:
    """AUTOMATIC1111's label for a sampler name (``dpmpp_2m_karras`` -> ``DPM++ 2M Karras``),
    as sd-samplers' registry records it; a name it does not know is written as it is."""
    try:
        return sd_samplers.sampler_label(name)
    except ValueError:
        return name


def sampler_name(label: str, schedule_type: str | None = None) -> str:
    """Our sampler name for an AUTOMATIC1111 label (and its 1.9+ ``Schedule type`` field), for
    the combinations that have one (``DPM++ 2M`` + ``Karras`` -> ``dpmpp_2m_karras``).

    Labels sd-samplers does not know come back unchanged, so that reading a PNG never fails on
    them and the request's check can name them.
    """
    return read_sampler(label, schedule_type)[0]


def read_sampler(label: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(sampler, scheduler) for an AUTOMATIC1111 label and ``Schedule type``: a combination
    with a name of its own comes back as that name and no scheduler (``dpmpp_2m_karras``,
    None), any other as the base sampler and the scheduler (``euler``, ``karras``). An unknown
    label comes back as it is."""
    try:
        base, scheduler = sd_samplers.parse_sampler(label, schedule_type)
    except ValueError:
        return label.strip(), None
    if scheduler is not None and f"{base}_{scheduler}" in sd_samplers.SAMPLERS:
        return f"{base}_{scheduler}", None
    return base, scheduler


def write_sampler(name: str, scheduler: str | None) -> dict[str, str]:
    """The ``Sampler`` (and ``Schedule type``) fields as AUTOMATIC1111 1.9+ writes them: the
    base sampler's label, the ladder apart."""
    try:
        base, suffix = sd_samplers.split_sampler(name)
    except ValueError:
        return {"Sampler": name}
    fields = {"Sampler": sd_samplers.sampler_label(base)}
    scheduler = scheduler or suffix
    if scheduler is not None:
        fields["Schedule type"] = sd_samplers.scheduler_label(scheduler)
    return fields


@dataclass
class GenerationParameters:
    """What produced an image: enough to generate it again with the same model."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "euler_a"
    scheduler: str | None = None  # a sigma schedule apart from the sampler's own (sd-samplers')
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
            **write_sampler(self.sampler, self.scheduler),
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
        pairs = {k.strip(): _unquote(v.strip()) for k, v in _pairs(last)}
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
                params.sampler, params.scheduler = read_sampler(
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


# The last line is read as ``key: value`` pairs, from left to right: a key (a letter, then letters,
# digits, spaces and ``_-/+.()``) ends at a colon; its value is a JSON string followed by a comma
# or the end, or else runs to the next comma. Text where no key starts is skipped. Each pattern
# is matched at a known position (``match(line, pos)``), never searched for, and a failed key
# skips the whole run of key characters it scanned, so every character is looked at a bounded
# number of times: linear in the line's length, however hostile (a regex ``findall`` over the
# line rescans the rest of such a run from each of its characters: quadratic).
_LETTERS = frozenset(string.ascii_letters)
_SPACE = re.compile(r"\s*")
_KEY = re.compile(r"([A-Za-z][\w \-/+.()]*):")
_KEY_RUN = re.compile(r"[\w \-/+.()]*")
_QUOTED = re.compile(r'\s*("(?:\\.|[^\\"])*")(?:,|$)')
_PLAIN = re.compile(r"\s*([^,]*)(?:,|$)")


def _pairs(line: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of a parameters line, in linear time (see ``_KEY``)."""
    pairs = []
    pos, end = 0, len(line)
    while pos < end:
        start = _SPACE.match(line, pos).end()
        key = _KEY.match(line, start)
        if key is None:
            if start < end and line[start] in _LETTERS:
                # No pair starts anywhere from here to the end of this run of key characters
                # (each start inside it scans to the same end, where no colon is).
                pos = _KEY_RUN.match(line, start).end()
            else:
                pos = start + 1
            continue
        value = _QUOTED.match(line, key.end()) or _PLAIN.match(line, key.end())
        pairs.append((key.group(1), value.group(1)))
        pos = value.end()
    return pairs


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if ("," in value or ":" in value) else value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
    return value


# The most ``parameters`` text read from a PNG (characters, after decompression): a long
# AUTOMATIC1111 prompt with every extension's fields is a few KiB; a larger chunk is refused
# rather than held in memory and parsed (a 1 KB file can carry 1 MiB of compressed text).
MAX_PARAMETERS_TEXT = 256 * 1024


def read_parameters(path: str | os.PathLike) -> GenerationParameters:
    """The generation parameters stored in a PNG's ``parameters`` text chunk.

    The PNG's chunks are read directly, the pixels never decoded (so an image of any size is
    fine), and a chunk of more than ``MAX_PARAMETERS_TEXT`` characters is refused. Errors name
    the file: ``FileNotFoundError``, ``PermissionError`` or ``ValueError``.
    """
    with open_regular(path, "image file") as f:
        try:
            text = _png_text(f, "parameters")
        except _NotPNG:
            text = None
            f.seek(0)
            _refuse_other_image(f, path)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: not a readable PNG ({e})") from None
    if text is None:
        raise ValueError(
            f"{path}: carries no generation parameters (no 'parameters' text chunk); "
            "give a PNG written by sd-generate or AUTOMATIC1111"
        )
    if isinstance(text, _TooLong):
        size = f" ({text.size:,} bytes)" if text.size is not None else ""
        raise ValueError(
            f"{path}: its 'parameters' text{size} is over the {MAX_PARAMETERS_TEXT // 1024} KiB "
            "limit (sd_pipeline.metadata.MAX_PARAMETERS_TEXT); not reading it"
        )
    return GenerationParameters.from_text(text)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _NotPNG(Exception):
    pass


class _TooLong:
    def __init__(self, size: int | None):
        self.size = size  # None: compressed, and not decompressed past the limit


def _png_text(f, keyword: str) -> str | _TooLong | None:
    """The first ``tEXt``/``zTXt``/``iTXt`` chunk named ``keyword``, read (and decompressed) up
    to ``MAX_PARAMETERS_TEXT``; None if there is none. Other chunks are skipped unread."""
    if f.read(8) != _PNG_SIGNATURE:
        raise _NotPNG
    name = keyword.encode("latin-1")
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("it is cut short: it ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", head)
        if length > 2**31 - 1:
            raise ValueError(f"a chunk declares {length} bytes")
        if kind == b"IEND":
            return None
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
            continue
        start = f.read(min(length, len(name) + 1))
        if start != name + b"\0":
            f.seek(length - len(start) + 4, os.SEEK_CUR)
            continue
        # Compressed text is at most a few bytes per 64 KiB longer than the text, and a plain
        # one is the text itself: a chunk over the cap (plus headers) is not read at all.
        if length > MAX_PARAMETERS_TEXT + 1024:
            return _TooLong(length - len(start) if kind == b"tEXt" else None)
        rest = f.read(length - len(start))
        crc = f.read(4)
        if len(rest) < length - len(start) or len(crc) < 4:
            raise ValueError(f"it is cut short inside its {kind.decode()} chunk")
        if zlib.crc32(rest, zlib.crc32(kind + start)) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"its '{keyword}' chunk is damaged (CRC mismatch)")
        return _chunk_text(kind, rest)


def _chunk_text(kind: bytes, data: bytes) -> str | _TooLong:
    """The text of a text chunk's data after its keyword (PNG spec 11.3.4)."""
    if kind == b"tEXt":
        raw, encoding = data, "latin-1"
    elif kind == b"zTXt":
        if data[:1] != b"\0":
            raise ValueError("its zTXt chunk uses an unknown compression method")
        raw, encoding = _inflate(data[1:]), "latin-1"
    else:
        if len(data) < 2:
            raise ValueError("its iTXt chunk is cut short")
        compressed, method, rest = data[0], data[1], data[2:]
        parts = rest.split(b"\0", 2)  # language tag, translated keyword, text
        if len(parts) != 3:
            raise ValueError("its iTXt chunk is malformed")
        raw, encoding = parts[2], "utf-8"
        if compressed:
            if method != 0:
                raise ValueError("its iTXt chunk uses an unknown compression method")
            raw = _inflate(raw)
    if isinstance(raw, _TooLong):
        return raw
    if len(raw) > MAX_PARAMETERS_TEXT:
        return _TooLong(len(raw))
    return raw.decode(encoding, errors="replace")


def _inflate(data: bytes) -> bytes | _TooLong:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, MAX_PARAMETERS_TEXT + 1)
    except zlib.error as e:
        raise ValueError(f"its compressed text is damaged ({e})") from None
    if len(raw) > MAX_PARAMETERS_TEXT or inflater.unconsumed_tail:
        return _TooLong(None)
    return raw


def _refuse_other_image(f, path) -> None:
    """A file that is no PNG: say whether it is some other image or none at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(f) as im:
                kind = im.format or "non-PNG"
        except Image.DecompressionBombError:
            kind = "very large"
        except Image.UnidentifiedImageError:
            from sd_pipeline.images import unknown_format

            raise ValueError(f"{path}: not a readable image ({unknown_format(f)})") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    raise ValueError(
        f"{path}: a {kind} image carries no generation parameters; give a PNG written by "
        "sd-generate or AUTOMATIC1111"
    )


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
    try:
        with replacing(path, "wb") as f:
            image.save(f, format=fmt, **options)
    except OSError as e:
        raise WriteError(path, e) from e
    return path


# ---------------------------------------------------------------------------- the model hash


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's ``Model hash``: the first 10 hex digits of the file's SHA-256."""
    return file_sha256(path)[:10]


def file_sha256(path: str | os.PathLike) -> str:
    """A file's SHA-256 (hex).

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
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _write_hash_cache(cache_file, cache)
    return cache[str(path)]["sha256"]


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
