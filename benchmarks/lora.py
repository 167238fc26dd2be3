"""LoRA speed at SD 1.5 size (not a test): merging, and the cost of an unmerged LoRA per step.

    python benchmarks/lora.py                          rank 128 on the 192 transformer layers
    python benchmarks/lora.py --conv                   and LoCon on the ResBlocks' convolutions
    python benchmarks/lora.py --device cuda --dtype float16 --rounds 10

Goals (issue 19): merging a rank-128 LoRA takes under a second per 100 layers on the CPU; an
unmerged (attached) LoRA adds under 10% to a UNet step (``sd_lora.attached``: each layer's
update beside it or folded into the weight it computes with, whichever costs less). A UNet with random SD 1.5 weights and a
kohya LoRA on the layers kohya trains by default (attention, feed-forward and the 1x1
projections of each SpatialTransformer; with --conv also the ResBlocks' 3x3 convolutions) are
made in memory. One process; the merge's two ways (in place, then with a kept copy: sd-lora's
``merge(in_place=)``) and the step variants (plain, merged, attached) alternate round by round,
so that whatever else the machine does weighs on each alike: compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sd_lora import LoRA
from sd_lora.names import unet_diffusers_names
from sd_unet import UNet, UNetConfig

TRANSFORMER_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                      "proj_in", "proj_out")  # fmt: skip
CONV_LAYERS = ("in_layers.2", "out_layers.3")


def make_unet(device, dtype) -> UNet:
    with torch.device("meta"):
        unet = UNet(UNetConfig.sd15())
    unet = unet.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02, generator=g)
    unet = unet.to(dtype=dtype).eval()
    if torch.device(device).type == "cpu":
        unet = unet.to(memory_format=torch.channels_last)  # as from_checkpoint leaves it
    return unet


def make_lora(unet: UNet, rank: int, conv: bool) -> LoRA:
    """A kohya file's tensors (diffusers names, float16 as kohya saves them) for ``unet``."""
    wanted = TRANSFORMER_LAYERS + (CONV_LAYERS if conv else ())
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    theirs = unet_diffusers_names(list(modules))
    g = torch.Generator().manual_seed(1)
    state = {}
    for path, m in modules.items():
        if not path.endswith(wanted):
            continue
        key = "lora_unet_" + theirs[path].replace(".", "_")
        w = m.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.01
        up = torch.randn(w.shape[0], rank, *((1, 1) if w.dim() == 4 else ()), generator=g) * 0.01
        state[f"{key}.lora_down.weight"] = down.half()
        state[f"{key}.lora_up.weight"] = up.half()
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    return LoRA.from_state_dict(state, name=f"rank{rank}")


