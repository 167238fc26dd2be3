"""sd-train on tiny models: stages, outputs, resume after SIGKILL, data parallel, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sd_pipeline import single_file
from sd_pipeline import training as tr
from sd_pipeline.training import stages
from sd_pipeline.training.shapes import ShapesConfig, write_dataset

TINY = {
    "mode": "scratch",
    "resolution": 64,
    "vae": {"base_channels": 32, "channel_mult": [1, 1, 1, 1], "num_res_blocks": 1},
    "text_encoder": {"width": 32, "layers": 1, "heads": 1, "mlp_width": 64, "max_positions": 16},
    "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [2], "num_heads": 1, "context_dim": 32, "norm_groups": 8},
    "batch_size": 2,
    "vae_batch_size": 1,
    "grad_accum": 2,
    "vae_steps": 2,
    "steps": 4,
    "lr": 1e-3,
    "vae_lr": 1e-3,
    "warmup_steps": 2,
    "lr_schedule": "cosine",
    "ema_decay": 0.9,
    "random_flip": True,
    "checkpoint_every": 1,
    "log_every": 1,
    "progress": False,
    "sample_prompts": ["a red circle on a blue background"],
    "sample_steps": 2,
}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_dataset(folder, 8, seed=0, config=ShapesConfig())
    return folder


def recipe(tmp_path, data, **changes):
    values = {**TINY, "data": str(data), "out": str(tmp_path / "out"), **changes}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(values))
    return path, values


def tensors(path):
    return load_file(str(path))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_scratch_outputs_load_and_sample(tmp_path, shapes_dir):
    config = tr.TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "o"),
                               "sample_every": 4})  # fmt: skip
    final = tr.train(config)
    out = tmp_path / "o"
    keys = load_file(str(final)).keys()
    for prefix in single_file.PREFIXES.values():
        assert any(k.startswith(prefix) for k in keys), prefix
    # VAE stage: a standalone file; logs with one line per step; sample grids.
    vae_keys = load_file(str(out / "vae" / "model.safetensors")).keys()
    assert "encoder.conv_in.weight" in vae_keys
    lines = [json.loads(x) for x in (out / "diffusion" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(x["loss"] > 0 for x in lines)
    # warm-up 2 steps then cosine to 0 over the remaining 2: lr = 5e-4, 1e-3, 1e-3, 5e-4
    assert [x["lr"] for x in lines] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    assert (out / "diffusion" / "samples" / "step-0000004.png").is_file()

    from sd_pipeline import StableDiffusion

    pipe = StableDiffusion.from_checkpoint(final, native_size=64, device="cpu")
    image = pipe.txt2img("a red circle on a blue background", steps=2, seed=0, progress=False)[0]
    assert image.size == (64, 64)


def test_vae_rescale_gives_unit_variance_latents(tmp_path, shapes_dir):
    from sd_pipeline.training.data import ImageFolder
    from sd_vae import AutoencoderKL

    config = tr.TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "o"),
                               "steps": 0})  # fmt: skip
    tr.train(config)
    vae = AutoencoderKL.from_checkpoint(tmp_path / "o" / "vae" / "model.safetensors")
    data = ImageFolder.load(shapes_dir, 64)
    images, _ = data.batch(list(range(len(data))))
    with torch.no_grad():
        z = vae.encode(images).sample(torch.Generator().manual_seed(0))
    assert float((z * vae.config.scaling_factor).std()) == pytest.approx(1.0, abs=1e-3)


def test_decoder_stage_refines_only_the_decoder(tmp_path, shapes_dir):
    """decoder_steps: after the diffusion stage the VAE's decoder trains alone; the encoder (and
    so the UNet's latents) is untouched, and the final model carries the refined decoder."""
    config = tr.TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "o"),
                               "steps": 1, "decoder_steps": 2})  # fmt: skip
    final = tensors(tr.train(config))
    out = tmp_path / "o"
    vae, refined = (
        tensors(out / "vae" / "model.safetensors"),
        tensors(out / "decoder" / "model.safetensors"),
    )
    diffusion = tensors(out / "diffusion" / "model.safetensors")
    assert vae.keys() == refined.keys()
    frozen = [k for k in vae if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in vae if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(vae)
    assert all(torch.equal(vae[k], refined[k]) for k in frozen)
    assert not all(torch.equal(vae[k], refined[k]) for k in trained)
    prefix = single_file.PREFIXES["vae"]
    assert all(torch.equal(final[prefix + k], refined[k]) for k in refined)
    assert all(torch.equal(final[k], v) for k, v in diffusion.items() if not k.startswith(prefix))
    assert len((out / "decoder" / "log.jsonl").read_text().splitlines()) == 2


def run_cli(args, **kw):
    cmd = [sys.executable, "-m", "sd_pipeline.training", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, shapes_dir):
    path, values = recipe(tmp_path, shapes_dir, steps=6)
    reference = tr.train(tr.TrainConfig(**{**values, "out": str(tmp_path / "ref")}))

    cmd = [sys.executable, "-m", "sd_pipeline.training", "scratch", "--recipe", str(path)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "out" / "diffusion" / "state.safetensors"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "out" / "model.safetensors").exists()

    done = run_cli(["scratch", "--recipe", str(path), "--resume"])
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stderr
    assert_same(tensors(tmp_path / "out" / "model.safetensors"), tensors(reference))
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "out" / "diffusion" / "log.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == [1, 2, 3, 4, 5, 6]


def test_torchrun_two_processes_match_single_process(tmp_path, shapes_dir):
    # Two ranks of 1 image x 2 accumulation steps == one process of 2 images x 2.
    path, values = recipe(tmp_path, shapes_dir, batch_size=1, steps=3, vae_steps=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "sd_pipeline.training", "scratch", "--recipe", str(path)]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in
             (tmp_path / "out" / "diffusion" / "log.jsonl").read_text().splitlines()]  # fmt: skip
    ranks = [x for x in lines if "rank_fingerprints" in x]
    assert ranks and ranks[-1]["agree"] is True
    a, b = ranks[-1]["rank_fingerprints"]
    assert a == b

    single = tr.train(
        tr.TrainConfig(
            **{**values, "batch_size": 2, "vae_batch_size": 2, "out": str(tmp_path / "one")}
        )
    )
    for stage in ("vae", "diffusion"):
        two = [
            json.loads(x) for x in (tmp_path / "out" / stage / "log.jsonl").read_text().splitlines()
        ]
        one = [
            json.loads(x) for x in (tmp_path / "one" / stage / "log.jsonl").read_text().splitlines()
        ]
        losses = [x["loss"] for x in two if "loss" in x]
        assert losses == pytest.approx([x["loss"] for x in one], rel=1e-4)
    # The weights agree up to summation order. Adam divides by |grad|, so a parameter whose
    # gradient is ~0 (a conv bias before a GroupNorm) can move by up to lr on rounding noise:
    # bound the median difference tightly and the largest by the learning rate.
    a, b = tensors(tmp_path / "out" / "model.safetensors"), tensors(single)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.median() < 1e-6 and diffs.max() < values["lr"]


