"""The SD 1.5 UNet step, ours and diffusers' in one process (not a test), as a user comparing
both would run them: the two models (the same random weights, run.py's single file) held at
once, calls alternated.

    python benchmarks/unet_same_process.py --rounds 5

run.py gives each side its own process, so that neither's allocations or threads' state weigh
on the other; this is the check that the ratio holds when they share one (issue 24). Batch 2,
64x64 latents, 77x768 context, float32, one warm-up call a side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from run import _checkpoint_prepare, _machine, _unet_diffusers, _unet_ours, _versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "sd-benchmarks")  # fmt: skip
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    args = _checkpoint_prepare(opts.workdir, SimpleNamespace(size="full"))
    sides = {"ours": _unet_ours(args), "diffusers": _unet_diffusers(args)}
    outputs = {name: run() for name, run in sides.items()}  # warm-up
    a, b = outputs["ours"], outputs["diffusers"]
    same = ((a - b).abs().max() / b.abs().max()).item()
    times = {name: [] for name in sides}
    for _ in range(opts.rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    ratios = [o / d for o, d in zip(times["ours"], times["diffusers"])]
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    print(f"{_machine()}; {versions}; {opts.threads} threads; {opts.rounds} alternated rounds "
          f"in one process; outputs differ by {same:.1e} (relative)")  # fmt: skip
    for name, ts in times.items():
        print(f"  {name:10s} median {statistics.median(ts):.3f} s "
              f"(range {min(ts):.3f}-{max(ts):.3f})")  # fmt: skip
    ratio = statistics.median(times["ours"]) / statistics.median(times["diffusers"])
    rounds = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"  ours / diffusers: ratio of medians {ratio:.3f}; per round {rounds}")


if __name__ == "__main__":
    main()