def arithmetic_floor(lora: LoRA, unet: UNet):
    """The merge's matrix products alone, float32 factors ready, written into outputs whose
    memory is touched already: what no merge can beat on this machine at this moment."""
    pairs = [(layer.tensors, m.weight) for layer, m in lora.targets(unet)]
    factors = [(t["lora_up.weight"].flatten(1).float().to(w.device),
                t["lora_down.weight"].flatten(1).float().to(w.device),
                w.detach().reshape(w.shape[0], -1).contiguous()) for t, w in pairs]  # fmt: skip
    outs = [torch.zeros_like(w) for _, _, w in factors]  # (out, in * kh * kw) matrices

    def run():
        for (up, down, w), out in zip(factors, outs):
            torch.addmm(w, up, down, out=out)

    return run


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--conv", action="store_true", help="LoCon on the ResBlock convs too")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    parser.add_argument("--rounds", type=int, default=3, help="0: time the merge only")
    parser.add_argument("--merges", type=int, default=3, help="merge / unmerge cycles timed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    opts = parser.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device, dtype = opts.device, getattr(torch, opts.dtype)

    unet = make_unet(device, dtype)
    lora = make_lora(unet, opts.rank, opts.conv)
    layers = len(lora.keys())
    print(f"{lora!r} on an SD 1.5 UNet ({opts.dtype}, {device}, {torch.get_num_threads()} threads)")

    # A process's first merges, before this benchmark makes its own copies (the state to
    # compare with, the floor's outputs: 4.5 GB), which leave fresh memory scarcer and slower
    # to fault in than in a process that only loads a model and merges
    firsts = {}
    sample = [m.weight for _, m in lora.targets(unet)[:8]]  # for the first in-place drift
    originals = [w.detach().clone() for w in sample]
    for mode, in_place in (("kept copy", False), ("in place", True)):
        firsts[mode] = timed(lambda m=in_place: lora.merge(unet, in_place=m), device)
        lora.unmerge(unet)

    def relative_drift(pairs) -> float:
        return max((a - b).abs().max().item() / b.abs().max().item() for a, b in pairs)

    drift = relative_drift(zip((m.weight for _, m in lora.targets(unet)[:8]), originals))
    del sample, originals
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    floor = arithmetic_floor(lora, unet)
    modes = {"kept copy": False, "in place": True}
    merges = {mode: [] for mode in modes}
    unmerges = {mode: [] for mode in modes}
    cpu, floors, exact = [], [], None
    for _ in range(opts.merges):  # alternating with the floor: the same load weighs on both
        for mode, in_place in modes.items():
            start = time.process_time()
            merges[mode].append(timed(lambda m=in_place: lora.merge(unet, in_place=m), device))
            cpu.append(time.process_time() - start)
            unmerges[mode].append(timed(lambda: lora.unmerge(unet), device))
            after = unet.state_dict()
            if in_place:  # back to float32 rounding: how far, relative to each tensor's scale
                drift = max(drift, relative_drift((after[k], v) for k, v in before.items()))
            elif exact is None:  # the first cycle, before any in-place merge
                exact = all(torch.equal(after[k], v) for k, v in before.items())
        floors.append(timed(floor, device))
    for mode in modes:
        merge, unmerge = statistics.median(merges[mode]), statistics.median(unmerges[mode])
        first = firsts[mode]
        print(f"merge ({mode}) {merge:.3f} s ({merge / layers * 100:.3f} s per 100 layers; goal "
              f"< 1; first {first:.3f} s, {first / layers * 100:.3f} s per 100 layers), "
              f"unmerge {unmerge:.4f} s, {layers} layers")  # fmt: skip
    print(f"the merge's arithmetic alone (each layer's addmm into memory written before): "
          f"{statistics.median(floors):.3f} s; merge / that: in place "
          f"{statistics.median(m / f for m, f in zip(merges['in place'], floors)):.2f}, kept copy "
          f"{statistics.median(m / f for m, f in zip(merges['kept copy'], floors)):.2f}; CPU time "
          f"of a merge {statistics.median(cpu):.3f} s")  # fmt: skip
    merge = statistics.median(merges["in place"])
    # The merge is matrix products (rank x out x in multiply-adds a layer): beside it, one
    # product of as many FLOPs, to tell the merge's overhead from a busy or slow machine
    flops = sum(2 * layer.rank * layer.tensors["lora_up.weight"].shape[0]
                * layer.tensors["lora_down.weight"][0].numel() for layer in lora.layers.values())  # fmt: skip
    n = 4096
    a = torch.randn(n, n, device=device)
    product = statistics.median(timed(lambda: a @ a, device) for _ in range(3))
    peak = 2 * n**3 / product
    print(
        f"merge: {flops / 1e9:.1f} GFLOP, {flops / merge / 1e9:.1f} GFLOP/s; a {n}^3 float32 "
        f"product here now: {peak / 1e9:.1f} GFLOP/s (the merge at {flops / merge / peak:.0%})"
    )
    del a
    print(f"after a kept-copy unmerge the weights equal the originals bit for bit: {exact}; "
          f"after an in-place one, to {drift:.1e} of each tensor's largest value")  # fmt: skip
    del before
    if opts.rounds == 0:
        return

    g = torch.Generator(device=device).manual_seed(0)
    shape = (opts.batch, 4, opts.latent, opts.latent)
    x = torch.randn(shape, generator=g, device=device).to(dtype)
    context = torch.randn(opts.batch, 77, 768, generator=g, device=device).to(dtype)
    t = torch.full((opts.batch,), 500.0, device=device)

    def step():
        with torch.no_grad():
            return unet(x, t, context)

    variants = {
        "plain": (lambda: None, lambda: None),
        "merged": (lambda: lora.merge(unet), lambda: lora.unmerge(unet)),
        "attached": (lambda: lora.attach(unet), lambda: lora.detach(unet)),
    }
    times = {name: [] for name in variants}
    outputs = {}
    for round_ in range(opts.rounds + 1):  # round 0: warm-up, untimed
        for name, (on, off) in variants.items():
            on()
            seconds = timed(lambda name=name: outputs.__setitem__(name, step()), device)
            off()
            if round_:
                times[name].append(seconds)
    plain = statistics.median(times["plain"])
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"{name:9s} step {median:.4f} s (median of {len(ts)}), ratio to plain "
              f"{median / plain:.3f}, finite {bool(torch.isfinite(outputs[name]).all())}")  # fmt: skip
    for base in ("merged", "plain"):  # per round: the sides ran back to back, under one load
        ratios = [a / b for a, b in zip(times["attached"], times[base])]
        print(f"attached / {base} per round: {', '.join(f'{r:.3f}' for r in ratios)}; median "
              f"{statistics.median(ratios):.3f} (goal < 1.10)")  # fmt: skip
    a, b = outputs["attached"].float(), outputs["merged"].float()
    print(
        f"attached vs merged output: max relative difference {((a - b).abs().max() / b.abs().max()).item():.2e}"
    )


if __name__ == "__main__":
    main()
