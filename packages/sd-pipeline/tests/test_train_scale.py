"""sd-train across processes with torch's engine (issue 25): DDP and FSDP under torchrun, on one
node and on two simulated nodes (c10d rendezvous on 127.0.0.1), each equal to one process with
the same global batch; an FSDP run killed mid-way resumes on another number of processes; the
memory options (latent and text-encoder caches, aspect-ratio bucketing, fused AdamW, EMA on the
CPU) train the same steps as the plain path.

Everything runs on the CPU with gloo. The reference is the plain single-process trainer, which
uses no torch.distributed at all, so the comparisons are against an independent computation of
the same steps, not against the distributed code itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_pipeline import single_file
from sd_pipeline.training import TrainConfig, stages, train
from sd_pipeline.training import data as data_mod
from sd_pipeline.training.shapes import ShapesConfig, write_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LIMIT = 240  # seconds any one launch may take

# Global batch 4 per optimizer step: 2 images x 2 micro-steps in one process, or 1 x 2 x 2 ranks.
BASE = {
    "mode": "finetune",
    "resolution": 64,
    "batch_size": 2,
    "grad_accum": 2,
    "steps": 3,
    "lr": 1e-3,
    "warmup_steps": 1,
    "ema_decay": 0.9,
    "random_flip": True,
    "checkpoint_every": 1,
    "log_every": 1,
    "progress": False,
}


def tiny_checkpoint(path):
    """A single file of small random models (every weight random: no zero output layer)."""
    from sd_clip import CLIPTextConfig, CLIPTextModel
    from sd_unet import UNet, UNetConfig
    from sd_vae import AutoencoderKL, AutoencoderKLConfig

    torch.manual_seed(0)
    parts = {
        "vae": AutoencoderKL(AutoencoderKLConfig(base_channels=32, channel_mult=(1, 1, 1, 1),
                                                 num_res_blocks=1)),
        "text_encoder": CLIPTextModel(CLIPTextConfig(width=32, layers=1, heads=1, mlp_width=64,
                                                     max_positions=16)),
        "unet": UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(2,), num_heads=1, context_dim=32,
                                norm_groups=8)),
    }  # fmt: skip
    with torch.no_grad():
        for part in parts.values():
            for p in part.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    single_file.save(path, parts, {"resolution": 64})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_dataset(root / "data", 8, seed=0, config=ShapesConfig())
    checkpoint = tiny_checkpoint(root / "base.safetensors")
    return root, {**BASE, "data": str(root / "data"), "checkpoint": str(checkpoint)}


@pytest.fixture(scope="module")
def reference(setup):
    """One process, no torch.distributed: the run the others must equal. (finetune UNet, and
    UNet + text encoder.)"""
    root, base = setup
    out = {}
    for name, extra in (("unet", {}), ("both", {"train_text_encoder": True})):
        config = TrainConfig(**{**base, **extra, "out": str(root / f"ref-{name}")})
        out[name] = root / f"ref-{name}", load_file(str(train(config)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe(tmp_path, base, **changes) -> str:
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.json"
    path.write_text(json.dumps({**base, **changes}))
    return str(path)


def launcher(*torchrun_args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args]


def sd_train(recipe_path, *extra) -> list[str]:
    return ["-m", "sd_pipeline.training", "finetune", "--recipe", recipe_path, *extra]


def run_single_node(recipe_path, *extra):
    cmd = launcher("--standalone", "--nproc_per_node", "2", *sd_train(recipe_path, *extra))
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]


def run_two_nodes(recipe_path, *extra):
    """Two launchers of one process each, as two machines would start them."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = launcher("--nnodes", "2", "--node-rank", str(node), "--nproc_per_node", "1",
                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                       "--rdzv-id", "sd-train-test", *sd_train(recipe_path, *extra))  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    errors = []
    try:
        for p in procs:
            errors.append(p.communicate(timeout=LIMIT)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]


