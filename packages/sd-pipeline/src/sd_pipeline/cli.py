"""``sd-generate``: txt2img, img2img and inpainting from the command line.

    sd-generate "a red circle on a blue background"                  # bundled model -> outputs/
    sd-generate "a cat" --checkpoint v1-5.safetensors -o cat.png --seed 1
    sd-generate "a cat" --init-image in.png --strength 0.6 -o out/
    sd-generate "a cat" --init-image in.png --mask mask.png -o out/
    sd-generate --from-png outputs/00000-1234.png                    # the same picture again

Every input is checked before the model loads; an error prints one clear line, exits with a
non-zero status and leaves no output file behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2  # bad arguments or input files (argparse's own code)
EXIT_FAILURE = 1  # the run failed (a checkpoint that does not load, say)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd-generate",
        description="Generate images with Stable Diffusion (txt2img, img2img, inpainting). "
        "Without --checkpoint the model bundled with sd-pipeline is used.",
        epilog="Images are PNGs carrying their generation parameters (AUTOMATIC1111 format).",
    )
    p.add_argument("prompt", nargs="?", help='the prompt ("" for an empty one)')
    p.add_argument(
        "-o", "--output", default=None, help="a .png file, or a folder (default: outputs/)"
    )
    p.add_argument("--checkpoint", type=Path, help="SD 1.x .safetensors/.ckpt or diffusers folder")
    p.add_argument("--vae", type=Path, help="a separate VAE file replacing the checkpoint's")
    p.add_argument("--negative", default=None, help="the negative prompt")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: the model's, 20 for SD 1.x)",
    )
    p.add_argument(
        "--sampler",
        default=None,
        help="sampler name (default: the model's, euler_a for SD 1.x); see --list-samplers",
    )
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="guidance scale (default: the model's, 7.5 for SD 1.x)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed (random when absent, then printed)")
    p.add_argument("--width", type=int, default=None, help="multiple of 8 (default: native size)")
    p.add_argument("--height", type=int, default=None, help="multiple of 8 (default: native size)")
    p.add_argument(
        "--batch", type=int, default=None, help="number of images (seeds seed..seed+n-1)"
    )
    p.add_argument("--init-image", type=Path, help="img2img / inpainting starting image")
    p.add_argument("--strength", type=float, default=None, help="denoising strength in [0, 1]")
    p.add_argument("--mask", type=Path, help="inpainting mask: white repaints, black keeps")
    p.add_argument("--mask-blur", type=float, default=0.0, help="mask edge blur in pixels")
    p.add_argument("--clip-skip", type=int, default=None, help="2 = CLIP's penultimate layer")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    p.add_argument("--offload", action="store_true", help="keep idle parts on the CPU")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (slow first run; pays off over many steps or images)",
    )
    p.add_argument("--list-samplers", action="store_true", help="print the sampler names and exit")
    p.add_argument("--from-png", type=Path, help="take the settings from a PNG's parameters")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from sd_pipeline.files import handle_sigterm

    handle_sigterm()  # SIGTERM (kill, systemd, docker stop) cleans up as Ctrl-C does
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="sd-generate: %(message)s")
    try:
        if args.list_samplers:
            from sd_samplers import SAMPLERS

            print("\n".join(SAMPLERS))
            return 0
        job = _settings(args)
        paths, pipe_args = _check(job)
        images = _run(job, pipe_args)
        from sd_pipeline.outputs import write_outputs

        written = write_outputs(images, paths, overwrite=job["overwrite"])
    except KeyboardInterrupt:
        print("sd-generate: interrupted; nothing written", file=sys.stderr)
        return 130
    except _UsageError as e:
        print(f"sd-generate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"sd-generate: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    for path in written:
        print(path)
    return 0


class _UsageError(ValueError):
    pass


def _settings(args: argparse.Namespace) -> dict:
    """The run's settings: defaults, then a PNG's parameters, then the flags given."""
    from sd_pipeline.metadata import read_parameters

    job = dict(
        prompt=None,
        negative="",
        steps=None,  # None: the model's default (see StableDiffusion.defaults)
        sampler=None,
        cfg=None,
        seed=None,
        width=None,
        height=None,
        strength=None,
        clip_skip=None,
    )
    if args.from_png is not None:
        try:
            params = read_parameters(args.from_png)
        except (OSError, ValueError) as e:
            raise _UsageError(str(e)) from e
        job.update(
            prompt=params.prompt,
            negative=params.negative_prompt,
            steps=params.steps,
            sampler=params.sampler,
            cfg=params.cfg_scale,
            seed=params.seed,
            width=params.width,
            height=params.height,
            strength=params.denoising_strength,
            clip_skip=params.clip_skip,
        )
    given = dict(
        prompt=args.prompt,
        negative=args.negative,
        steps=args.steps,
        sampler=args.sampler,
        cfg=args.cfg,
        seed=args.seed,
        width=args.width,
        height=args.height,
        strength=args.strength,
        clip_skip=args.clip_skip,
    )
    job.update({k: v for k, v in given.items() if v is not None})
    if job["prompt"] is None:
        raise _UsageError('give a prompt (an empty one is "") or --from-png FILE')
    job.update(
        output=args.output if args.output is not None else "outputs/",
        checkpoint=args.checkpoint,
        vae=args.vae,
        batch=args.batch if args.batch is not None else 1,
        init_image=args.init_image,
        mask=args.mask,
        mask_blur=args.mask_blur,
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        compile=args.compile,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return job


def _check(job: dict):
    """Validate everything that can be checked before loading a model; plan the output paths."""
    from sd_pipeline.images import load_image, to_mask
    from sd_pipeline.outputs import plan_outputs
    from sd_pipeline.pipeline import check_sampler, random_seed, resolve_dtype

    if job["steps"] is not None and job["steps"] < 1:
        raise _UsageError(f"--steps must be at least 1, got {job['steps']}")
    if job["batch"] < 1:
        raise _UsageError(f"--batch must be at least 1, got {job['batch']}")
    for name in ("width", "height"):
        value = job[name]
        if value is not None and (value < 8 or value % 8):
            lo, hi = max(8, value // 8 * 8), -(-max(value, 1) // 8) * 8
            raise _UsageError(
                f"--{name} must be a positive multiple of 8, got {value}; try {lo} or {hi}"
            )
    strength = job["strength"]
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise _UsageError(f"--strength must be in [0, 1], got {strength}")
    if job["mask_blur"] < 0:
        raise _UsageError(f"--mask-blur must be >= 0, got {job['mask_blur']}")
    try:
        if job["sampler"] is not None:
            check_sampler(job["sampler"])
        resolve_dtype(job["dtype"])
    except ValueError as e:
        raise _UsageError(str(e)) from e
    _check_device(job["device"])
    if job["mask"] is not None and job["init_image"] is None:
        raise _UsageError("--mask needs --init-image (the picture to inpaint)")
    if job["compile"] and job["offload"]:
        raise _UsageError("--compile keeps the UNet on its device: leave out --offload")
    init = mask = None
    try:
        if job["init_image"] is not None:
            init = load_image(job["init_image"])
        if job["mask"] is not None:
            mask = _load_mask(job["mask"])
            to_mask(mask, size=init.size)
    except (OSError, ValueError) as e:
        raise _UsageError(str(e)) from e
    if init is not None and (job["width"] is None or job["height"] is None):
        w, h = init.size
        if (job["width"] is None and w % 8) or (job["height"] is None and h % 8):
            raise _UsageError(
                f"--init-image is {w}x{h}, not a multiple of 8; pass --width and --height "
                f"to resize it (e.g. --width {max(8, w // 8 * 8)} --height {max(8, h // 8 * 8)})"
            )
    if job["vae"] is not None and job["checkpoint"] is None:
        raise _UsageError("--vae needs --checkpoint (the bundled model has its own VAE)")
    for name in ("checkpoint", "vae"):
        if job[name] is not None and not job[name].exists():
            raise _UsageError(f"--{name} {job[name]}: no such file or folder")
    if job["seed"] is None:
        job["seed"] = random_seed()
    print(f"seed: {job['seed']}", file=sys.stderr)
    seeds = [job["seed"] + i for i in range(job["batch"])]
    try:
        paths = plan_outputs(job["output"], seeds, overwrite=job["overwrite"])
    except ValueError as e:
        raise _UsageError(str(e)) from e
    return paths, dict(init=init, mask=mask)


def _load_mask(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such mask file") from None
    except OSError as e:
        raise ValueError(f"{path}: not a readable mask image ({e})") from e


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise _UsageError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise _UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def _run(job: dict, inputs: dict):
    from sd_pipeline.pipeline import StableDiffusion

    options = dict(device=job["device"], dtype=job["dtype"])
    if job["checkpoint"] is not None:
        pipe = StableDiffusion.from_checkpoint(
            job["checkpoint"], vae=job["vae"], offload=job["offload"], **options
        )
    else:
        pipe = StableDiffusion.default(**options)
        pipe.offload = job["offload"]
    if job["compile"]:
        pipe.compile()
    common = dict(
        negative_prompt=job["negative"],
        steps=job["steps"],
        guidance_scale=job["cfg"],
        sampler=job["sampler"],
        seed=job["seed"],
        width=job["width"],
        height=job["height"],
        batch_size=job["batch"],
        progress=job["progress"],
        clip_skip=job["clip_skip"],
    )
    if inputs["mask"] is not None:
        strength = 1.0 if job["strength"] is None else job["strength"]
        return pipe.inpaint(
            job["prompt"],
            inputs["init"],
            inputs["mask"],
            strength=strength,
            mask_blur=job["mask_blur"],
            **common,
        )
    if inputs["init"] is not None:
        strength = 0.6 if job["strength"] is None else job["strength"]
        return pipe.img2img(job["prompt"], inputs["init"], strength=strength, **common)
    return pipe.txt2img(job["prompt"], **common)


if __name__ == "__main__":
    sys.exit(main())
