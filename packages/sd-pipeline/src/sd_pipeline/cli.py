"""``sd-generate``: txt2img, img2img and inpainting from the command line.

    sd-generate "a red circle on a blue background"                  # bundled model -> outputs/
    sd-generate "a cat" --checkpoint v1-5.safetensors -o cat.png --seed 1
    sd-generate "a cat" --init-image in.png --strength 0.6 -o out/
    sd-generate "a cat" --init-image in.png --mask mask.png -o out/
    sd-generate --from-png outputs/00000-1234.png                    # the same picture again

The flags (or a PNG's parameters, overridden by the flags) become one
:class:`~sd_pipeline.request.GenerationRequest`, checked before the model loads; an error prints
one clear line naming the flag or PNG field it came from, exits with a non-zero status and
leaves no output file behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2  # bad arguments or input files (argparse's own code)
EXIT_FAILURE = 1  # the run failed (a checkpoint that does not load, say)

# Where each request field comes from on the command line, and in a PNG's parameters.
FLAGS = {
    "prompts": "the prompt",
    "negative_prompts": "--negative",
    "steps": "--steps",
    "sampler": "--sampler",
    "scheduler": "--scheduler",
    "guidance_scale": "--cfg",
    "seed": "--seed",
    "width": "--width",
    "height": "--height",
    "batch_size": "--batch",
    "strength": "--strength",
    "mask_blur": "--mask-blur",
    "clip_skip": "--clip-skip",
    "image": "--init-image",
    "mask": "--mask",
    "n_iter": "--n-iter",
    "subseed": "--subseed",
    "subseed_strength": "--subseed-strength",
    "seed_resize_from": "--seed-resize-from",
    "rng": "--rng",
    "hires": "--hires-*",
}
PNG_FIELDS = {
    "prompts": "prompt",
    "negative_prompts": "Negative prompt",
    "steps": "Steps",
    "sampler": "Sampler",
    "scheduler": "Schedule type",
    "guidance_scale": "CFG scale",
    "seed": "Seed",
    "width": "Size",
    "height": "Size",
    "strength": "Denoising strength",
    "clip_skip": "Clip skip",
    "subseed": "Variation seed",
    "subseed_strength": "Variation seed strength",
    "seed_resize_from": "Seed resize from",
    "rng": "RNG",
    "hires": "Hires",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd-generate",
        description="Generate images with Stable Diffusion (txt2img, img2img, inpainting). "
        "Without --checkpoint the model bundled with sd-pipeline is used.",
        epilog="Images are PNGs carrying their generation parameters (AUTOMATIC1111 format).",
    )
    p.add_argument("prompt", nargs="?", help='the prompt ("" for an empty one)')
    p.add_argument("-o", "--output", default="outputs/", help="a .png file, or a folder")
    p.add_argument("--checkpoint", type=Path, help="SD 1.x .safetensors/.ckpt or diffusers folder")
    p.add_argument("--vae", type=Path, help="a separate VAE file replacing the checkpoint's")
    p.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
        help="merge a LoRA / LyCORIS file (repeatable; weight 1 by default)",
    )  # fmt: skip
    p.add_argument("--lora-dir", type=Path, help="where <lora:name:weight> in a prompt looks")
    p.add_argument(
        "--embeddings", type=Path,
        help="a folder of textual-inversion embeddings (a file's name is its word in a prompt)",
    )  # fmt: skip
    p.add_argument("--negative", help="the negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 20 for SD 1.x)")
    p.add_argument(
        "--sampler", help="sampler (default: the model's, euler_a for SD 1.x); see --list-samplers"
    )
    p.add_argument(
        "--scheduler", help="sigma schedule for the sampler: karras, exponential, sgm_uniform, "
        "simple, normal, ddim_uniform, beta, kl_optimal, align_your_steps, polyexponential",
    )  # fmt: skip
    p.add_argument(
        "--cfg", type=float, help="guidance scale (default: the model's, 7.5 for SD 1.x)"
    )
    p.add_argument("--seed", type=int, help="seed (random when absent or -1, then printed)")
    p.add_argument("--width", type=int, help="multiple of 8 (default: native size)")
    p.add_argument("--height", type=int, help="multiple of 8 (default: native size)")
    p.add_argument("--batch", type=int, default=1, help="number of images (seeds seed..seed+n-1)")
    p.add_argument("--n-iter", type=int, default=1, help="batch count: batches run one by one")
    p.add_argument("--grid", action="store_true", help="also write a grid of all the images")
    p.add_argument("--subseed", type=int, help="variation seed (AUTOMATIC1111's)")
    p.add_argument("--subseed-strength", type=float, help="how much of the variation seed, 0..1")
    p.add_argument(
        "--seed-resize-from", metavar="WxH", help="draw the seed's noise at this size (keeps a "
        "seed's composition at a new size)"
    )  # fmt: skip
    p.add_argument(
        "--rng", choices=("cpu", "gpu", "nv"),
        help="random numbers: cpu (default), gpu (torch's CUDA generator), nv (the CUDA "
        "generator emulated: reproduces AUTOMATIC1111's default on any device)",
    )  # fmt: skip
    p.add_argument("--hires-scale", type=float, help="hires fix: upscale factor (e.g. 2)")
    p.add_argument("--hires-steps", type=int, help="hires fix: steps of the second pass")
    p.add_argument("--hires-denoise", type=float, help="hires fix: denoising strength (0.7)")
    p.add_argument(
        "--hires-upscaler", help="hires fix: latent (default), latent-antialiased, "
        "latent-bicubic, latent-bicubic-antialiased, latent-nearest, latent-nearest-exact, lanczos"
    )  # fmt: skip
    p.add_argument("--hires-sampler", help="hires fix: another sampler for the second pass")
    p.add_argument("--hires-prompt", help="hires fix: another prompt for the second pass")
    p.add_argument("--preview", type=Path, help="write a cheap preview PNG here while sampling")
    p.add_argument("--preview-every", type=int, default=1, help="steps between previews")
    p.add_argument(
        "--preview-decoder", type=Path,
        help="TAESD decoder weights (taesd_decoder.pth) for full-size previews",
    )  # fmt: skip
    p.add_argument("--init-image", type=Path, help="img2img / inpainting starting image")
    p.add_argument("--strength", type=float, help="denoising strength in [0, 1]")
    p.add_argument("--mask", type=Path, help="inpainting mask: white repaints, black keeps")
    p.add_argument("--mask-blur", type=float, default=0.0, help="mask edge blur in pixels")
    p.add_argument(
        "--no-paste-back",
        action="store_true",
        help="inpainting: keep the decoded pixels outside the mask instead of the original ones",
    )
    p.add_argument("--clip-skip", type=int, help="2 = CLIP's penultimate layer")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if any)")
    p.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    p.add_argument("--offload", action="store_true", help="keep idle parts on the CPU")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (slow first run; pays off over many steps or images)",
    )
    p.add_argument(
        "--no-limits",
        action="store_true",
        help="lift the size, step and batch limits (see sd_pipeline.request.LIMITS)",
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
            _list_samplers()
            return 0
        request, sources = build_request(args)
        request = check_request(request, sources)
        paths = _check_run(args, request)
        images = _run(args, request)
        from sd_pipeline.outputs import write_outputs

        written = write_outputs(images, paths, overwrite=args.overwrite)
        if args.grid:
            written.append(_write_grid(images, written))
    except KeyboardInterrupt:
        print("sd-generate: interrupted; nothing written", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"sd-generate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"sd-generate: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    for path in written:
        print(path)
    return 0


class UsageError(ValueError):
    pass


def _list_samplers() -> None:
    from sd_samplers import SAMPLERS

    width = max(map(len, SAMPLERS))
    for name, spec in SAMPLERS.items():
        print(f"{name:<{width}}  {spec.label}")


def build_request(args: argparse.Namespace):
    """The request the flags describe (a PNG's parameters first, the flags over them), and
    where each field came from (for error messages)."""
    from sd_pipeline.request import GenerationRequest

    fields, sources = {}, {}
    args.recorded_lora_hashes = {}
    if args.from_png is not None:
        fields, sources = _png_fields(args.from_png)
        args.recorded_lora_hashes = fields.pop("lora_hashes", {})
    given = dict(
        subseed=args.subseed,
        subseed_strength=args.subseed_strength,
        seed_resize_from=_size_flag(args.seed_resize_from, "--seed-resize-from"),
        rng=args.rng,
        hires=_hires_flags(args, fields.get("hires")),
        prompts=None if args.prompt is None else (args.prompt,),
        negative_prompts=None if args.negative is None else (args.negative,),
        steps=args.steps,
        sampler=args.sampler,
        scheduler=args.scheduler,
        guidance_scale=args.cfg,
        seed=args.seed,
        width=args.width,
        height=args.height,
        strength=args.strength,
        clip_skip=args.clip_skip,
    )
    for name, value in given.items():
        if value is not None:
            fields[name], sources[name] = value, FLAGS[name]
    if args.preview_every < 1:
        raise UsageError(f"--preview-every must be at least 1, got {args.preview_every}")
    if "prompts" not in fields:
        raise UsageError('give a prompt (an empty one is "") or --from-png FILE')
    fields.update(_images(args, fields, sources))
    task = "inpaint" if args.mask else "img2img" if args.init_image else "txt2img"
    if task == "txt2img" and "strength" in fields:
        _refuse_strength_without_image(args, sources)
    request = GenerationRequest(
        task=task,
        batch_size=args.batch,
        n_iter=args.n_iter,
        mask_blur=args.mask_blur,
        keep_unmasked=not args.no_paste_back,
        limits=not args.no_limits,
        **fields,
    )
    sources.update(batch_size="--batch", mask_blur="--mask-blur", n_iter="--n-iter")
    return request, sources


def _png_fields(path: Path):
    """Request fields from a PNG's AUTOMATIC1111 parameters, each sourced to its PNG field."""
    from sd_pipeline.metadata import read_parameters

    try:
        params = read_parameters(path)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    fields = dict(
        prompts=(params.prompt,),
        negative_prompts=(params.negative_prompt,),
        steps=params.steps,
        sampler=params.sampler,
        scheduler=params.scheduler,
        guidance_scale=params.cfg_scale,
        seed=params.seed,
        width=params.width,
        height=params.height,
        strength=params.denoising_strength,
        clip_skip=params.clip_skip,
    )
    fields.update(_png_extras(params.extra, path))
    if "Lora hashes" in params.extra:
        from sd_pipeline.lora import parse_lora_hashes

        fields["lora_hashes"] = parse_lora_hashes(params.extra["Lora hashes"])
    if "hires" in fields:
        fields.pop("strength", None)  # the Denoising strength is the hires pass's
    fields = {k: v for k, v in fields.items() if v is not None}
    sources = {k: f"{path}: its {PNG_FIELDS.get(k, k)} field" for k in fields}
    return fields, sources


def _png_extras(extra: dict, path: Path) -> dict:
    """Request fields from AUTOMATIC1111's infotext fields beyond the basic ones."""
    from sd_pipeline.request import HIRES_UPSCALER_LABELS, HiresFix

    fields = {}
    try:
        if "Variation seed" in extra:
            fields["subseed"] = int(extra["Variation seed"])
            fields["subseed_strength"] = float(extra.get("Variation seed strength", 0))
        if "Seed resize from" in extra:
            fields["seed_resize_from"] = _size_flag(extra["Seed resize from"], "")
        # AUTOMATIC1111 writes RNG only when it is not its default, the GPU's: emulated here
        fields["rng"] = extra.get("RNG", "NV").lower()
        if "Hires upscale" in extra:
            names = {v.lower(): k for k, v in HIRES_UPSCALER_LABELS.items()}
            upscaler = extra.get("Hires upscaler", "Latent")
            fields["hires"] = HiresFix(
                scale=float(extra["Hires upscale"]),
                steps=int(extra["Hires steps"]) if "Hires steps" in extra else None,
                denoise=float(extra.get("Denoising strength", 0.7)),
                upscaler=names.get(upscaler.lower(), upscaler),
                sampler=_sampler_or_none(extra.get("Hires sampler")),
                prompt=extra.get("Hires prompt"),
                negative_prompt=extra.get("Hires negative prompt"),
            )
    except (ValueError, UsageError) as e:
        raise UsageError(f"{path}: malformed generation parameters ({e})") from e
    return fields


def _sampler_or_none(label):
    from sd_pipeline.metadata import sampler_name

    return None if label is None else sampler_name(label)


def _size_flag(text: str | None, flag: str):
    """(width, height) from ``WxH``."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag} must be WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    return (width, height)


def _hires_flags(args, from_png):
    """The hires fix the --hires-* flags describe, over a PNG's (None when neither asks)."""
    import dataclasses as dc

    from sd_pipeline.request import HiresFix

    flags = dict(scale=args.hires_scale, steps=args.hires_steps, denoise=args.hires_denoise,
                 upscaler=args.hires_upscaler, sampler=args.hires_sampler,
                 prompt=args.hires_prompt)  # fmt: skip
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return None
    return dc.replace(from_png or HiresFix(), **given)


def _refuse_strength_without_image(args, sources) -> None:
    if args.from_png is not None and sources["strength"] != FLAGS["strength"]:
        raise UsageError(
            f"{args.from_png} was made with img2img or inpainting (it has a Denoising strength): "
            "give --init-image FILE (and --mask FILE for inpainting) to make it again"
        )
    raise UsageError("--strength needs --init-image (the picture to start from)")


def _images(args, fields: dict, sources: dict) -> dict:
    """The init image and mask the flags name, loaded and checked."""
    from sd_pipeline.images import load_image, load_mask, to_mask

    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the picture to inpaint)")
    out = {}
    try:
        if args.init_image is not None:
            out["image"] = load_image(args.init_image)
            sources["image"] = FLAGS["image"]
            for name in ("width", "height"):
                sources.setdefault(name, FLAGS["image"] + " (its size)")
        if args.mask is not None:
            out["mask"] = to_mask(load_mask(args.mask), size=out["image"].size)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    return out


