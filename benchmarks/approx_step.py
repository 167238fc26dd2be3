"""One UNet call of SD 1.5 (random weights) exact, with token merging, and as DeepCache's
shallow call, alternated call by call in one process (not a test): where ``approx.py`` times
whole generations, whose seconds drift with the machine's load over minutes, this interleaves
the three at the granularity of one call, so that a drift weighs on all alike.

    python benchmarks/approx_step.py --latent 64 --rounds 3      512 px, CFG's two context rows

DeepCache's speed at interval N follows: (full + (N - 1) x shallow) / (N x full).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sd_unet import DeepCache, UNet, UNetConfig, tome


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--branch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    opts = p.parse_args(argv)
    torch.set_num_threads(opts.threads)
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    unet = unet.to_empty(device="cpu").eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():  # random weights, 1/sqrt(fan-in), as run.py's
            scale = param[0].numel() ** -0.5 if param.dim() > 1 else 0.01
            param.copy_(torch.randn(param.shape, generator=g) * scale)
    x = torch.randn(1, 4, opts.latent, opts.latent, generator=g)
    context = torch.randn(2, 77, 768, generator=g)  # [negative; prompt]: latents shared
    t = torch.tensor([500.0])
    cached = DeepCache(unet, interval=10**6, branch=opts.branch)
    merging = tome.prepare(opts.ratio, seed=0)
    cases = {
        "exact": lambda: unet(x, t, context),
        f"tome {opts.ratio:g}": lambda: merged(),
        f"deepcache shallow (branch {opts.branch})": lambda: cached(x, t, context),
    }

    def merged():
        merging.attach(unet)
        try:
            return unet(x, t, context)
        finally:
            merging.detach(unet)

    times = {name: [] for name in cases}
    with torch.inference_mode():
        cached(x, t, context)  # the full call DeepCache keeps its feature from (and a warm-up)
        merged()
        names = list(cases)
        for i in range(opts.rounds):
            for name in names[i % 3 :] + names[: i % 3]:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
                print(f"round {i + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    exact = times["exact"]
    for name, ts in times.items():
        rounds = ", ".join(f"{a / b:.3f}" for a, b in zip(ts, exact))
        print(f"{name}: median {statistics.median(ts):.2f} s, ratio to exact "
              f"{statistics.median(ts) / statistics.median(exact):.3f} (per round {rounds})")  # fmt: skip


if __name__ == "__main__":
    main()
