"""One SDXL UNet step, ours against diffusers' UNet2DConditionModel on the same random weights
(not a test): 1024 x 1024 pixels (128 x 128 latents), float32 on the CPU (or ``--device cuda
--dtype float16``), two rows of context and added conditioning, as one classifier-free-guided
image or a batch of two.

    python benchmarks/sdxl_unet.py                     full size: 2.6 B parameters, ~10 GB a side
    python benchmarks/sdxl_unet.py --rounds 5 --threads 16
    python benchmarks/sdxl_unet.py --small             the tiny SDXL-shaped UNet: a smoke check
    python benchmarks/sdxl_unet.py --one-at-a-time     one side's process after the other's
    python benchmarks/sdxl_unet.py --device cuda --dtype float16 --rounds 10

Each side runs in its own worker process, so that its peak memory (the process's maximum
resident set) is its own; the main process alternates the rounds between them, so that the
machine's other load weighs on both alike. That holds both models at once (~20 GB at full size);
``--one-at-a-time`` runs one side's warm-up and rounds, ends its process, then the other's, for
a machine with room for one (then only an idle machine gives a fair ratio). ``--mode guided`` (the default) is how the pipelines
call it for one image: diffusers gets the latents twice (batch 2), ours once with the two
context rows (sd-unet's shared latents); ``--mode batch`` gives both a batch of two latents.

The weights are made in each worker from the same seeds (tensor by tensor, in the SGM single
file's names), ours loaded as they are, diffusers' through its own single-file converter
(``convert_ldm_unet_checkpoint``), so that no file of 10 GB is written.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
import zlib

import torch


def config(small: bool):
    from sd_unet import UNetConfig

    return UNetConfig.tiny_sdxl() if small else UNetConfig.sdxl()


def random_state(unet_config) -> dict[str, torch.Tensor]:
    """Our UNet's tensors, each from a generator seeded by its name (both workers agree)."""
    from sd_unet import UNet

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(unet_config).state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        scale = 1 / max(1, torch.Size(shape[1:]).numel()) ** 0.5 if len(shape) > 1 else 0.02
        state[name] = torch.randn(shape, generator=g) * scale
    return state


def inputs(unet_config, latent: int, mode: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 if mode == "guided" else 2, 4, latent, latent, generator=g)
    t = torch.tensor([500.0] * x.shape[0])
    context = torch.randn(2, 77, unet_config.context_dim, generator=g)
    pooled = torch.randn(2, unet_config.adm_in_channels - 6 * 256, generator=g)
    return x, t, context, pooled


