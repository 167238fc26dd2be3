"""A procedural dataset of captioned pictures: one filled shape on a plain background.

Every picture is ``a {color} {shape} on a {background} background``: an upright, filled
circle, square or triangle in one of twelve colours, on a background of another of them.
Pixels are drawn with exactly the palette's sRGB values (hard edges, no anti-aliasing), so an
analyser can read the scene back (see :mod:`sd_pipeline.training.evaluate`).

Held-out combinations: a scene (colour ``c``, shape ``s``, background ``b``) is held out of
training when ``(PALETTE index of c + SHAPES index of s + PALETTE index of b) % 12 == 0``
(:func:`is_held_out`). That Latin-square rule removes 32 of the 396 scenes and never more than
one scene per colour pair, per colour/shape or per background/shape, so every colour, shape and
background -- and every pairing of two of them -- is still seen in training; only the
three-way combination is new.

Everything is deterministic from a seed::

    python -m sd_pipeline.training.shapes data/shapes --count 5000 --seed 0 --resolution 64
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The palette of issue 8 (Tailwind CSS colours), sRGB hex, in a fixed order: the index is
# part of the held-out rule, so never reorder it.
PALETTE: dict[str, str] = {
    "red": "#dc2626",
    "orange": "#f97316",
    "yellow": "#facc15",
    "green": "#16a34a",
    "cyan": "#06b6d4",
    "blue": "#2563eb",
    "purple": "#7c3aed",
    "pink": "#ec4899",
    "white": "#f5f5f5",
    "black": "#171717",
    "gray": "#737373",
    "brown": "#92400e",
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def rgb(color: str) -> tuple[int, int, int]:
    """The sRGB triple (0-255) of a palette colour name."""
    if color not in PALETTE:
        raise ValueError(f"unknown colour {color!r}; choose from: {', '.join(COLORS)}")
    h = PALETTE[color].lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def palette_array() -> np.ndarray:
    """The palette as a (12, 3) uint8 array, in COLORS order."""
    return np.array([rgb(c) for c in COLORS], dtype=np.uint8)


def caption(color: str, shape: str, background: str) -> str:
    """The prompt for a scene: ``a {color} {shape} on a {background} background``."""
    return f"a {color} {shape} on a {background} background"


def is_held_out(color: str, shape: str, background: str) -> bool:
    """Whether a scene is kept out of training (see the module docstring for the rule)."""
    return (COLORS.index(color) + SHAPES.index(shape) + COLORS.index(background)) % 12 == 0


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with colour != background: 396 scenes."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if c != b]


def train_combinations() -> list[tuple[str, str, str]]:
    return [t for t in all_combinations() if not is_held_out(*t)]


def held_out_combinations() -> list[tuple[str, str, str]]:
    return [t for t in all_combinations() if is_held_out(*t)]


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn, how big (bounding-box side in pixels) and where (centre)."""

    color: str
    shape: str
    background: str
    size: float
    cx: float
    cy: float

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.background)


def shape_mask(shape: str, size: float, cx: float, cy: float, resolution: int) -> np.ndarray:
    """Boolean (H, W) mask of a filled, upright shape whose bounding box is ``size`` wide.

    A pixel is inside when its centre is: circles of diameter ``size``, squares of side
    ``size``, isosceles triangles with base and height ``size``, apex up.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from: {', '.join(SHAPES)}")
    y, x = np.mgrid[0:resolution, 0:resolution].astype(np.float64) + 0.5
    half = size / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    top = cy - half
    inside_rows = (y >= top) & (y <= cy + half)
    return inside_rows & (np.abs(x - cx) <= (y - top) / 2)


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """Draw a scene as an (H, W, 3) uint8 sRGB array."""
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = rgb(scene.background)
    image[shape_mask(scene.shape, scene.size, scene.cx, scene.cy, resolution)] = rgb(scene.color)
    return image


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are drawn at random. Sizes are fractions of the image side."""

    resolution: int = 64
    min_size: float = 0.45
    max_size: float = 0.75
    jitter: bool = True  # random position (shape kept ``margin`` away from the border)
    margin: float = 0.08
    held_out: str = "exclude"  # "exclude" (training), "only" (evaluation) or "include"

    def __post_init__(self) -> None:
        if self.resolution < 64:
            raise ValueError(f"resolution must be at least 64, got {self.resolution}")
        if not 0 < self.min_size <= self.max_size <= 1 - 2 * self.margin:
            raise ValueError(
                "need 0 < min_size <= max_size <= 1 - 2 * margin, got "
                f"min_size={self.min_size}, max_size={self.max_size}, margin={self.margin}"
            )
        if self.held_out not in ("exclude", "only", "include"):
            raise ValueError(
                f"held_out must be 'exclude', 'only' or 'include', got {self.held_out!r}"
            )


DEFAULT = ShapesConfig()  # frozen: safe to share as a default argument


def combinations_for(held_out: str) -> list[tuple[str, str, str]]:
    return {
        "exclude": train_combinations,
        "only": held_out_combinations,
        "include": all_combinations,
    }[held_out]()


def random_scene(
    rng: np.random.Generator, config: ShapesConfig, combo: tuple[str, str, str] | None = None
) -> Scene:
    """Draw a scene: a uniformly chosen combination (unless given), size and position."""
    if combo is None:
        combos = combinations_for(config.held_out)
        combo = combos[int(rng.integers(len(combos)))]
    res = config.resolution
    size = float(rng.uniform(config.min_size, config.max_size)) * res
    if config.jitter:
        lo, hi = config.margin * res + size / 2, res - config.margin * res - size / 2
        cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
    else:
        cx = cy = res / 2
    return Scene(*combo, size=size, cx=cx, cy=cy)


def scenes(seed: int, count: int, config: ShapesConfig = DEFAULT) -> list[Scene]:
    """``count`` scenes, the same for the same seed and config."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, config) for _ in range(count)]


def iter_batches(
    seed: int, batch_size: int, config: ShapesConfig = DEFAULT
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """An endless stream of (B, H, W, 3) uint8 images and their captions, for training."""
    rng = np.random.default_rng(seed)
    while True:
        batch = [random_scene(rng, config) for _ in range(batch_size)]
        images = np.stack([render(s, config.resolution) for s in batch])
        yield images, [s.caption for s in batch]


def write_dataset(
    folder: str | os.PathLike,
    count: int,
    seed: int = 0,
    config: ShapesConfig = DEFAULT,
) -> list[Scene]:
    """Write ``count`` pictures as ``NNNNNN.png`` beside ``NNNNNN.txt`` (the caption)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    drawn = scenes(seed, count, config)
    for i, scene in enumerate(drawn):
        Image.fromarray(render(scene, config.resolution)).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(scene.caption + "\n", encoding="utf-8")
    return drawn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sd_pipeline.training.shapes",
        description="Write a folder of captioned shape pictures (name.png + name.txt).",
    )
    p.add_argument("folder")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--min-size", type=float, default=ShapesConfig.min_size)
    p.add_argument("--max-size", type=float, default=ShapesConfig.max_size)
    p.add_argument("--no-jitter", action="store_true", help="always centre the shape")
    p.add_argument("--held-out", choices=("exclude", "only", "include"), default="exclude")
    a = p.parse_args(argv)
    config = ShapesConfig(
        resolution=a.resolution,
        min_size=a.min_size,
        max_size=a.max_size,
        jitter=not a.no_jitter,
        held_out=a.held_out,
    )
    write_dataset(a.folder, a.count, a.seed, config)
    print(f"wrote {a.count} pictures to {a.folder}")


if __name__ == "__main__":
    main()
