"""Side-by-side timings against the reference implementations (not tests).

    python benchmarks/run.py --list                 the registered benchmarks
    python benchmarks/run.py --only unet            one (or several: --only unet vae)
    python benchmarks/run.py --only unet --rounds 3 --repeat 2 --threads 2

Every benchmark has two or more *sides* (ours, diffusers, ...). Each side runs in its own
subprocess (so its peak memory is its own), and the sides alternate round by round, so that
whatever else the machine is doing weighs on both alike: compare the ratio, not the seconds.
Results go to benchmarks/results/<name>.json and .md.

Adding a benchmark: write a function ``prepare(workdir) -> dict`` that makes what every side
needs (weights on disk, say) and one ``side(args) -> callable`` per side that loads its model
and returns the zero-argument function to time; register them with ``register(...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass
class Benchmark:
    name: str
    description: str
    prepare: callable  # (workdir: Path) -> dict of JSON-able arguments for the sides
    sides: dict[str, callable] = field(default_factory=dict)  # side -> (args) -> fn to time
    baseline: str = "diffusers"  # the side the ratio is taken against


REGISTRY: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    REGISTRY[benchmark.name] = benchmark
    return benchmark


# ---------------------------------------------------------------------------------------------
# UNet: one forward of the SD 1.5 UNet, batch 2, 4x64x64 latents, 77x768 context, float32


def _unet_prepare(workdir: Path) -> dict:
    import torch

    from sd_unet import UNet, UNetConfig

    path = workdir / "unet-sd15-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = UNet(UNetConfig.sd15())
        state = {}
        for name, p in model.state_dict().items():  # random weights; norm scales 1
            if p.dim() > 1:
                state[name] = torch.randn(p.shape) * (1 / p[0].numel()) ** 0.5
            elif name.endswith("weight"):  # GroupNorm, LayerNorm scales
                state[name] = torch.ones(p.shape)
            else:
                state[name] = torch.randn(p.shape) * 0.01
        model.load_state_dict(state, assign=True)
        model.save(path)
        del model, state
    return {"weights": str(path)}


def _unet_inputs(batch=2, size=64, tokens=77, width=768):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, tokens, width, generator=g)
    return x, torch.full((batch,), 500.0), context


def _unet_ours(args: dict):
    import torch

    from sd_unet import UNet

    model = UNet.from_checkpoint(args["weights"])
    x, t, c = _unet_inputs()

    def run():
        with torch.inference_mode():
            return model(x, t, c)

    return run


def _unet_diffusers(args: dict):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from sd_unet import UNetConfig
    from sd_unet.weights import diffusers_config, diffusers_key_map

    config = UNetConfig.sd15()
    names = diffusers_key_map(config)  # the same weights, in diffusers' names
    state = {names[k]: v for k, v in load_file(args["weights"]).items()}
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = UNet2DConditionModel(**kwargs)
    model.load_state_dict(state, assign=True)
    model.eval()
    del state
    x, t, c = _unet_inputs()

    def run():
        with torch.inference_mode():
            return model(x, t, c).sample

    return run


register(
    Benchmark(
        name="unet",
        description="SD 1.5 UNet forward, batch 2, 4x64x64 latents, 77x768 context, float32",
        prepare=_unet_prepare,
        sides={"ours": _unet_ours, "diffusers": _unet_diffusers},
    )
)


# ---------------------------------------------------------------------------------------------
# Running


def _worker(name: str, side: str, args: dict, warmup: int, repeat: int) -> dict:
    """In a subprocess: set up one side, time it, report seconds and peak RSS."""
    fn = REGISTRY[name].sides[side](args)
    for _ in range(warmup):
        fn()
    times, cpu_times = [], []
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # all threads: less hurt by contention
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"times": times, "cpu_times": cpu_times, "peak_rss": peak}


def _run_side(name, side, args, opts) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    cmd = [sys.executable, __file__, "--worker", name, side, json.dumps(args)]
    cmd += ["--warmup", str(opts.warmup), "--repeat", str(opts.repeat)]
    cmd += ["--threads", str(opts.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name}/{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(name: str, runs: dict[str, list[dict]], opts) -> dict:
    bench = REGISTRY[name]
    sides = {}
    for side, results in runs.items():
        times = [t for r in results for t in r["times"]]
        cpu_times = [t for r in results for t in r["cpu_times"]]
        sides[side] = {
            "cpu_median_s": statistics.median(cpu_times),
            "cpu_times_s": cpu_times,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "times_s": times,
            "peak_rss_gb": max(r["peak_rss"] for r in results) / 1e9,
        }
    base = sides[bench.baseline]
    for side, s in sides.items():
        # round-by-round ratios: each pair was measured back to back under the same load
        pairs = [
            statistics.median(a["times"]) / statistics.median(b["times"])
            for a, b in zip(runs[side], runs[bench.baseline])
        ]
        s["ratio"] = s["median_s"] / base["median_s"]
        s["cpu_ratio"] = s["cpu_median_s"] / base["cpu_median_s"]
        s["ratio_per_round"] = pairs
    return {
        "benchmark": name,
        "description": bench.description,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "threads": opts.threads,
        "rounds": opts.rounds,
        "repeat": opts.repeat,
        "warmup": opts.warmup,
        "baseline": bench.baseline,
        "sides": sides,
    }


def _markdown(s: dict) -> str:
    lines = [
        f"# {s['benchmark']}: {s['description']}",
        "",
        f"{s['date']}; {s['machine']}; {s['threads']} threads; {s['rounds']} rounds of "
        f"{s['repeat']} timed calls after {s['warmup']} warm-up, sides alternating, each in "
        "its own process.",
        "",
        f"| side | median | min-max | ratio to {s['baseline']} | per-round ratios "
        "| CPU-time median | CPU-time ratio | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, r in s["sides"].items():
        per_round = ", ".join(f"{x:.3f}" for x in r["ratio_per_round"])
        lines.append(
            f"| {side} | {r['median_s']:.2f} s | {r['min_s']:.2f}-{r['max_s']:.2f} s | "
            f"{r['ratio']:.3f} | {per_round} | {r['cpu_median_s']:.2f} s | "
            f"{r['cpu_ratio']:.3f} | {r['peak_rss_gb']:.2f} GB |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--repeat", type=int, default=1, help="timed calls per process (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--workdir", type=Path, help="where shared inputs (weights) are cached")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.worker:
        import torch

        torch.set_num_threads(opts.threads)
        name, side, args = opts.worker
        print(json.dumps(_worker(name, side, json.loads(args), opts.warmup, opts.repeat)))
        return
    if opts.list:
        for b in REGISTRY.values():
            print(f"{b.name:12s} {b.description} (sides: {', '.join(b.sides)})")
        return
    names = opts.only or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(REGISTRY)}")
    workdir = opts.workdir or Path(tempfile.gettempdir()) / "sd-benchmarks"
    workdir.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        bench = REGISTRY[name]
        args = bench.prepare(workdir)
        runs = {side: [] for side in bench.sides}
        for i in range(opts.rounds):
            for side in bench.sides:
                r = _run_side(name, side, args, opts)
                runs[side].append(r)
                times = ", ".join(f"{t:.2f}" for t in r["times"])
                times += " (CPU " + ", ".join(f"{t:.2f}" for t in r["cpu_times"]) + ")"
                print(f"{name} round {i + 1}/{opts.rounds} {side}: {times} s, "
                      f"peak RSS {r['peak_rss'] / 1e9:.2f} GB", flush=True)  # fmt: skip
        summary = _summary(name, runs, opts)
        (opts.out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
        (opts.out / f"{name}.md").write_text(_markdown(summary))
        print(_markdown(summary))


if __name__ == "__main__":
    main()