def build(side: str, small: bool, latent: int, mode: str, device: str = "cpu",
          dtype: torch.dtype = torch.float32):  # fmt: skip
    """The side's step function, with its model and inputs made in this process."""
    from sd_unet import UNet, sdxl_conditioning

    c = config(small)
    state = random_state(c)
    x, t, context, pooled = inputs(c, latent, mode)
    x, context, pooled = (v.to(device, dtype) for v in (x, context, pooled))
    t = t.to(device)  # timesteps stay float32
    size = (latent * 8, latent * 8)
    if side == "ours":
        with torch.device("meta"):
            model = UNet(c)
        model.load_state_dict(state, assign=True)
        model = model.eval().to(device, dtype)
        if device == "cpu":
            model = model.to(memory_format=torch.channels_last)  # as from_checkpoint does
        y = sdxl_conditioning(pooled, size, (0, 0), size).to(device, dtype)
        return lambda: model(x, t, context, y=y)
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sd_unet.weights import diffusers_config

    d = diffusers_config(c)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v
                                             for k, v in state.items()}, d)  # fmt: skip
    del state
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(**d)
    model.load_state_dict(converted, assign=True)
    model = model.eval().to(device, dtype)
    x2, t2 = (torch.cat([x, x]), torch.cat([t, t])) if mode == "guided" else (x, t)
    time_ids = torch.tensor([[*size, 0.0, 0.0, *size]] * 2).to(device, dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    return lambda: model(x2, t2, context, added_cond_kwargs=added)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class RssWatch:
    """The largest resident set seen while it runs (sampled every millisecond), in MiB."""

    def __init__(self):
        import threading

        self.peak, self.running = rss_mib(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.001)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak


def worker(side: str, opts: dict, conn) -> None:
    import diffusers  # noqa: F401  (both sides import the same, so their baselines compare)

    torch.set_num_threads(opts["threads"])
    baseline = rss_mib()
    device, dtype = opts["device"], getattr(torch, opts["dtype"])
    build_step = build(side, opts["small"], opts["latent"], opts["mode"], device, dtype)

    def step():
        out = build_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    loaded = rss_mib() - baseline
    before = rss_mib()
    watch = RssWatch()  # what the steps add above the model: activations, workspaces
    with torch.inference_mode():
        out = step()  # warm-up: allocations, oneDNN's kernel choices
        out = out if isinstance(out, torch.Tensor) else out.sample
        conn.send(("ready", out[-2:].float().cpu().contiguous()))
        while conn.recv() == "step":
            start = time.perf_counter()
            step()
            conn.send(time.perf_counter() - start)
    stepping = watch.stop() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline  # KiB on Linux
    conn.send((loaded, stepping, peak))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the tiny SDXL-shaped UNet")
    parser.add_argument("--latent", type=int, help="latent side (default 128; 32 with --small)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["guided", "batch"], default="guided")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="each side's rounds in turn, one model in memory at a time")  # fmt: skip
    args = parser.parse_args()
    opts = dict(small=args.small, latent=args.latent or (32 if args.small else 128),
                threads=args.threads, mode=args.mode, device=args.device,
                dtype=args.dtype)  # fmt: skip
    ctx = mp.get_context("spawn")
    sides, outputs = {}, {}
    times = {side: [] for side in ("ours", "diffusers")}
    memory = {}

    def rounds(which):
        for _ in range(args.rounds):
            for side in which:
                sides[side][1].send("step")
                times[side].append(sides[side][1].recv())

    def stop(side):
        process, conn = sides[side]
        conn.send("stop")
        memory[side] = conn.recv()
        process.join()

    for side in times:  # one at a time: loading is the memory-hungry part
        here, there = ctx.Pipe()
        process = ctx.Process(target=worker, args=(side, opts, there))
        process.start()
        there.close()  # so that a worker that fails ends the wait (EOFError)
        status, outputs[side] = here.recv()
        assert status == "ready"
        sides[side] = (process, here)
        if args.one_at_a_time:
            rounds([side])
            stop(side)
    if not args.one_at_a_time:
        rounds(list(sides))
        for side in sides:
            stop(side)
    ours, theirs = outputs["ours"], outputs["diffusers"]
    same = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    size = opts["latent"] * 8
    print(f"SDXL UNet ({'tiny' if args.small else 'full size'}) at {size}x{size} "
          f"({opts['latent']}^2 latents), {args.mode}, {args.dtype} on {args.device}, "
          f"{args.threads} threads, "
          f"{args.rounds} {'rounds a side in turn' if args.one_at_a_time else 'alternated rounds'}"
          f"; outputs differ by {same:.1e} (relative)")  # fmt: skip
    for side, ts in times.items():
        loaded, stepping, peak = memory[side]
        spread = f"{min(ts):.3f}-{max(ts):.3f}"
        print(f"  {side:10s} median {statistics.median(ts):8.3f} s (range {spread}), "
              f"model {loaded:6.0f} MiB, steps add {stepping:6.0f} MiB, peak {peak:6.0f} MiB "
              "(above the imports)")  # fmt: skip
    ratio = statistics.median(times["ours"]) / statistics.median(times["diffusers"])
    steps = memory["ours"][1] / memory["diffusers"][1]
    peaks = memory["ours"][2] / memory["diffusers"][2]
    print(f"ours / diffusers: time {ratio:.3f}, memory the steps add {steps:.3f}, "
          f"peak {peaks:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
