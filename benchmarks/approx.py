"""The approximate speed-ups (not a test): token merging and DeepCache against the exact UNet,
in speed and in how far the image moves.

    python benchmarks/approx.py                                  the bundled model, 64 px
    python benchmarks/approx.py --model sd15 --size 256 --rounds 2   random SD 1.5 weights
    python benchmarks/approx.py --model sd15 --size 512 --rounds 3   full size (long)

Each case (exact; ToMe 0.5; DeepCache 3; both) runs the same txt2img request (DDIM, CFG 7.5,
one image, the same seed), to latents: that is the part the speed-ups change (the VAE decode
after it is the same for all). The cases take turns within each round, in a rotated order, so
that the machine's other load weighs on all alike: read the ratios (per round and their
median), not the seconds. Each case's latents are then decoded once (untimed) and compared
with the exact image: the mean absolute difference in 8-bit pixel levels, and SSIM (Wang et
al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, on the luminance), both computed
here (``ssim`` is checked against a plain window-by-window loop at start). Results go to
benchmarks/results/approx.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from run import _machine, _versions

HERE = Path(__file__).resolve().parent
PROMPT = "a red circle above a blue square"
CASES = {
    "exact": {},
    "tome 0.5": {"token_merging_ratio": 0.5},
    "deepcache 3": {"deepcache_interval": 3},
    "tome 0.5 + deepcache 3": {"token_merging_ratio": 0.5, "deepcache_interval": 3},
}


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> 8-bit levels (rounded, as a PNG stores them) -> (B, 1, H, W)
    luminance (ITU-R BT.601), float64."""
    levels = ((images.double() + 1) * 127.5).round().clamp(0, 255)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    return (levels * weights).sum(1, keepdim=True)


def _window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, peak: float = 255.0) -> float:
    """Mean SSIM of two (B, 1, H, W) images over every full 11x11 window."""
    w = _window()[None, None]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean().item()


def _ssim_by_loop(a: torch.Tensor, b: torch.Tensor, peak: float = 255.0) -> float:
    """The same, one window at a time with weighted statistics (the check of ``ssim``)."""
    w, size = _window(), 11
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    values = []
    for i in range(a.shape[-2] - size + 1):
        for j in range(a.shape[-1] - size + 1):
            x, y = a[0, 0, i : i + size, j : j + size], b[0, 0, i : i + size, j : j + size]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cxy = (w * (x - mx) * (y - my)).sum()
            values.append(
                (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return torch.stack(values).mean().item()


def check_ssim() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 24, 20, generator=g, dtype=torch.float64) * 255
    b = (a + torch.randn(a.shape, generator=g, dtype=torch.float64) * 20).clamp(0, 255)
    assert abs(ssim(a, a) - 1) < 1e-12
    assert abs(ssim(a, b) - _ssim_by_loop(a, b)) < 1e-9, (ssim(a, b), _ssim_by_loop(a, b))


def load(opts):
    from sd_pipeline import StableDiffusion

    if opts.model == "bundled":
        return StableDiffusion.default()
    weights = Path(tempfile.gettempdir()) / "sd-benchmarks" / "sd15-full-random.safetensors"
    if not weights.exists():  # the file run.py writes: random SD 1.5 weights, one single file
        from run import _checkpoint_prepare

        _checkpoint_prepare(weights.parent, argparse.Namespace(size="full"))
    return StableDiffusion.from_checkpoint(weights, native_size=opts.size)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=("bundled", "sd15"), default="bundled",
                   help="bundled: the package's small trained model (real pictures); sd15: "
                        "random SD 1.5 weights (run.py's file)")  # fmt: skip
    p.add_argument("--size", type=int, help="image side (default: the model's native size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results")
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    check_ssim()
    load_before = os.getloadavg()
    pipe = load(opts)
    side = opts.size or pipe.native_size
    from sd_pipeline import GenerationRequest

    base = GenerationRequest(prompts=(PROMPT,), steps=opts.steps, sampler="ddim",
                             guidance_scale=7.5, seed=0, width=side, height=side,
                             output_type="latent")  # fmt: skip
    times = {name: [] for name in CASES}
    latents = {}
    with torch.inference_mode():
        pipe.run(dataclasses.replace(base, steps=1), progress=False)  # warm-up
        names = list(CASES)
        for i in range(opts.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                start = time.perf_counter()
                out = pipe.run(dataclasses.replace(base, **CASES[name]), progress=False)
                times[name].append(time.perf_counter() - start)
                latents.setdefault(name, out)
                print(f"round {i + 1}/{opts.rounds} {name}: {times[name][-1]:.2f} s", flush=True)
        images = {name: luminance(pipe.decode(z)) for name, z in latents.items()}
    summary = summarise(opts, side, times, images, load_before)
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = f"approx-{opts.model}"
    (opts.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (opts.out / f"{stem}.md").write_text(markdown(summary))
    print(markdown(summary))


def summarise(opts, side, times, images, load_before) -> dict:
    exact = times["exact"]
    cases = {}
    for name, ts in times.items():
        per_round = [t / e for t, e in zip(ts, exact)]
        diff = (images[name] - images["exact"]).abs()
        cases[name] = {
            "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "times_s": ts,
            "ratio": statistics.median(ts) / statistics.median(exact),
            "ratio_per_round": per_round,
            "mean_abs_diff": diff.mean().item(), "max_abs_diff": diff.max().item(),
            "ssim": ssim(images[name], images["exact"]),
        }  # fmt: skip
    return {
        "benchmark": "approx",
        "model": opts.model,
        "image": side,
        "steps": opts.steps,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "versions": _versions(),
        "threads": opts.threads,
        "rounds": opts.rounds,
        "load_average": [round(x, 1) for x in (*load_before, *os.getloadavg())],
        "cases": cases,
    }


def markdown(s: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v)
    load = s["load_average"]
    lines = [
        f"# approx: ToMe and DeepCache against the exact UNet ({s['model']} model)", "",
        f"{s['date']}; {s['machine']}; {versions}; {s['threads']} threads; {s['image']} px, "
        f"{s['steps']} DDIM steps, CFG 7.5, one image, to latents; {s['rounds']} rounds, the "
        "cases alternating within each (rotated order), one process. The machine was shared "
        f"with other agents' work (load average {load[0]:g} at the start, {load[3]:g} at the "
        "end, on 2 cores): read the ratios, not the seconds.", "",
        "Image difference against the exact image (8-bit levels, luminance): mean absolute "
        "difference, largest difference, SSIM (1 = the same).", "",
        "| case | median (min-max) | time ratio to exact | per-round ratios | mean abs diff "
        "| max abs diff | SSIM |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, c in s["cases"].items():
        rounds = ", ".join(f"{r:.3f}" for r in c["ratio_per_round"])
        lines.append(
            f"| {name} | {c['median_s']:.2f} s ({c['min_s']:.2f}-{c['max_s']:.2f}) | "
            f"{c['ratio']:.3f} | {rounds} | {c['mean_abs_diff']:.2f} | {c['max_abs_diff']:.0f} | "
            f"{c['ssim']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
