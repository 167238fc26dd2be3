"""A LoRA teaches the bundled model a shape it has never seen: a five-pointed star.

    python benchmarks/lora_star.py data  runs/star/data     # 96 captioned star pictures (PIL)
    nohup python benchmarks/lora_star.py train runs/star > runs/star/train.log 2>&1 &
    python benchmarks/lora_star.py score runs/star/out/lora.safetensors

The bundled model (``StableDiffusion.default()``) was trained on circles, squares and triangles
only; "star" is a word its text encoder never saw in a caption. ``train`` runs ``sd-train lora``
(resumable: run it again after a stop and it continues from the last checkpoint) on its frozen
UNet and text encoder. ``score`` draws the same prompts and seeds with and without the LoRA and
measures each picture's shape against a star: the shape's mask (the pixels far from the
background colour) compared with the best-fitting star polygon (intersection over union), and
its solidity (area / convex hull area: about 1 for a filled circle, square or triangle, 0.6 for
these stars). It also reads the other shapes with the LoRA applied, to see what it costs them.
Results go to benchmarks/results/lora_star.md and lora_star.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sd_pipeline import StableDiffusion, image_grid
from sd_pipeline.loading import bundled_checkpoint
from sd_pipeline.training import TrainConfig, train
from sd_pipeline.training.evaluate import analyse
from sd_pipeline.training.shapes import COLORS, rgb
from sd_pipeline.training.shapes import shape_mask as dataset_shape

RESULTS = Path(__file__).parent / "results"
SIZE = 64
INNER = 0.45  # inner / outer radius of the star
# Scenes kept for scoring: colour pairs the training pictures never show together
TRAIN_PAIRS = [(c, b) for i, c in enumerate(COLORS) for j, b in enumerate(COLORS)
               if c != b and (i + 2 * j) % 4 == 0]  # fmt: skip
TEST_PAIRS = [(c, b) for i, c in enumerate(COLORS) for j, b in enumerate(COLORS)
              if c != b and (i + 2 * j) % 4 == 2][::2][:16]  # fmt: skip
RECIPE = {
    "mode": "lora",
    "resolution": SIZE,
    "batch_size": 8,
    "steps": 900,
    "lr": 2e-3,
    "warmup_steps": 50,
    "lr_schedule": "cosine",
    "network_dim": 16,
    "network_alpha": 16.0,
    "network_targets": "all",
    "train_text_encoder": True,
    "random_flip": True,
    "checkpoint_every": 50,
    "log_every": 10,
    "progress": False,
}


def star_points(cx, cy, radius, rotation=0.0):
    """The ten corners of a five-pointed star, point up at rotation 0."""
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * INNER
        a = rotation + math.pi * k / 5 - math.pi / 2
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw_star(color, background, cx, cy, radius, rotation=0.0, size=SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), rgb(background))
    ImageDraw.Draw(image).polygon(star_points(cx, cy, radius, rotation), fill=rgb(color))
    return image


def write_data(folder: Path, count: int = 96, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        color, background = TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
        radius = rng.uniform(0.25, 0.4) * SIZE
        cx, cy = (rng.uniform(radius, SIZE - radius) for _ in range(2))
        draw_star(color, background, cx, cy, radius).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"a {color} star on a {background} background")


def shape_mask(image: Image.Image) -> np.ndarray:
    """The pixels far from the background colour (the median of the border)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return np.sqrt(((a - np.median(border, axis=0)) ** 2).sum(axis=2)) > 60.0


def solidity(mask: np.ndarray) -> float:
    """Area over convex hull area (the hull of the pixels' corners: a full square gives 1)."""
    ys, xs = np.nonzero(mask)
    corners = {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist())
               for dx in (0, 1) for dy in (0, 1)}  # fmt: skip
    points = sorted(corners)

    def half(pts):
        hull = []
        for p in pts:
            while (
                len(hull) >= 2
                and (
                    (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                    - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                )
                <= 0
            ):
                hull.pop()  # fmt: skip
            hull.append(p)
        return hull

    hull = half(points)[:-1] + half(points[::-1])[:-1]
    area = 0.5 * abs(
        sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1]))
    )
    return float(mask.sum() / area) if area else 0.0


def star_iou(mask: np.ndarray) -> float:
    """The best intersection over union of the mask with a star at its centroid, over sizes
    and rotations."""
    if mask.sum() < 10:
        return 0.0
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    extent = np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2).max()
    best = 0.0
    for scale in np.linspace(0.8, 1.1, 7):
        for rotation in np.linspace(0, 2 * math.pi / 5, 12, endpoint=False):
            star = Image.new("L", mask.shape[::-1], 0)
            ImageDraw.Draw(star).polygon(star_points(cx, cy, extent * scale, rotation), fill=1)
            s = np.asarray(star, dtype=bool)
            best = max(best, (s & mask).sum() / (s | mask).sum())
    return float(best)