def losses(out, stage="diffusion"):
    lines = [json.loads(x) for x in (out / stage / "log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def assert_close(out, ref, lr=BASE["lr"]):
    """Float32 rounding apart: the losses of each step, and the weights. Adam divides by
    |grad|, so a weight whose gradient is ~0 can move by up to lr on rounding noise alone: the
    median difference is bounded tightly, the largest by the learning rate."""
    ref_dir, ref_weights = ref
    assert losses(out) == pytest.approx(losses(ref_dir), rel=1e-5)
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    diffs = torch.cat([(weights[k] - ref_weights[k]).abs().flatten() for k in weights])
    worst = max(abs(a / b - 1) for a, b in zip(losses(out), losses(ref_dir)))
    print(
        f"{out}: loss rel diff {worst:.2e}, weights |diff| median {diffs.median():.2e} "
        f"max {diffs.max():.2e}"
    )  # shown with pytest -s: the parity figures
    assert diffs.median() < 1e-6 and diffs.max() < lr
    return diffs


# ---------------------------------------------------------------------------- DDP and FSDP


@pytest.mark.parametrize("nodes", ["one", "two"])
def test_ddp_matches_single_process(tmp_path, setup, reference, nodes):
    _, base = setup
    path = recipe(tmp_path, base, batch_size=1, out=str(tmp_path / "out"))
    (run_single_node if nodes == "one" else run_two_nodes)(path)
    assert_close(tmp_path / "out", reference["unet"])
    log = [json.loads(x) for x in (tmp_path / "out" / "diffusion" / "log.jsonl").open()]
    assert [x["agree"] for x in log if "agree" in x] == [True]  # every rank's weights the same


@pytest.mark.parametrize("nodes", ["one", "two"])
def test_fsdp_matches_single_process(tmp_path, setup, reference, nodes):
    """Text encoder and UNet sharded over 2 ranks (EMA kept on the CPU, as shards): the model
    file gathered at the end equals the single process's."""
    _, base = setup
    path = recipe(tmp_path, base, batch_size=1, train_text_encoder=True, fsdp=True,
                  ema_on_cpu=True, out=str(tmp_path / "out"))  # fmt: skip
    (run_single_node if nodes == "one" else run_two_nodes)(path)
    out = tmp_path / "out" / "diffusion"
    index = json.loads((out / "state.json").read_text())
    assert index["world"] == "2" and (out / index["folder"] / ".metadata").is_file()
    assert [p.name for p in out.glob("state-*")] == [index["folder"]]  # older states removed
    assert_close(tmp_path / "out", reference["both"])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the ranks torchrun started)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_fsdp_rank_killed_resumes_on_another_world_size(tmp_path, setup, reference):
    """2 ranks, rank 1 SIGKILLed once the first sharded state is complete; the run then goes on
    in ONE process (2 images x 2 micro-steps: the same global batch) from that state, which DCP
    re-shards, and ends where the uninterrupted run ends."""
    _, base = setup
    steps = 6
    ref_config = {**base, "train_text_encoder": True, "steps": steps}
    ref = train(TrainConfig(**{**ref_config, "out": str(tmp_path / "ref")}))
    path = recipe(tmp_path, ref_config, batch_size=1, fsdp=True, out=str(tmp_path / "out"))
    proc = subprocess.Popen(launcher("--standalone", "--nproc_per_node", "2", *sd_train(path)),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    index = tmp_path / "out" / "diffusion" / "state.json"
    deadline = time.time() + LIMIT
    try:
        while not index.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        ranks = sorted(children(proc.pid))
        assert len(ranks) == 2, "the run ended before a rank could be killed"
        os.kill(ranks[-1], signal.SIGKILL)
        proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    killed_at = int(json.loads(index.read_text())["step"])
    assert 1 <= killed_at < steps and not (tmp_path / "out" / "model.safetensors").exists()

    cmd = [sys.executable, *sd_train(path, "--resume", "--batch-size", "2")]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stderr and "will differ" not in done.stderr
    assert json.loads(index.read_text())["world"] == "1"
    lines = [json.loads(x) for x in (tmp_path / "out" / "diffusion" / "log.jsonl").open()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, steps + 1))
    assert_close(tmp_path / "out", (tmp_path / "ref", load_file(str(ref))))


def test_fsdp_bf16_runs_and_samples(tmp_path, setup):
    """The mixed-precision policy (bf16 compute, float32 reduction and master weights) on two
    ranks, with a sample grid made while sharded (every rank takes part, rank 0 writes)."""
    _, base = setup
    path = recipe(tmp_path, base, batch_size=1, steps=2, fsdp=True, mixed_precision="bf16",
                  sample_every=2, sample_steps=2, out=str(tmp_path / "out"))  # fmt: skip
    run_single_node(path)
    assert all(np.isfinite(losses(tmp_path / "out")))
    assert (tmp_path / "out" / "diffusion" / "samples" / "step-0000002.png").is_file()
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


# ---------------------------------------------------------------------------- memory options


def test_fused_adam_and_cpu_ema_train_the_same_steps(tmp_path, setup, reference):
    _, base = setup
    config = TrainConfig(**{**base, "fused_adam": True, "ema_on_cpu": True,
                            "out": str(tmp_path / "out")})  # fmt: skip
    train(config)
    assert_close(tmp_path / "out", reference["unet"])


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory):
    """Pictures of five aspect ratios, captioned."""
    folder = tmp_path_factory.mktemp("aspect")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(200, 100), (100, 200), (120, 120), (300, 100), (90, 240),
                                (160, 150), (210, 90), (110, 230)]):  # fmt: skip
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i % 3}")
    return folder


