"""What a ControlNet adds to a sampling step on the CPU (not a test): a plain UNet call against
a ControlNet call plus the UNet call with its residuals, ours and diffusers' on the same random
weights, one classifier-free-guided step (latents of one image, two context rows).

    python benchmarks/controlnet.py                       medium size (SD 1.5's shape, half wide)
    python benchmarks/controlnet.py --size sd15 --latent 64 --rounds 3
    python benchmarks/controlnet.py --size tiny --rounds 1      a quick check that it runs

The cases alternate round by round in one process, so that the machine's other load weighs on
all alike; compare the ratios (printed), not the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from sd_controlnet import ControlNet, ControlNetConfig
from sd_unet import UNet, UNetConfig


def configs(size: str) -> tuple[UNetConfig, ControlNetConfig]:
    if size == "tiny":
        unet = UNetConfig.tiny()
        return unet, dataclasses.replace(ControlNetConfig.tiny(), context_dim=unet.context_dim)
    unet, control = UNetConfig.sd15(), ControlNetConfig.sd15()
    if size == "medium":  # SD 1.5's blocks at half the width
        unet = dataclasses.replace(unet, model_channels=160)
        control = dataclasses.replace(control, model_channels=160)
    return unet, control


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = 1 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def diffusers_models(unet: UNet, control: ControlNet):
    """The same weights in diffusers' models, through diffusers' own single-file converters."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        convert_ldm_unet_checkpoint,
    )

    c = unet.config
    levels = range(len(c.channel_mult))
    down = ["CrossAttnDownBlock2D" if 2**i in c.attention_resolutions else "DownBlock2D"
            for i in levels]  # fmt: skip
    common = dict(
        down_block_types=down,
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        layers_per_block=c.num_res_blocks,
        cross_attention_dim=c.context_dim,
        attention_head_dim=c.num_heads,
    )
    config = dict(common, up_block_types=[b.replace("Down", "Up") for b in reversed(down)])
    their_unet = diffusers.UNet2DConditionModel(**config)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    their_unet.load_state_dict(convert_ldm_unet_checkpoint(state, config))
    their_control = diffusers.ControlNetModel(**common)
    state = {"control_model." + k: v for k, v in control.state_dict().items()}
    their_control.load_state_dict(convert_controlnet_checkpoint(state, config))
    return their_unet.eval(), their_control.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "medium", "sd15"], default="medium")
    parser.add_argument("--latent", type=int, default=32, help="latent side (64: 512 pixels)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-diffusers", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    unet_config, control_config = configs(opts.size)
    unet = randomise(UNet(unet_config), 0)
    control = randomise(ControlNet(control_config), 1)
    # from_checkpoint puts both in channels_last on the CPU, their fast layout there (the
    # diffusers models below are made before, from the same weights, in the default layout)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, opts.latent, opts.latent, generator=g)
    t = torch.tensor([500.0])
    context = torch.randn(2, 77, unet_config.context_dim, generator=g)
    hint = torch.rand(1, 3, opts.latent * 8, opts.latent * 8, generator=g)

    def ours_plain():
        unet(x, t, context)

    def ours_control():
        down, mid = control(x, t, context, hint)
        unet(x, t, context, down_residuals=down, mid_residual=mid)

    cases = {"ours UNet": ours_plain, "ours ControlNet + UNet": ours_control}
    if not opts.no_diffusers:
        their_unet, their_control = diffusers_models(unet, control)
        x2, t2, hint2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([hint, hint])

        def theirs_plain():
            their_unet(x2, t2, context)

        def theirs_control():
            down, mid = their_control(x2, t2, context, hint2, return_dict=False)
            their_unet(x2, t2, context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid)  # fmt: skip

        cases |= {"diffusers UNet": theirs_plain, "diffusers ControlNet + UNet": theirs_control}

    times = {name: [] for name in cases}
    unet.to(memory_format=torch.channels_last)
    control.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up: allocations, oneDNN's kernel choices
        for _ in range(opts.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"size {opts.size}, latents {opts.latent}x{opts.latent}, guided (2 context rows), "
          f"{opts.threads} threads, median of {opts.rounds}")  # fmt: skip
    for name, seconds in median.items():
        print(f"  {name:30s} {seconds:8.3f} s")
    ratio = median["ours ControlNet + UNet"] / median["ours UNet"]
    print(f"ours: a ControlNet step costs {ratio:.2f}x a plain UNet step")
    if not opts.no_diffusers:
        ratio = median["diffusers ControlNet + UNet"] / median["diffusers UNet"]
        print(f"diffusers: {ratio:.2f}x")
        ratio = median["ours ControlNet + UNet"] / median["diffusers ControlNet + UNet"]
        print(f"ours / diffusers, ControlNet step: {ratio:.2f}")


if __name__ == "__main__":
    main()
