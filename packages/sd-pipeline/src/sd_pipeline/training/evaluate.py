"""Read a shapes picture back, and score a text-to-image model on the shapes prompts.

:func:`analyse` is deterministic and knows nothing about the generator's random choices:

- background: the palette colour nearest to the median of the border pixels;
- shape colour: the palette colour (other than the background) nearest to the median of the
  pixels far from the background colour;
- shape: from the mask of pixels nearer the shape colour than the background (largest blob),
  the fill ratio of its bounding box (circle pi/4 ~ 0.785, square 1, triangle 0.5) and how the
  width grows from the top quarter to the bottom quarter (a triangle's apex is up).

:func:`evaluate` generates one picture per prompt with a pipeline and reports the accuracy of
each of the three reads, separately for the combinations seen in training and the held-out
ones::

    python -m sd_pipeline.training.evaluate --count 240 --steps 20
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sd_pipeline.training.shapes import COLORS, caption, is_held_out, palette_array

log = logging.getLogger(__name__)

_PALETTE = palette_array().astype(np.float64)


@dataclass(frozen=True)
class Reading:
    """What the analyser sees in one picture."""

    color: str | None  # None when no shape was found
    shape: str | None
    background: str
    fill: float  # foreground pixels / bounding-box area
    taper: float  # width at 1/4 height / width at 3/4 height (triangle ~ 1/3)


def _nearest(colour: np.ndarray, exclude: int | None = None) -> int:
    d = ((_PALETTE - colour) ** 2).sum(axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    return int(np.argmin(d))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (flood fill, no scipy needed)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


def _classify(mask: np.ndarray) -> tuple[str, float, float]:
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    height, width = bottom - top + 1, right - left + 1
    fill = float(mask.sum()) / float(height * width)
    widths = mask[top : bottom + 1].sum(axis=1).astype(np.float64)
    quarter = max(1, height // 4)
    upper = widths[quarter // 2 : quarter + quarter // 2 + 1].mean()  # around 1/4 of the height
    lower = widths[height - quarter - quarter // 2 - 1 : height - quarter // 2].mean()
    taper = float(upper / max(lower, 1.0))
    if taper < 0.65 and fill < 0.7:
        return "triangle", fill, taper
    return ("square" if fill > 0.89 else "circle"), fill, taper


def analyse(image) -> Reading:
    """Read background colour, shape colour and shape from an RGB picture (PIL or HxWx3)."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {a.shape}")
    a = a.astype(np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = _nearest(np.median(border, axis=0))
    bg_rgb = _PALETTE[bg]
    dist_bg = np.sqrt(((a - bg_rgb) ** 2).sum(axis=2))
    far = dist_bg > 60.0
    if far.sum() < 0.01 * far.size:
        return Reading(None, None, COLORS[bg], 0.0, 0.0)
    fg = _nearest(np.median(a[far], axis=0), exclude=bg)
    dist_fg = np.sqrt(((a - _PALETTE[fg]) ** 2).sum(axis=2))
    mask = _largest_blob(dist_fg < dist_bg)
    shape, fill, taper = _classify(mask)
    return Reading(COLORS[fg], shape, COLORS[bg], fill, taper)


def evaluation_prompts(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``count`` scenes: every held-out combination first, the rest drawn from the seen ones.

    Deterministic. A third of the list is held-out scenes (cycling through all 32 of them, so
    each appears at least twice in 200 prompts); the rest are distinct seen combinations.
    """
    from sd_pipeline.training.shapes import held_out_combinations, train_combinations

    rng = np.random.default_rng(seed)
    held = held_out_combinations()
    n_held = count // 3
    held_part = [held[i % len(held)] for i in range(n_held)]
    seen = train_combinations()
    seen_part = [seen[i] for i in rng.permutation(len(seen))[: count - n_held]]
    return held_part + seen_part


@dataclass
class Scores:
    count: int = 0
    color: int = 0
    shape: int = 0
    background: int = 0
    all: int = 0

    def add(self, want: tuple[str, str, str], got: Reading) -> None:
        c, s, b = want
        self.count += 1
        self.color += got.color == c
        self.shape += got.shape == s
        self.background += got.background == b
        self.all += (got.color, got.shape, got.background) == (c, s, b)

    def rates(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "count": self.count,
            "color": self.color / n,
            "shape": self.shape / n,
            "background": self.background / n,
            "all": self.all / n,
        }


def score(scenes: Sequence[tuple[str, str, str]], images: Sequence) -> dict[str, dict]:
    """Accuracy of the analyser's reads against the intended scenes, seen vs held-out."""
    if len(scenes) != len(images):
        raise ValueError(f"{len(scenes)} scenes but {len(images)} images")
    groups = {"seen": Scores(), "held_out": Scores(), "total": Scores()}
    for want, image in zip(scenes, images):
        got = analyse(image)
        groups["held_out" if is_held_out(*want) else "seen"].add(want, got)
        groups["total"].add(want, got)
    return {k: v.rates() for k, v in groups.items()}


def evaluate(
    pipe,
    count: int = 240,
    *,
    steps: int = 20,
    sampler: str | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Generate one picture per evaluation prompt with ``pipe`` and score them."""
    scenes = evaluation_prompts(count, seed)
    extra = {}
    if sampler is not None:
        extra["sampler"] = sampler
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    images = []
    start = time.perf_counter()
    for i in range(0, len(scenes), batch_size):
        prompts = [caption(*scene) for scene in scenes[i : i + batch_size]]
        # image j of a batch uses seed + i + j: the same as one call per prompt
        images += pipe.txt2img(prompts, steps=steps, seed=seed + i, progress=False, **extra)
    seconds = time.perf_counter() - start
    result = score(scenes, images)
    result["seconds_per_image"] = seconds / max(len(scenes), 1)
    result["settings"] = {"count": count, "steps": steps, "seed": seed, **extra}
    return result


def format_report(result: dict) -> str:
    lines = [f"{'group':<10}{'n':>6}{'colour':>9}{'shape':>9}{'backgr.':>9}{'all 3':>9}"]
    for name in ("seen", "held_out", "total"):
        r = result[name]
        lines.append(
            f"{name:<10}{r['count']:>6}{r['color']:>9.1%}{r['shape']:>9.1%}"
            f"{r['background']:>9.1%}{r['all']:>9.1%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sd_pipeline.training.evaluate",
        description="Score a model on 'a {color} {shape} on a {color} background' prompts.",
    )
    p.add_argument("--checkpoint", help="model to evaluate (default: the bundled model)")
    p.add_argument("--count", type=int, default=240, help="number of prompts (>= 200 advised)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    from sd_pipeline import StableDiffusion

    pipe = (
        StableDiffusion.from_checkpoint(a.checkpoint) if a.checkpoint else StableDiffusion.default()
    )
    result = evaluate(
        pipe,
        a.count,
        steps=a.steps,
        sampler=a.sampler,
        guidance_scale=a.guidance_scale,
        seed=a.seed,
    )
    print(format_report(result))
    print(f"{result['seconds_per_image']:.2f} s per image")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


__all__ = ["Reading", "analyse", "evaluate", "evaluation_prompts", "score"]

if __name__ == "__main__":
    main()