def nearest_shape(mask: np.ndarray) -> str:
    """The shape whose best-fitting template overlaps the mask most (intersection over union):
    star (:func:`star_iou`), or the bundled model's circle, square, triangle (each drawn by the
    dataset's own ``shape_mask`` over the mask's bounding box, a few sizes tried)."""
    if mask.sum() < 10:
        return "none"
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    scores = {"star": star_iou(mask)}
    for shape in ("circle", "square", "triangle"):
        fits = [dataset_shape(shape, side * k, cx, cy, mask.shape[0]) for k in (0.9, 1.0, 1.1)]
        scores[shape] = max((f & mask).sum() / (f | mask).sum() for f in fits)
    return max(scores, key=scores.get)


def vae_round_trip(pipe, folder: Path, count: int = 32) -> list[Image.Image]:
    """Training pictures encoded and decoded by the model's VAE: the most any generated
    picture can show of a star (its latents are 8x8 for 64x64 pixels)."""
    images = [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in range(count)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        z = pipe.vae.encode(x.float() / 127.5 - 1).mean
        y = pipe.vae.decode(z).float().clamp(-1, 1)
    out = ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in out]


def measures(images, wanted_colors=None) -> dict:
    masks = [shape_mask(im) for im in images]
    out = {
        "star IoU": np.mean([star_iou(m) for m in masks]),
        "solidity": np.mean([solidity(m) for m in masks if m.sum() >= 10]),
        "reads as a star": np.mean([nearest_shape(m) == "star" for m in masks]),
    }
    if wanted_colors is not None:
        out["colour right"] = np.mean(
            [analyse(im).color == w for im, w in zip(images, wanted_colors)]
        )
    return out


def train_run(root: Path) -> Path:
    if not (root / "data").is_dir():
        write_data(root / "data")
    config = TrainConfig(**{**RECIPE, "data": str(root / "data"), "out": str(root / "out"),
                            "checkpoint": str(bundled_checkpoint())})  # fmt: skip
    start = time.process_time()
    path = train(config, resume=True)
    print(f"trained {path} in {time.process_time() - start:.0f} s of CPU (this process)")
    return path


def score(lora_path: Path, seeds: int = 2) -> None:
    pipe = StableDiffusion.default()
    prompts = [f"a {c} star on a {b} background" for c, b in TEST_PAIRS]
    wanted = [c for _ in range(seeds) for c, _ in TEST_PAIRS]
    others = [f"a {c} {s} on a {b} background" for s in ("circle", "square", "triangle")
              for c, b in TEST_PAIRS[:4]]  # fmt: skip
    data = lora_path.parent.parent / "data"
    rows = {"training pictures through the VAE (the ceiling)": measures(vae_round_trip(pipe, data))}
    grids = []
    for label, weight in (("without LoRA", None), ("LoRA at 0.6", 0.6), ("LoRA at 1.0", 1.0)):
        pipe.unload_loras()
        if weight is not None:
            pipe.load_lora(lora_path, weight=weight)
        stars = [
            im for seed in range(seeds) for im in pipe.txt2img(prompts, seed=seed, progress=False)
        ]
        kept = pipe.txt2img(others, seed=0, progress=False)
        rows[label] = measures(stars, wanted)
        rows[label]["others right"] = np.mean(
            [analyse(im).shape == p.split()[2] for im, p in zip(kept, others)]
        )
        grids += stars[: len(prompts)]
    RESULTS.mkdir(exist_ok=True)
    grid = image_grid(grids, cols=len(prompts))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(RESULTS / "lora_star.png")
    columns = ["star IoU", "solidity", "reads as a star", "colour right", "others right"]
    lines = [
        "| | star IoU (mean) | solidity (mean) | reads as a star | star colour right "
        "| circles, squares, triangles read right |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        cells = [f"{r[c]:.3f}" if c in ("star IoU", "solidity") else f"{r[c]:.0%}" if c in r
                 else "" for c in columns]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    (RESULTS / "lora_star.md").write_text(
        f"`python benchmarks/lora_star.py score {lora_path}`: {len(prompts)} star prompts (colour "
        f"pairs not in the training pictures) x {seeds} seeds, the bundled model's defaults; "
        f"{len(others)} prompts of its own shapes for what the LoRA costs them.\n\n{text}\n\n"
        "![rows: without the LoRA, at 0.6, at 1.0](lora_star.png)\n"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["data", "train", "score"])
    p.add_argument("path", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread keeps the CPU time low
    if args.command == "data":
        write_data(args.path)
    elif args.command == "train":
        train_run(args.path)
    else:
        score(args.path)


if __name__ == "__main__":
    sys.exit(main())