def check_request(request, sources: dict):
    """Check the request as far as it can be without the model (its defaults stand in for the
    model's), decide the seed, and say which flag or PNG field a bad value came from."""
    from sd_pipeline.loading import GENERATION_DEFAULTS
    from sd_pipeline.request import RequestError

    try:
        dry = request.resolve(GENERATION_DEFAULTS, native_size=8, multiple=8)
    except RequestError as e:
        source = sources.get(e.field)
        if source is None:
            raise UsageError(str(e)) from e
        raise UsageError(f"{source} {e.problem}") from e
    return dataclasses.replace(request, seed=dry.seed)


def _check_run(args, request) -> list[Path]:
    """Check the model, device and output flags; plan the output paths."""
    from sd_pipeline.loading import resolve_dtype
    from sd_pipeline.outputs import plan_outputs

    try:
        resolve_dtype(args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from e
    _check_device(args.device)
    if args.compile and args.offload:
        raise UsageError("--compile keeps the UNet on its device: leave out --offload")
    if args.vae is not None and args.checkpoint is None:
        raise UsageError("--vae needs --checkpoint (the bundled model has its own VAE)")
    for name in ("checkpoint", "vae", "embeddings", "lora_dir"):
        value = getattr(args, name)
        if value is not None and not value.exists():
            raise UsageError(f"--{name.replace('_', '-')} {value}: no such file or folder")
    for option in args.lora:
        path = _lora_option(option)[0]
        if not path.is_file():
            raise UsageError(f"--lora {option}: no such LoRA file {path}")
    print(f"seed: {request.seed}", file=sys.stderr)
    try:
        return plan_outputs(args.output, request.all_seeds, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(str(e)) from e


def _write_grid(images, written: list[Path]) -> Path:
    """All the images in one picture beside the first, carrying its parameters."""
    from sd_pipeline.images import image_grid
    from sd_pipeline.metadata import save_image

    first = Path(written[0])
    grid = image_grid(images)
    return save_image(grid, first.with_name(f"grid-{first.stem}.png"), images[0].info["parameters"])


def _lora_option(text: str):
    from sd_pipeline.lora import parse_lora_option

    try:
        return parse_lora_option(text)
    except ValueError as e:
        raise UsageError(f"--lora {text}: {e}") from e


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown --device {device!r}; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


def _run(args, request):
    from sd_pipeline.pipeline import StableDiffusion

    options = dict(device=args.device, dtype=args.dtype, offload=args.offload)
    if args.checkpoint is not None:
        pipe = StableDiffusion.from_checkpoint(args.checkpoint, vae=args.vae, **options)
    else:
        pipe = StableDiffusion.default(device=args.device, dtype=args.dtype)
        pipe.offload = args.offload
    if args.embeddings is not None:
        pipe.load_embeddings(args.embeddings)
    pipe.lora_dir = args.lora_dir
    pipe.recorded_lora_hashes = args.recorded_lora_hashes
    for option in args.lora:
        path, weight = _lora_option(option)
        pipe.load_lora(path, weight)
    if args.compile:
        pipe.compile()
    callback = None
    if args.preview is not None:
        callback = _preview_writer(args.preview, args.preview_every, args.preview_decoder)
    return pipe.run(request, progress=not args.no_progress, callback=callback)


def _preview_writer(path: Path, every: int, decoder_file: Path | None):
    """A step callback writing a preview of the batch's first image (AUTOMATIC1111's cheap
    approximation, or TAESD's decoder when its weights are given)."""
    from sd_pipeline.metadata import save_image
    from sd_pipeline.previews import latent_preview

    decoder = None
    if decoder_file is not None:
        from sd_vae import TinyDecoder

        decoder = TinyDecoder.from_checkpoint(decoder_file)

    def write(d: dict) -> None:
        if d["i"] % every == 0:
            picture = latent_preview(d["denoised"][:1], decoder=decoder)[0]
            save_image(picture, path, parameters="")

    return write


if __name__ == "__main__":
    sys.exit(main())
