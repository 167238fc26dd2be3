"""Training across processes: images/s of 1 vs 2 processes, and memory per rank, DDP vs FSDP.

    python benchmarks/training_scale.py                      tiny models, 6 timed steps
    python benchmarks/training_scale.py --steps 10 --width 64 --device cuda --nproc 2

Each configuration is one ``torchrun --standalone`` launch of this script (``--worker``), which
builds sd-train's Trainer for a fine-tuning run and times optimizer steps of the same global
batch (strong scaling: 2 processes do half the images each):

- images/s and the scaling efficiency ``t(1 process) / (N x t(N processes))``;
- the communication share of a DDP step: the same step timed again with the gradient exchange
  switched off (``no_sync`` on every micro-step), ``1 - t(no exchange) / t(step)``. DDP overlaps
  the exchange with the backward, so this is the time it adds, not the time it takes;
- per rank: the bytes of model state (weights, gradients, Adam moments: what FSDP shards) and
  the peak resident memory of the process (interpreter and data included).

On a CPU with few cores, N processes share the same cores: the second process competes with the
first for them, so the efficiency measures that contention as much as the communication. Run it
on N devices (``--device cuda``) for a scaling figure. Results: benchmarks/results/training_scale.*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]


def make_inputs(folder: Path, width: int) -> tuple[Path, Path]:
    """A small random single-file model and a shapes dataset."""
    import torch

    from sd_clip import CLIPTextConfig, CLIPTextModel
    from sd_pipeline import single_file
    from sd_pipeline.training.shapes import ShapesConfig, write_dataset
    from sd_unet import UNet, UNetConfig
    from sd_vae import AutoencoderKL, AutoencoderKLConfig

    data, model = folder / "data", folder / "model.safetensors"
    if not data.exists():
        write_dataset(data, 16, seed=0, config=ShapesConfig())
    torch.manual_seed(0)
    parts = {
        "vae": AutoencoderKL(AutoencoderKLConfig(base_channels=32, channel_mult=(1, 1, 1, 1),
                                                 num_res_blocks=1)),
        "text_encoder": CLIPTextModel(CLIPTextConfig(width=32, layers=1, heads=1, mlp_width=64,
                                                     max_positions=16)),
        "unet": UNet(UNetConfig(model_channels=width, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(2,), num_heads=1, context_dim=32,
                                norm_groups=8)),
    }  # fmt: skip
    single_file.save(model, parts, {"resolution": 64})
    return data, model


def model_state_bytes(trainer) -> int:
    """This rank's weights, gradients (as large as the weights) and optimizer state."""
    from sd_pipeline.training.trainer import local

    params = sum(local(p).numel() * local(p).element_size() for p in trainer.params.values())
    moments = 0
    for st in trainer.optimizer.state.values():
        for v in st.values():
            if hasattr(v, "numel") and v.numel() > 1:
                moments += local(v).numel() * local(v).element_size()
    return 2 * params + moments


def timed_steps(trainer, steps: int) -> list[float]:
    c, dist = trainer.config, trainer.dist
    per_step = trainer.stage.batch_size * c.grad_accum * dist.world
    times = []
    for _ in range(steps):
        dist.barrier()
        tic = time.perf_counter()
        trainer.train_step(per_step)
        times.append(time.perf_counter() - tic)
        trainer.step += 1
    return times


def worker(args) -> None:
    import torch

    from sd_pipeline.training import TrainConfig, distributed
    from sd_pipeline.training.run import prepare_data
    from sd_pipeline.training.stages import plan
    from sd_pipeline.training.trainer import Trainer

    config = TrainConfig(**json.loads(Path(args.recipe).read_text()))
    config.validate()
    dist = distributed.init(config.device, need_group=config.fsdp)
    config.device = distributed.train_device(config.device, dist)
    torch.manual_seed(config.seed)
    trainer = Trainer(config, plan(config)[0], prepare_data(config, dist), dist, resume=False)
    timed_steps(trainer, 1)  # warm-up: first-call allocations, FSDP's lazy initialisation
    times = timed_steps(trainer, args.steps)
    report = {"rank": dist.rank, "world": dist.world, "fsdp": config.fsdp, "times": times,
              "state_bytes": model_state_bytes(trainer)}  # fmt: skip
    if dist.world > 1 and not config.fsdp:
        # The same steps without the gradient exchange (the ranks' weights drift apart from
        # here on, which does not change a step's cost).
        distributed.accumulating = lambda model, last: model.no_sync()
        report["times_no_exchange"] = timed_steps(trainer, args.steps)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report["peak_rss_mb"] = rss / 1024 if platform.system() != "Darwin" else rss / 2**20
    Path(args.report).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps(report))


