"""``sd-model``: inspect, convert, prune, merge and bake Stable Diffusion checkpoints.

    sd-model info model.safetensors
    sd-model convert model.ckpt model.safetensors [--dtype float16]
    sd-model convert model.safetensors diffusers-folder/        # and back: folder -> file
    sd-model prune model.ckpt pruned.safetensors [--keep ema|non-ema]
    sd-model bake-vae model.safetensors vae.safetensors baked.safetensors
    sd-model merge a.safetensors b.safetensors merged.safetensors --alpha 0.3
    sd-model merge a.safetensors b.safetensors merged.safetensors --method add-difference \\
        --base c.safetensors --alpha 1
    sd-model extract-lora tuned.safetensors base.safetensors style.safetensors --rank 32

Every command reads checkpoints without running code (sd-vae's safe reader), writes atomically
(a temporary file renamed into place) and never replaces an existing file without
``--overwrite``. The merges are AUTOMATIC1111's checkpoint merger: weighted sum
``A (1 - alpha) + B alpha`` and add difference ``A + (B - C) alpha``, computed in float32.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

EXIT_USAGE = 2
EMA_PREFIX = "model_ema."  # a full (non-pruned) checkpoint's EMA copy of the UNet
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class ToolError(ValueError):
    pass


def read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single file (safetensors or a pickle, read safely)."""
    import sd_vae

    if not path.exists():
        raise ToolError(f"{path}: no such file")
    if path.is_dir():
        raise ToolError(f"{path}: is a folder; this command takes a single checkpoint file")
    try:
        return dict(sd_vae.load_state_dict(path))
    except sd_vae.CheckpointError as e:
        raise ToolError(str(e)) from e


def write(tensors: Mapping[str, torch.Tensor], path: Path, args, metadata=None) -> Path:
    """Tensors to ``path`` (``.safetensors``, or a ``.ckpt`` pickle), cast to ``--dtype``."""
    from sd_pipeline.files import replacing, save_safetensors
    from sd_pipeline.loading import resolve_dtype

    _check_target(path, args.overwrite)
    dtype = resolve_dtype(args.dtype) if getattr(args, "dtype", None) else None
    out = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        return save_safetensors(_unshared(out), path, metadata or {"format": "pt"})
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        with replacing(path) as f:
            torch.save({"state_dict": out}, f)
        return path
    raise ToolError(f"{path}: write .safetensors or .ckpt, not {path.suffix!r}")