def test_bucket_sizes_are_kohyas():
    """kohya's rule: sides multiples of 64 within [min, max], each bucket as large as the
    resolution's area allows, both orientations and the square."""
    sizes = data_mod.bucket_sizes(512, 256, 1024)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    assert (448, 576) in sizes and (256, 1024) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and min(w, h) >= 256 and max(w, h) <= 1024
        assert w * h <= 512 * 512 and (h, w) in sizes
        # one side is as long as the other side allows (no larger bucket of that width/height)
        assert w * (h + 64) > 512 * 512 or h + 64 > 1024 or (w + 64) * h > 512 * 512
    assert data_mod.nearest_bucket(200, 100, sizes) == (704, 320)  # 2.2:1 is nearest 2:1
    assert data_mod.nearest_bucket(100, 100, sizes) == (512, 512)


def test_bucketed_batches_stay_in_one_bucket(odd_shapes):
    sizes = data_mod.bucket_sizes(128, 64, 256)
    folder = data_mod.ImageFolder.load(odd_shapes, 128, buckets=sizes)
    assert len(set(folder.sizes)) > 2
    stage = stages.plan(TrainConfig(data="x", checkpoint="m.safetensors"))[0]
    groups = folder.buckets()
    for step in range(12):
        batch = stages.batch_indices(0, stage, step, 2, len(folder), groups)
        assert len(batch) == 2 and len({folder.sizes[i] for i in batch}) == 1
        images, _ = folder.batch(batch)
        w, h = folder.sizes[batch[0]]
        assert images.shape == (2, 3, h, w)
    # Every image is seen in each epoch (epoch = sum of ceil(bucket / batch) steps).
    per_epoch = sum(-(-len(g) // 2) for g in groups)
    seen = {i for s in range(per_epoch) for i in stages.batch_indices(0, stage, s, 2, 8, groups)}
    assert seen == set(range(len(folder)))


def test_caches_and_bucketing_give_the_uncached_losses(tmp_path, odd_shapes, setup):
    """Bucketed training with VAE latents and text-encoder outputs cached once equals
    encoding both every step (to rounding: the cache encodes in other batch sizes)."""
    _, base = setup
    common = {**base, "data": str(odd_shapes), "resolution": 128, "enable_bucket": True,
              "min_bucket_reso": 64, "max_bucket_reso": 256, "batch_size": 2, "grad_accum": 1,
              "steps": 4, "cond_dropout": 0.3}  # fmt: skip
    runs = {}
    for name, cached in (("cached", True), ("uncached", False)):
        config = TrainConfig(**{**common, "cache_latents": cached,
                                "cache_text_encoder_outputs": cached,
                                "out": str(tmp_path / name)})  # fmt: skip
        train(config)
        runs[name] = losses(tmp_path / name)
    assert runs["cached"] == pytest.approx(runs["uncached"], rel=1e-5)
    assert len(set(runs["cached"])) == 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "scratch", "fsdp": True}, "fsdp shards the fine-tuning"),
        ({"train_text_encoder": True, "cache_text_encoder_outputs": True},
         "cache_text_encoder_outputs needs a frozen text encoder"),
        ({"enable_bucket": True, "resolution": 96}, "multiple of 64, got 96"),
        ({"enable_bucket": True, "min_bucket_reso": 100}, "multiples of 64"),
    ],
)  # fmt: skip
def test_bad_scale_settings(changes, message, setup):
    _, base = setup
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**base, **changes}).validate()
