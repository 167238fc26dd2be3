"""The GPU checks of issue 24 that are not timings, in one run (not a test): half precision
against float32, and host syncs in the sampling loop.

    python benchmarks/gpu_checks.py --device cuda                 on a GPU machine
    python benchmarks/gpu_checks.py --device cpu --size tiny      a check of the script itself

1. float16 and bfloat16 against float32, the same random weights and inputs: the SD 1.5 and
   SDXL UNets, the SD VAE's decoder and the CLIP text encoder at full size (``--size tiny``:
   their tiny configs). Reported: the largest difference relative to the float32 output's
   largest value, and whether every value is finite. Random weights test the arithmetic's
   paths (kernels, dtype plumbing, attention), not how a trained model's activations fit
   float16's range (a real VAE can overflow there where a random one does not).
2. Host syncs (CUDA only): ``torch.cuda.set_sync_debug_mode("warn")`` while the pipeline runs
   txt2img, img2img and inpainting on the tiny random model, counted for 2 and for 5 steps:
   the count must not grow with the steps (the loop never waits for the GPU). The CPU tests
   ``test_syncs.py`` in sd-samplers and sd-pipeline count the same at the dispatcher.

Timings are run.py's (``--device cuda --dtype float16``) and sdxl_unet.py's; ``gpu.sh`` runs
all of it in one call.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_clip import CLIPTextConfig, CLIPTextModel
from sd_pipeline.pipeline import random_tiny
from sd_unet import UNet, UNetConfig
from sd_vae import AutoencoderKL, AutoencoderKLConfig

HALVES = (torch.float16, torch.bfloat16)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights drawn N(0, 0.02), biases too: activations of a sane size at every depth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval().requires_grad_(False)


def _models(size: str):
    """(name, float32 model on the CPU, inputs maker(device, dtype), call(model, inputs))."""
    tiny = size == "tiny"
    text = CLIPTextConfig.tiny() if tiny else CLIPTextConfig.sd15()

    def unet(config: UNetConfig, batch: int, side: int, added: int | None):
        def inputs(device, dtype):
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, config.in_channels, side, side, generator=g)
            context = torch.randn(batch, 77, config.context_dim, generator=g)
            extra = {} if added is None else {"y": torch.randn(batch, added, generator=g)}
            t = torch.full((batch,), 500.0)
            move = {k: v.to(device, dtype) for k, v in extra.items()}
            return (x.to(device, dtype), t.to(device), context.to(device, dtype)), move

        return inputs

    sd15 = UNetConfig.tiny() if tiny else UNetConfig.sd15()
    sd15 = dataclasses.replace(sd15, context_dim=text.width) if tiny else sd15
    sdxl = UNetConfig.tiny_sdxl() if tiny else UNetConfig.sdxl()
    vae = AutoencoderKLConfig.tiny() if tiny else AutoencoderKLConfig.sd15()
    side = 8 if tiny else 64  # latents: 512 px (SDXL: 1024 px at full size)
    sdxl_side = side if tiny else 128

    def latents(device, dtype):
        g = torch.Generator().manual_seed(2)
        return (torch.randn(1, vae.latent_channels, side, side, generator=g).to(device, dtype),), {}

    def ids(device, dtype):
        g = torch.Generator().manual_seed(3)
        return (torch.randint(0, text.vocab_size, (2, 77), generator=g).to(device),), {}

    return [
        ("SD 1.5 UNet, batch 2", lambda: UNet(sd15), unet(sd15, 2, side, None), None),
        (
            "SDXL UNet, batch 2",
            lambda: UNet(sdxl),
            unet(sdxl, 2, sdxl_side, sdxl.adm_in_channels),
            None,
        ),
        ("VAE decoder", lambda: AutoencoderKL(vae), latents, "decode"),
        ("CLIP text encoder", lambda: CLIPTextModel(text), ids, None),
    ]


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "sample"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0]


@torch.inference_mode()
def precision(device: str, size: str) -> list[str]:
    rows = ["| model | dtype | max difference / max of float32 output | finite | seconds |",
            "|---|---|---|---|---|"]  # fmt: skip
    for seed, (name, make, inputs, method) in enumerate(_models(size)):
        model = _randomize(make(), seed).to(device)
        args, kwargs = inputs(device, torch.float32)
        call = getattr(model, method) if method else model
        reference = _output(call(*args, **kwargs)).float()
        scale = reference.abs().max().item()
        for dtype in HALVES:
            model = model.to(dtype)
            args, kwargs = inputs(device, dtype)
            call = getattr(model, method) if method else model
            start = time.perf_counter()
            out = _output(call(*args, **kwargs)).float()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            error = (out - reference).abs().max().item() / scale
            finite = bool(torch.isfinite(out).all())
            rows.append(f"| {name} | {str(dtype).split('.')[-1]} | {error:.2e} | {finite} | "
                        f"{seconds:.3f} |")  # fmt: skip
            print(rows[-1], flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def host_syncs(device: str) -> list[str]:
    if not device.startswith("cuda"):
        return ["Host syncs: CUDA only (on the CPU, `test_syncs.py` counts host reads)."]
    pipe = random_tiny(device=device, dtype=torch.float16)
    g = np.random.default_rng(0)
    image = Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:24, :24] = 255
    tasks = {
        "txt2img euler": lambda steps: pipe.txt2img("a red circle", steps=steps, seed=1),
        "txt2img dpmpp_2m, guided": lambda steps: pipe.txt2img(
            "a red circle", "blue", steps=steps, seed=1, sampler="dpmpp_2m", guidance_scale=5.0
        ),
        "img2img ddim": lambda steps: pipe.img2img(
            "a red circle", image, steps=steps, seed=1, sampler="ddim", strength=0.9
        ),
        "inpaint euler_a": lambda steps: pipe.inpaint(
            "a red circle", image, Image.fromarray(mask), steps=steps, seed=1, sampler="euler_a"
        ),
    }
    rows = ["| task | syncs at 2 steps | at 5 steps | per step |", "|---|---|---|---|"]
    for name, run in tasks.items():
        run(2)  # warm-up: first-call work (cuBLAS handles, caches) is not the loop's
        counts = []
        for steps in (2, 5):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    run(steps)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        rows.append(f"| {name} | {counts[0]} | {counts[1]} | {(counts[1] - counts[0]) / 3:.1f} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--out", type=Path, help="write the tables here (markdown)")
    opts = parser.parse_args(argv)
    where = torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else (
        platform.processor() or platform.machine())  # fmt: skip
    head = [f"# GPU checks ({opts.size} size)", "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {where}; torch "
            f"{torch.__version__}; random weights.", ""]  # fmt: skip
    print("\n".join(head), flush=True)
    text = head + precision(opts.device, opts.size) + [""] + host_syncs(opts.device)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