def _unshared(tensors: dict) -> dict:
    """safetensors refuses tensors that share memory (views of one buffer): give each its own."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ToolError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise ToolError(f"{path.parent}: no such folder to write into")


# the commands


def info(args) -> int:
    from sd_pipeline.metadata import model_hash

    path = Path(args.model)
    tensors = read(path)
    parts = {name: sum(1 for k in tensors if k.startswith(prefix))
             for name, prefix in _PARTS.items()}  # fmt: skip
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()})
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    print(f"file: {path}")
    print(f"kind: {model_kind(tensors)}")
    print("parts: " + ", ".join(f"{n} ({c} tensors)" for n, c in parts.items() if c) or "none")
    print(f"tensors: {len(tensors)}, {size / 2**20:.1f} MiB, dtypes: {', '.join(dtypes)}")
    print(f"model hash: {model_hash(path)}")
    for key, value in sorted(file_metadata(path).items()):
        print(f"metadata {key}: {value if len(value) < 200 else value[:200] + '...'}")
    return 0


def file_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata ({} for pickles)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


_PARTS = {
    "unet": UNET_PREFIX,
    "unet EMA": EMA_PREFIX,
    "vae": VAE_PREFIX,
    "text encoder (CLIP)": "cond_stage_model.transformer.",
    "text encoder (OpenCLIP)": "cond_stage_model.model.",
    "SDXL text encoders": "conditioner.embedders.",
}


def model_kind(tensors: Mapping[str, torch.Tensor]) -> str:
    """What a single file holds, from its keys and shapes."""
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if any(k.startswith("conditioner.embedders.") for k in tensors):
        return "SDXL" + (" refiner" if not any(".embedders.0." in k for k in tensors) else "")
    if conv_in is None:
        return "VAE" if any(k.startswith(("encoder.", VAE_PREFIX)) for k in tensors) else "unknown"
    family = "SD 2.x" if any(k.startswith("cond_stage_model.model.") for k in tensors) else "SD 1.x"
    return family + (" inpainting" if conv_in.shape[1] == 9 else "")


def convert(args) -> int:
    src, dst = Path(args.source), Path(args.target)
    if src.is_dir() or dst.suffix == "" or dst.is_dir():
        return _convert_folder(src, dst, args)
    tensors = read(src)
    print(write(tensors, dst, args, file_metadata(src) or None))
    return 0


def _convert_folder(src: Path, dst: Path, args) -> int:
    """A single file to a diffusers folder, or a diffusers folder to a single file."""
    from sd_pipeline import StableDiffusion

    pipe = StableDiffusion.from_checkpoint(src, device="cpu")
    if src.is_dir():
        _check_target(dst, args.overwrite)
        print(pipe.save(dst, dtype=args.dtype))
        return 0
    if dst.exists() and any(dst.iterdir()) and not args.overwrite:
        raise ToolError(f"{dst} is not empty; pass --overwrite to write into it")
    save_diffusers(pipe, dst, args.dtype)
    print(dst)
    return 0


def save_diffusers(pipe, folder: Path, dtype=None) -> None:
    """The pipeline's parts as a diffusers model root, each written by its own package (the
    text encoder as transformers lays it out: its state dict is already in that layout)."""
    import json

    from sd_pipeline.files import save_safetensors
    from sd_pipeline.loading import resolve_dtype
    from sd_unet.weights import save_diffusers as save_unet
    from sd_vae.weights import save_diffusers_folder as save_vae

    if pipe.conditioner.pooled:
        raise ToolError(f"{pipe.name}: an SDXL model; writing it as a diffusers folder is not "
                        "supported yet")  # fmt: skip
    if resolve_dtype(dtype) not in (None, torch.float32):
        pipe.to(dtype=dtype)
    save_vae(pipe.vae, folder / "vae")
    save_unet(pipe.unet, folder / "unet")
    config_file = folder / "unet" / "config.json"
    config = {**json.loads(config_file.read_text()), "sample_size": pipe.native_size // pipe.scale}
    config_file.write_text(json.dumps(config, indent=2))
    text = pipe.text_encoder.config
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    (folder / "text_encoder" / "config.json").write_text(json.dumps({
        "architectures": ["CLIPTextModel"], "hidden_size": text.width,
        "intermediate_size": text.mlp_width, "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads, "max_position_embeddings": text.max_positions,
        "vocab_size": text.vocab_size, "hidden_act": text.activation,
        "layer_norm_eps": text.layer_norm_eps,
    }, indent=2))  # fmt: skip
    save_safetensors(pipe.text_encoder.state_dict(), folder / "text_encoder" / "model.safetensors")
    pipe.tokenizer.save(folder / "tokenizer")


def prune(args) -> int:
    """Keep one UNet copy (the EMA one with --keep ema) and the model's tensors only."""
    tensors = read(Path(args.source))
    ema = {k: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    out = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    if args.keep == "ema":
        if not ema:
            raise ToolError(f"{args.source}: has no EMA weights ({EMA_PREFIX}*) to keep")
        by_flat_name = {k[len(EMA_PREFIX) :]: v for k, v in ema.items()}
        for key in [k for k in out if k.startswith(UNET_PREFIX)]:
            flat = ("diffusion_model." + key[len(UNET_PREFIX) :]).replace(".", "")
            if flat not in by_flat_name:
                raise ToolError(f"{args.source}: the EMA weights have no copy of {key}")
            out[key] = by_flat_name[flat]
    print(write(out, Path(args.target), args))
    return 0


def bake_vae(args) -> int:
    """Replace a model's VAE with a VAE file's (standalone, or another model's)."""
    model, vae = read(Path(args.model)), read(Path(args.vae))
    if any(k.startswith(VAE_PREFIX) for k in vae):
        vae = {k[len(VAE_PREFIX) :]: v for k, v in vae.items() if k.startswith(VAE_PREFIX)}
    old = {k for k in model if k.startswith(VAE_PREFIX)}
    new = {VAE_PREFIX + k for k in vae if not k.startswith(("loss.", "model_ema."))}
    if old and not new >= old:
        missing = sorted(k[len(VAE_PREFIX) :] for k in old - new)[:3]
        raise ToolError(f"{args.vae}: not a VAE for this model (no {', '.join(missing)})")
    out = {k: v for k, v in model.items() if not k.startswith(VAE_PREFIX)}
    out.update({VAE_PREFIX + k: v for k, v in vae.items() if VAE_PREFIX + k in new})
    print(write(out, Path(args.target), args))
    return 0


def merge(args) -> int:
    if args.method == "add-difference" and args.base is None:
        raise ToolError("--method add-difference needs --base C (the model B was tuned from)")
    a, b = read(Path(args.a)), read(Path(args.b))
    c = read(Path(args.base)) if args.method == "add-difference" else None
    out = merge_tensors(a, b, c, args.alpha)
    print(write(out, Path(args.target), args))
    return 0


def merge_tensors(a, b, c=None, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """AUTOMATIC1111's merger: ``a (1 - alpha) + b alpha``, or with ``c``, ``a + (b - c) alpha``,
    for every float tensor the models share in shape; the rest as in ``a``."""
    out = {}
    for key, x in a.items():
        y = b.get(key)
        z = None if c is None else c.get(key)
        usable = y is not None and y.shape == x.shape and x.is_floating_point()
        if c is not None:
            usable = usable and z is not None and z.shape == x.shape
        if not usable:
            out[key] = x
            continue
        x32, y32 = x.float(), y.float()
        merged = (
            x32 + (y32 - z.float()) * alpha if c is not None else x32 * (1 - alpha) + y32 * alpha
        )
        out[key] = merged.to(x.dtype)
    return out


# Where an SD single file keeps the two models a LoRA adapts, and kohya's prefix for each.
LORA_PARTS = {UNET_PREFIX: "lora_unet_", "cond_stage_model.transformer.": "lora_te_"}


def extract_lora(args) -> int:
    """A LoRA of rank ``--rank`` approximating (tuned - base), layer by layer (SVD)."""
    tuned, base = read(Path(args.tuned)), read(Path(args.base))
    tensors = extract_lora_tensors(tuned, base, args.rank, args.min_difference)
    if not tensors:
        raise ToolError(f"{args.tuned} and {args.base} do not differ in any adaptable layer")
    metadata = {"ss_network_dim": str(args.rank), "ss_network_alpha": str(args.rank),
                "ss_output_name": Path(args.target).stem}  # fmt: skip
    _check_target(Path(args.target), args.overwrite)
    from sd_pipeline.files import save_safetensors

    print(save_safetensors(tensors, Path(args.target), metadata))
    return 0


def extract_lora_tensors(
    tuned: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    rank: int,
    min_difference: float = 0.0,
) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors (``lora_down``, ``lora_up``, ``alpha`` = rank, so a scale of 1) for
    every linear and convolution weight of the UNet and text encoder that differs between
    the models by more than ``min_difference`` (relative, in the Frobenius norm). Layers are
    named by their original (CompVis / transformers) paths, as AUTOMATIC1111-era files are."""
    out = {}
    for key, w in tuned.items():
        prefix = next((p for p in LORA_PARTS if key.startswith(p)), None)
        if prefix is None or not key.endswith(".weight") or w.ndim not in (2, 4):
            continue
        if "embedding" in key or key not in base or base[key].shape != w.shape:
            continue
        delta = w.float() - base[key].float()
        if delta.norm() <= min_difference * base[key].float().norm() or not delta.any():
            continue
        name = LORA_PARTS[prefix] + key[len(prefix) : -len(".weight")].replace(".", "_")
        down, up = _low_rank(delta, rank)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down the best rank-``rank`` approximation of ``delta`` (a
    convolution's kernel flattened per output channel, as kohya's extraction does)."""
    matrix = delta.reshape(delta.shape[0], -1)
    r = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    up = (u[:, :r] * s[:r]).float()
    down = vh[:r].float()
    if delta.ndim == 4:
        return down.reshape(r, *delta.shape[1:]), up.reshape(delta.shape[0], r, 1, 1)
    return down, up


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sd-model", description="Stable Diffusion checkpoint tools")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help):
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(fn=fn)
        return c

    def writes(c):
        c.add_argument("--dtype", help="cast floating tensors: float32, float16 or bfloat16")
        c.add_argument("--overwrite", action="store_true", help="replace an existing target")

    c = command("info", info, "what a checkpoint holds: kind, parts, hash, metadata")
    c.add_argument("model", help="a .safetensors or .ckpt file")
    c = command("convert", convert, ".ckpt <-> .safetensors, single file <-> diffusers folder")
    c.add_argument("source", help="a checkpoint file or a diffusers model folder")
    c.add_argument("target", help="a .safetensors / .ckpt file, or a folder (diffusers)")
    writes(c)
    c = command("prune", prune, "drop the EMA copy (or keep only it) and training state")
    c.add_argument("source")
    c.add_argument("target")
    c.add_argument("--keep", choices=("non-ema", "ema"), default="non-ema",
                   help="which UNet weights to keep (default: the non-EMA ones)")  # fmt: skip
    writes(c)
    c = command("bake-vae", bake_vae, "replace a model's VAE with another VAE file's")
    c.add_argument("model")
    c.add_argument("vae")
    c.add_argument("target")
    writes(c)
    c = command("merge", merge, "AUTOMATIC1111's checkpoint merger")
    c.add_argument("a", help="model A")
    c.add_argument("b", help="model B")
    c.add_argument("target")
    c.add_argument("--method", choices=("weighted-sum", "add-difference"), default="weighted-sum")
    c.add_argument("--alpha", type=float, default=0.5, help="B's share (default 0.5)")
    c.add_argument("--base", help="model C for add-difference: A + (B - C) * alpha")
    writes(c)
    c = command("extract-lora", extract_lora, "a LoRA of a fine-tune's difference from its base")
    c.add_argument("tuned", help="the fine-tuned model")
    c.add_argument("base", help="the model it was tuned from")
    c.add_argument("target", help="the LoRA file to write (.safetensors)")
    c.add_argument("--rank", type=int, default=32, help="the LoRA's rank (default 32)")
    c.add_argument(
        "--min-difference", type=float, default=0.0,
        help="skip layers whose relative change is at most this (default 0: any change)",
    )  # fmt: skip
    c.add_argument("--overwrite", action="store_true", help="replace an existing target")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("sd-model: interrupted; nothing written", file=sys.stderr)
        return 130
    except (ToolError, ValueError, OSError) as e:
        print(f"sd-model: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
