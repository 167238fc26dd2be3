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
import math
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


def bucket_sizes(resolution: int, low: int, high: int, step: int = 64) -> list[tuple[int, int]]:
    """The (width, height) buckets of aspect-ratio bucketing, as kohya's: every side a multiple
    of ``step`` in [low, high], each bucket as large as it can be within ``resolution**2``
    pixels, both orientations, and the square one."""
    area = resolution * resolution
    side = math.isqrt(area) // step * step
    sizes = {(side, side)}
    for w in range(low, high + 1, step):
        h = min(high, area // w // step * step)
        if h >= low:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio: 2:1 and 1:2 are
    equally far from square)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_image(
    path: Path, resolution: int, buckets: list[tuple[int, int]] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize, keeping the aspect, so that the training crop fits -> (HxWx3 uint8,
    the crop's (width, height)): a ``resolution`` square (the shorter side becomes
    ``resolution``), or with ``buckets`` the nearest bucket (the image just covers it)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        crop = nearest_bucket(w, h, buckets) if buckets else (resolution, resolution)
        scale = max(crop[0] / w, crop[1] / h)
        size = (max(crop[0], round(w * scale)), max(crop[1], round(h * scale)))
        if size != (w, h):
            im = im.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy(), crop


@dataclass
class ImageFolder:
    """Captioned images of one square resolution, held in memory.

    ``images``: a list of (H, W, 3) uint8 arrays, shorter side ``resolution`` (square for a
    folder of square pictures); ``captions``: one string each. With aspect-ratio bucketing,
    ``sizes`` holds each image's training crop (width, height), its bucket.
    """

    images: list[np.ndarray]
    captions: list[str]
    resolution: int
    random_crop: bool = False
    random_flip: bool = False
    sizes: list[tuple[int, int]] | None = None

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        resolution: int,
        *,
        random_crop: bool = False,
        random_flip: bool = False,
        max_bad: float = 0.1,
        buckets: list[tuple[int, int]] | None = None,
    ) -> ImageFolder:
        """Read ``folder``; ``buckets`` (from :func:`bucket_sizes`) turns on aspect-ratio
        bucketing."""
        check_resolution(resolution)
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder of images")
        pairs, bad = _caption_pairs(folder)
        images, captions, sizes = [], [], []
        unreadable = _unreadable()
        for path, text in pairs:
            try:
                image, size = load_image(path, resolution, buckets)
            except unreadable as e:
                bad.append(f"{path.name}: cannot read the image ({type(e).__name__}: {e})")
                continue
            images.append(image)
            sizes.append(size)
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
        return cls(images, captions, resolution, random_crop, random_flip,
                   sizes if buckets else None)  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def size(self, i: int) -> tuple[int, int]:
        """The (width, height) image ``i`` trains at."""
        return self.sizes[i] if self.sizes is not None else (self.resolution, self.resolution)

    def same_size(self, indices: list[int]) -> list[list[int]]:
        """``indices`` grouped by training size (in order of first appearance)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in indices:
            groups.setdefault(self.size(i), []).append(i)
        return list(groups.values())

    def buckets(self) -> list[list[int]] | None:
        """The indices of each bucket under aspect-ratio bucketing, else None."""
        return None if self.sizes is None else self.same_size(list(range(len(self))))

    def batch(
        self, indices: list[int], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, R, R) in [-1, 1] (bucketed: of the images' one bucket size) and their
        captions.

        Random crops and flips (when enabled) are drawn from ``generator``; without one, every
        image is centre-cropped and not flipped.
        """
        if len({self.size(i) for i in indices}) > 1:
            raise DataError(f"images {indices} are of different buckets; batch each bucket alone")
        out = []
        for i in indices:
            a = torch.from_numpy(self.images[i]).permute(2, 0, 1)
            h, w = a.shape[1:]
            cw, ch = self.size(i)
            if self.random_crop and generator is not None:
                top = int(torch.randint(h - ch + 1, (1,), generator=generator))
                left = int(torch.randint(w - cw + 1, (1,), generator=generator))
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            a = a[:, top : top + ch, left : left + cw]
            if (
                self.random_flip
                and generator is not None
                and bool(torch.rand((), generator=generator) < 0.5)
            ):
                a = a.flip(-1)
            out.append(a)
        images = torch.stack(out).float() / 127.5 - 1.0
        return images, [self.captions[i] for i in indices]
