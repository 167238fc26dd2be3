"""A folder of captioned images, ready for training.

Two layouts are read (the ones diffusers' and kohya's training scripts read):

- ``name.png`` / ``name.jpg`` (also ``.jpeg``, ``.webp``, ``.bmp``) beside ``name.txt``;
- a ``metadata.jsonl`` with one ``{"file_name": "a.png", "text": "a caption"}`` per line
  (``caption`` or ``prompt`` are accepted for ``text``).

Images are resized so the shorter side is the training resolution, then cropped square (centre,
or random for augmentation) and optionally flipped. Everything is decoded once, up front, into
a uint8 tensor: the datasets this is meant for (fine-tuning sets, the shapes set) fit in memory.

Bad files: a folder with no usable image is an error; so is one where more than ``max_bad`` of
the files are bad. A few bad files among many (no caption, an unreadable image or caption, an
image whose header claims more pixels than PIL's decompression-bomb limit) are skipped with a
warning naming them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """A training folder that cannot be used as it is."""


def check_resolution(resolution: int, multiple: int = 8) -> None:
    if resolution <= 0 or resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise DataError(
            f"resolution must be a positive multiple of {multiple}, got {resolution} "
            f"(try {lower} or {lower + multiple})"
        )


def _caption_pairs(folder: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image path, caption) pairs, and a description of each file that had to be skipped."""
    bad: list[str] = []
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        pairs = []
        for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                text = next(row[k] for k in ("text", "caption", "prompt") if k in row)
            except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
                bad.append(f"{metadata.name} line {n}: needs 'file_name' and 'text'")
                continue
            if not (folder / name).is_file():
                bad.append(f"{name}: listed in {metadata.name} but missing")
                continue
            pairs.append((folder / name, str(text)))
        return pairs, bad
    pairs = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        text_file = path.with_suffix(".txt")
        if not text_file.is_file():
            bad.append(f"{path.name}: no caption (expected {text_file.name} beside it)")
            continue
        try:
            pairs.append((path, text_file.read_text(encoding="utf-8").strip()))
        except (OSError, UnicodeDecodeError) as e:
            bad.append(f"{text_file.name}: cannot read the caption ({type(e).__name__}: {e})")
    return pairs, bad


def _unreadable() -> tuple[type[BaseException], ...]:
    from PIL import Image

    # DecompressionBombError: a header claiming more than twice PIL's MAX_IMAGE_PIXELS (a few
    # bytes that would decode to gigabytes) is refused before decoding, like a damaged file.
    return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Decode, resize the shorter side to ``resolution`` (keeping the aspect) -> HxWx3 uint8."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if size != (w, h):
            im = im.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()


@dataclass
class ImageFolder:
    """Captioned images of one square resolution, held in memory.

    ``images``: a list of (H, W, 3) uint8 arrays, shorter side ``resolution`` (square for a
    folder of square pictures); ``captions``: one string each.
    """

    images: list[np.ndarray]
    captions: list[str]
    resolution: int
    random_crop: bool = False
    random_flip: bool = False

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        resolution: int,
        *,
        random_crop: bool = False,
        random_flip: bool = False,
        max_bad: float = 0.1,
    ) -> ImageFolder:
        check_resolution(resolution)
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder of images")
        pairs, bad = _caption_pairs(folder)
        images, captions = [], []
        unreadable = _unreadable()
        for path, text in pairs:
            try:
                images.append(load_image(path, resolution))
            except unreadable as e:
                bad.append(f"{path.name}: cannot read the image ({type(e).__name__}: {e})")
                continue
            captions.append(text)
        total = len(images) + len(bad)
        if not images:
            what = "; ".join(bad[:5]) if bad else "it is empty"
            raise DataError(
                f"{folder}: no usable training images ({what}). Expected name.png/.jpg files "
                "each beside a name.txt caption, or a metadata.jsonl with file_name and text."
            )
        if len(bad) > max_bad * total:
            raise DataError(
                f"{folder}: {len(bad)} of {total} files are unusable (more than "
                f"{max_bad:.0%}): " + "; ".join(bad[:10])
            )
        if bad:
            log.warning(
                "%s: skipping %d unusable file(s): %s", folder, len(bad), "; ".join(bad[:20])
            )
        return cls(images, captions, resolution, random_crop, random_flip)

    def __len__(self) -> int:
        return len(self.images)

    def batch(
        self, indices: list[int], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, R, R) in [-1, 1] and their captions.

        Random crops and flips (when enabled) are drawn from ``generator``; without one, every
        image is centre-cropped and not flipped.
        """
        r = self.resolution
        out = []
        for i in indices:
            a = torch.from_numpy(self.images[i]).permute(2, 0, 1)
            h, w = a.shape[1:]
            if self.random_crop and generator is not None:
                top = int(torch.randint(h - r + 1, (1,), generator=generator))
                left = int(torch.randint(w - r + 1, (1,), generator=generator))
            else:
                top, left = (h - r) // 2, (w - r) // 2
            a = a[:, top : top + r, left : left + r]
            if (
                self.random_flip
                and generator is not None
                and bool(torch.rand((), generator=generator) < 0.5)
            ):
                a = a.flip(-1)
            out.append(a)
        images = torch.stack(out).float() / 127.5 - 1.0
        return images, [self.captions[i] for i in indices]