def launch(kind: str, world: int, args, data: Path, model: Path, work: Path) -> list[dict]:
    recipe = {
        "mode": "finetune", "data": str(data), "checkpoint": str(model), "resolution": 64,
        "out": str(work / f"out-{kind}-{world}"), "batch_size": args.global_batch // world,
        "grad_accum": 2, "lr": 1e-4, "progress": False, "device": args.device,
        "fsdp": kind == "fsdp", "train_text_encoder": True,
    }  # fmt: skip
    path = work / f"recipe-{kind}-{world}.json"
    path.write_text(json.dumps(recipe))
    report = work / f"report-{kind}-{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), str(Path(__file__).resolve()), "--worker", "--recipe", str(path),
           "--report", str(report), "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{kind} x{world} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(work.glob(f"report-{kind}-{world}.rank*"))]


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def summarise(results: dict, args) -> tuple[dict, str]:
    rows, step = [], {}
    for (kind, world), ranks in results.items():
        # A step ends when the slowest rank ends it: the step time is the max over ranks.
        t = median([max(r["times"][i] for r in ranks) for i in range(args.steps)])
        step[kind, world] = t
        row = {"config": f"{kind} x{world}", "step_s": round(t, 4),
               "images_per_s": round(args.global_batch * 2 / t, 2),
               "state_mb_per_rank": round(max(r["state_bytes"] for r in ranks) / 2**20, 2),
               "peak_rss_mb_per_rank": round(max(r["peak_rss_mb"] for r in ranks), 1)}  # fmt: skip
        if "times_no_exchange" in ranks[0]:
            quiet = median([max(r["times_no_exchange"][i] for r in ranks)
                            for i in range(args.steps)])  # fmt: skip
            row["communication_share"] = round(max(0.0, 1 - quiet / t), 3)
        rows.append(row)
    for row, (kind, world) in zip(rows, results):
        if world > 1 and (kind, 1) in step:
            row["scaling_efficiency"] = round(step[kind, 1] / (world * step[kind, world]), 3)
    summary = {"device": args.device, "threads_per_process": args.threads,
               "cpus": os.cpu_count(), "global_batch": args.global_batch * 2,
               "unet_width": args.width, "steps": args.steps, "rows": rows}  # fmt: skip
    keys = ["config", "images_per_s", "step_s", "scaling_efficiency", "communication_share",
            "state_mb_per_rank", "peak_rss_mb_per_rank"]  # fmt: skip
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    head = (f"device {args.device}, {os.cpu_count()} CPUs, {args.threads} thread(s) per "
            f"process, global batch {args.global_batch * 2} (2 micro-steps), UNet width "
            f"{args.width}, median of {args.steps} steps")  # fmt: skip
    return summary, head + "\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (default 6)")
    p.add_argument("--global-batch", type=int, default=4, help="images per micro-step, all ranks")
    p.add_argument("--width", type=int, default=32, help="UNet model_channels (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU a rank)")
    p.add_argument("--nproc", type=int, default=2, help="the larger process count (default 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process (default 1)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per launch")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write the results")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="sd-train-scale-") as tmp:
        work = Path(tmp)
        data, model = make_inputs(work, args.width)
        configs = [(k, 1 if w == 1 else args.nproc) for k, w in CONFIGS]
        results = {c: launch(*c, args, data, model, work) for c in configs}
    summary, table = summarise(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_scale.json").write_text(json.dumps(summary, indent=1))
    (args.out / "training_scale.md").write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