def test_finetune_unet_only(tmp_path, shapes_dir):
    base = tr.train(tr.TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "b"),
                                      "steps": 1, "ema_decay": 0.0}))  # fmt: skip
    done = run_cli(["finetune", "--checkpoint", str(base), "--data", str(shapes_dir),
                    "--out", str(tmp_path / "ft"), "--resolution", "64", "--steps", "2",
                    "--batch-size", "2", "--lr", "1e-3", "--no-progress", "--prediction", "v",
                    "--gradient-checkpointing", "--mixed-precision", "bf16"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    before, after = tensors(base), tensors(tmp_path / "ft" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model"}  # only model.diffusion_model.* (the UNet) was trained


def test_helpers():
    stage = stages.plan(tr.TrainConfig(data="x", checkpoint="m.safetensors"))[0]
    idx = [stages.batch_indices(0, stage, s, 3, 8) for s in range(8)]
    flat = [i for step in idx for i in step]
    assert sorted(flat[:8]) == list(range(8)) and sorted(flat[8:16]) == list(range(8))
    assert idx == [stages.batch_indices(0, stage, s, 3, 8) for s in range(8)]
    c = tr.TrainConfig(data="x", warmup_steps=4, lr_schedule="linear")
    assert [stages.lr_factor(s, c, 8) for s in (0, 3, 4, 6)] == [0.25, 1.0, 1.0, 0.5]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resolution": 60}, "multiple of 8, got 60"),
        ({"lr_schedule": "exp"}, "lr_schedule 'exp' is not valid; choose from: constant"),
        ({"mixed_precision": "fp8"}, "mixed_precision 'fp8'"),
        ({"data": ""}, "no training data"),
        ({"mode": "finetune"}, "finetune needs --checkpoint"),
        ({"decoder_steps": -1}, "must not be negative"),
        (
            {"mode": "finetune", "checkpoint": "m.safetensors", "decoder_steps": 5},
            "decoder_steps refines a VAE trained by `sd-train scratch` only",
        ),
    ],
)
def test_bad_settings(changes, message, shapes_dir):
    with pytest.raises(ValueError, match=message):
        tr.TrainConfig(**{**TINY, "data": str(shapes_dir), **changes}).validate()


def test_cli_errors(tmp_path):
    done = run_cli(["scratch", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert done.returncode == 2 and "no usable training images" in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rate": 1}')
    done = run_cli(["scratch", "--recipe", str(bad)])
    assert done.returncode == 2 and "unknown recipe keys ['learning_rate']" in done.stderr
