"""``sd-train``: fine-tune a Stable Diffusion checkpoint, train a LoRA for one, train a small
one from scratch, or export a model file in another precision.

    sd-train finetune --checkpoint model.safetensors --data my_images/ --steps 1000
    sd-train scratch --recipe recipes/shapes.json
    sd-train lora --checkpoint model.safetensors --data my_images/ --network-dim 8 --lr 1e-4
    torchrun --nproc_per_node 2 -m sd_pipeline.training scratch --recipe ...
    torchrun --nproc_per_node 8 -m sd_pipeline.training finetune --fsdp --checkpoint ...
    torchrun --nnodes 2 --node-rank 0 --nproc_per_node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29500 -m sd_pipeline.training finetune ...   (the same on node 1)
    sd-train export run/model.safetensors shipped.safetensors --dtype float16

Settings come from a JSON recipe (``--recipe``), and flags given on the command line win. Bad
settings, data or files stop with one line on stderr and exit status 2; Ctrl-C or SIGTERM stop
cleanly (every file written so far is complete; ``--resume`` continues) with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import Any

import torch

from sd_pipeline.training.config import TrainConfig, load_recipe
from sd_pipeline.training.run import EXPORT_DTYPES, export, train

__all__ = ["main", "parser"]

# (flag, type, help) of the settings both training modes take.
COMMON_FLAGS = [
    ("resolution", int, "training image side in pixels, a multiple of 8 (default 512)"),
    ("batch-size", int, "images per process and micro-step (default 1)"),
    ("grad-accum", int, "micro-steps accumulated per optimizer step (default 1)"),
    ("steps", int, "optimizer steps of the text encoder / UNet stage (default 1000)"),
    ("lr", float, "peak learning rate of that stage (default 1e-5)"),
    ("weight-decay", float, "AdamW weight decay (default 0.01)"),
    ("warmup-steps", int, "steps of linear learning-rate warm-up (default 0)"),
    ("lr-schedule", str, "after the warm-up: constant, cosine or linear (default constant)"),
    ("max-grad-norm", float, "clip the gradient norm to this; 0 disables (default 1.0)"),
    ("mixed-precision", str, "no, bf16 or fp16 autocast over float32 weights (default no)"),
    ("ema-decay", float, "keep an EMA of the weights with this decay; 0 disables (default 0)"),
    ("cond-dropout", float, "chance of an empty caption, for guidance (default 0.1)"),
    ("prediction", str, "what the UNet predicts: epsilon or v (default epsilon)"),
    ("seed", int, "seed of every random draw of the run (default 0)"),
    ("checkpoint-every", int, "write model and state every N steps (default 500)"),
    ("sample-every", int, "write a sample grid every N steps; 0 never (default 0)"),
    ("sample-steps", int, "sampling steps of the sample grids (default 20)"),
    ("sample-guidance", float, "guidance scale of the sample grids (default 5.0)"),
    ("log-every", int, "append a line to log.jsonl every N steps (default 10)"),
    (
        "device",
        str,
        "where to train: cpu, cuda (under torchrun: cuda:LOCAL_RANK), ... (default cpu)",
    ),
    ("min-bucket-reso", int, "--enable-bucket: smallest bucket side (default resolution / 2)"),
    ("max-bucket-reso", int, "--enable-bucket: largest bucket side (default resolution * 2)"),
]
SCRATCH_FLAGS = [
    ("vae-steps", int, "optimizer steps of the VAE stage (default 1000)"),
    ("vae-lr", float, "learning rate of the VAE stages (default 1e-4)"),
    ("vae-batch-size", int, "batch size of the VAE stages (default: --batch-size)"),
    ("kl-weight", float, "weight of the VAE's KL term (default 1e-6)"),
    ("decoder-steps", int, "then refine the VAE's decoder alone this many steps (default 0)"),
]
METAVARS = {int: "N", float: "X", str: "NAME"}
SWITCHES = [
    ("gradient-checkpointing", "recompute activations in backward: less memory, slower"),
    ("random-crop", "crop each image at a random place (default: centre)"),
    ("random-flip", "mirror each image with probability 1/2"),
    ("ema-on-cpu", "keep the EMA weights in CPU memory rather than on the device"),
    ("fused-adam", "torch's fused AdamW kernel (same maths, fewer kernel launches)"),
    ("enable-bucket", "aspect-ratio bucketing: train each image near its own aspect ratio"),
]
LORA_FLAGS = [
    ("network-dim", int, "LoRA rank (kohya's network_dim; default 4)"),
    ("network-alpha", float, "LoRA alpha: the update is scaled by alpha / rank (default 1)"),
    (
        "network-targets",
        str,
        "attention (default), transformer (kohya's default: every linear "
        "layer of the transformers) or all (LoCon: the ResBlocks' convolutions too)",
    ),
]
FINETUNE_SWITCHES = [
    ("fsdp", "shard weights, gradients and optimizer state over the processes (FSDP2)"),
    ("cache-text-encoder-outputs", "encode each caption once (the text encoder stays frozen)"),
]


def _mode_parser(sub, mode: str, summary: str) -> None:
    s = sub.add_parser(mode, help=summary, description=summary)
    s.add_argument("--recipe", metavar="JSON", help="file of settings; flags given here win")
    s.add_argument("--resume", action="store_true", help="continue from OUT's last state")
    s.add_argument("--data", metavar="FOLDER",
                   help="captioned images: name.png + name.txt, or a metadata.jsonl")  # fmt: skip
    s.add_argument("--out", metavar="FOLDER", help="where to write (default sd-train-out)")
    if mode in ("finetune", "lora"):
        s.add_argument("--checkpoint", metavar="FILE", help="the model to fine-tune")
        s.add_argument("--train-text-encoder", action="store_true", default=None,
                       help="train the text encoder too (default: the UNet only)")  # fmt: skip
    if mode == "lora":
        s.add_argument("--no-train-unet", action="store_false", dest="train_unet", default=None,
                       help="no adapters on the UNet (with --train-text-encoder: the text "
                       "encoder's only)")  # fmt: skip
    extra = {"scratch": SCRATCH_FLAGS, "lora": LORA_FLAGS}.get(mode, [])
    for name, kind, text in COMMON_FLAGS + extra:
        s.add_argument(f"--{name}", type=kind, help=text, metavar=METAVARS[kind])
    s.add_argument("--sample-prompt", action="append", dest="sample_prompts", metavar="TEXT",
                   help="a prompt of the sample grids (repeat for more)")  # fmt: skip
    extra = {"finetune": FINETUNE_SWITCHES, "lora": FINETUNE_SWITCHES[1:]}.get(mode, [])
    for name, text in SWITCHES + extra:
        s.add_argument(f"--{name}", action="store_true", default=None, help=text)
    s.add_argument("--no-cache-latents", action="store_false", dest="cache_latents", default=None,
                   help="encode the images with the VAE every step, not once")  # fmt: skip
    s.add_argument("--no-progress", action="store_false", dest="progress", default=None,
                   help="no progress bar")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd-train",
        description="Fine-tune a Stable Diffusion checkpoint, train a small one from scratch, "
        "or export a model file in another precision.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    _mode_parser(sub, "finetune", "fine-tune the UNet (and text encoder) of a checkpoint")
    _mode_parser(sub, "scratch", "train VAE, text encoder and UNet from nothing")
    _mode_parser(sub, "lora", "train a LoRA (kohya .safetensors) on a checkpoint's frozen models")
    e = sub.add_parser("export", help="copy a model file with its weights cast")
    e.add_argument("src", help="the .safetensors model file to read")
    e.add_argument("dst", help="the .safetensors file to write")
    e.add_argument("--dtype", default="float16",
                   help=f"{', '.join(EXPORT_DTYPES)} (default float16)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.recipe:
        values.update(load_recipe(args.recipe))
    values["mode"] = args.command
    skip = {"command", "recipe", "resume"}
    values.update({k: v for k, v in vars(args).items() if k not in skip and v is not None})
    return TrainConfig(**values)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM (what torchrun, systemd and `kill` send) stops the run as
    Ctrl-C does: the write in progress is removed, finished files stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> str:
    if args.command == "export":
        return f"sd-train: wrote {export(args.src, args.dst, args.dtype)}"
    return f"sd-train: wrote {train(config_from_args(args), resume=args.resume)}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with sigterm_as_interrupt():
            message = _run(args)
    except KeyboardInterrupt:
        print("sd-train: interrupted; the files written are complete: continue with --resume",
              file=sys.stderr)  # fmt: skip
        return 130
    except (ValueError, OSError) as e:  # TrainingError, DataError, CheckpointError, disk errors
        print(f"sd-train: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("sd-train: error: out of memory on the device; lower --batch-size (raising "
              "--grad-accum keeps the batch), or add --gradient-checkpointing or "
              "--mixed-precision bf16", file=sys.stderr)  # fmt: skip
        return 1
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
