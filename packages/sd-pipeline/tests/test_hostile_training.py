"""Careless and hostile input to sd-train (issues 16 and 17): each test fails without its fix.

Half-precision checkpoints, divergence, damaged or mismatched training state, litter from
killed runs, bad recipes and exports, decompression bombs: a clear line or a warning, never a
traceback, a NaN model or a lost checkpoint.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from conftest import checkpoint_state
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_pipeline import StableDiffusion, bundled_checkpoint, single_file
from sd_pipeline.training import TrainConfig, TrainingError, cli, losses, train
from sd_pipeline.training.data import ImageFolder
from sd_pipeline.training.shapes import ShapesConfig, write_dataset

TINY = {
    "mode": "scratch",
    "resolution": 64,
    "vae": {"base_channels": 32, "channel_mult": [1, 1, 1, 1], "num_res_blocks": 1},
    "text_encoder": {"width": 32, "layers": 1, "heads": 1, "mlp_width": 64, "max_positions": 16},
    "unet": {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [2], "num_heads": 1, "context_dim": 32, "norm_groups": 8},
    "batch_size": 1,
    "vae_steps": 2,
    "steps": 0,
    "lr": 1e-3,
    "vae_lr": 1e-3,
    "ema_decay": 0.0,
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
    write_dataset(folder, 4, seed=0, config=ShapesConfig())
    return folder


def write_recipe(tmp_path, data, **changes):
    values = {**TINY, "data": str(data), "out": str(tmp_path / "out"), **changes}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, shapes_dir):
    """A finished two-step VAE stage (and a zero-step diffusion stage): copy it, then damage."""
    folder = tmp_path_factory.mktemp("vae-run")
    train(TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(folder / "out")}))
    return folder / "out"


@pytest.fixture
def run_copy(tmp_path, vae_run, shapes_dir):
    """(recipe path, OUT) of a copy of ``vae_run``, ready to resume."""
    shutil.copytree(vae_run, tmp_path / "out")
    return write_recipe(tmp_path, shapes_dir), tmp_path / "out"


def sd_train(capsys, *args) -> tuple[int, str]:
    """Run sd-train in this process: (exit status, stderr)."""
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def read(path):
    """(metadata, tensors) of a safetensors file, copied: safetensors maps the file, so a
    tensor read from it must not outlive a rewrite of that file in place."""
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}


def one_clear_line(err: str, *words: str) -> str:
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("sd-train: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- issue 16


def float16_checkpoint(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in checkpoint_state().items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("model", "precision"), [("tiny", "no"), ("tiny", "fp16"), ("bundled", "fp16")]
)
def test_finetune_float16_checkpoint_trains_float32_master_weights(
    tmp_path, shapes_dir, capsys, model, precision
):
    """A float16 file (the bundled model is one) crashed with a dtype mismatch, and with fp16
    autocast with 'Attempting to unscale FP16 gradients': the weights are float32 whatever the
    file's precision."""
    checkpoint = float16_checkpoint(tmp_path) if model == "tiny" else bundled_checkpoint()
    if checkpoint is None:
        pytest.skip("no bundled model installed")
    with safe_open(str(checkpoint), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    code, err = sd_train(capsys, "finetune", "--checkpoint", checkpoint,
                         "--data", shapes_dir, "--out", tmp_path / "ft", "--resolution", 64,
                         "--steps", 1, "--lr", 1e-4, "--mixed-precision", precision,
                         "--no-progress")  # fmt: skip
    assert code == 0, err
    out = load_file(str(tmp_path / "ft" / "model.safetensors"))
    unet = [v for k, v in out.items() if k.startswith(single_file.PREFIXES["unet"])]
    assert unet and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in unet)


def test_every_sub_command_flag_has_help():
    sub = next(a for a in cli.parser()._actions if a.choices and "export" in a.choices)
    for name, parser in sub.choices.items():
        for action in parser._actions:
            assert action.help, f"sd-train {name} {action.option_strings or action.dest}"


def test_pipeline_leaves_the_modules_it_is_given_alone():
    """Sample grids build a StableDiffusion from the models in training: it must not freeze
    them, put them in eval mode or move them."""
    from sd_clip import CLIPTextConfig, CLIPTextModel
    from sd_unet import UNet, UNetConfig
    from sd_vae import AutoencoderKL, AutoencoderKLConfig

    text = CLIPTextModel(CLIPTextConfig.tiny())
    unet = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_heads=1, norm_groups=8,
                           context_dim=text.config.width))  # fmt: skip
    parts = [AutoencoderKL(AutoencoderKLConfig.tiny()), text, unet]
    StableDiffusion(*parts, device="cpu", dtype=torch.bfloat16)
    for part in parts:
        assert part.training
        assert all(p.requires_grad and p.dtype == torch.float32 for p in part.parameters())


def test_sample_grid_is_the_pipelines_picture(tmp_path, shapes_dir, monkeypatch):
    """The grid of the last step is what StableDiffusion makes of the saved model (the same
    weights: no EMA), image i from seed + i as txt2img's batches, and the trained models are
    back in train mode afterwards."""
    from sd_pipeline.training import samples

    prompts = ["a red circle on a blue background", "a white square on a green background"]
    config = TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "o"),
                            "vae_steps": 1, "steps": 1, "sample_every": 1,
                            "sample_prompts": prompts, "sample_guidance": 3.0})  # fmt: skip
    modes = []
    real = samples.sample_images

    def spy(trainer):
        out = real(trainer)
        modes.append({k: m.training for k, m in trainer.models.items()})
        return out

    monkeypatch.setattr(samples, "sample_images", spy)
    train(config)
    assert modes[-1] == {"vae": False, "text_encoder": True, "unet": True}
    grid = np.asarray(Image.open(tmp_path / "o" / "diffusion" / "samples" / "step-0000001.png"))
    pipe = StableDiffusion.from_checkpoint(tmp_path / "o" / "diffusion" / "model.safetensors",
                                           device="cpu")  # fmt: skip
    images = pipe.txt2img(prompts, sampler="euler", steps=2, guidance_scale=3.0, seed=0,
                          progress=False)  # fmt: skip
    expect = np.concatenate([np.asarray(im) for im in images], axis=1)
    assert grid.shape == expect.shape == (64, 128, 3)
    assert np.abs(grid.astype(int) - expect.astype(int)).max() <= 1


# ---------------------------------------------------------------------------- issue 17 #2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    tmp_path, shapes_dir, capsys, monkeypatch
):
    real = losses.reconstruction

    def diverging(trainer, indices, generators):
        loss = real(trainer, indices, generators)
        return loss * float("nan") if trainer.step == 2 else loss

    monkeypatch.setattr(losses, "reconstruction", diverging)
    recipe = write_recipe(tmp_path, shapes_dir, vae_steps=4)
    code, err = sd_train(capsys, "scratch", "--recipe", recipe)
    assert code != 0
    one_clear_line(err, "nan", "step 3", "last good checkpoint")
    with safe_open(str(tmp_path / "out" / "vae" / "state.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
    model = load_file(str(tmp_path / "out" / "vae" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in model.values())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_non_finite_weights_are_never_written(tmp_path, shapes_dir):
    from sd_pipeline.training.distributed import Dist
    from sd_pipeline.training.stages import plan
    from sd_pipeline.training.trainer import Trainer

    config = TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "o")})
    data = ImageFolder.load(shapes_dir, 64)
    trainer = Trainer(config, plan(config)[0], data, Dist(), resume=False)
    with torch.no_grad():
        next(iter(trainer.params.values()))[0] = float("inf")
    with pytest.raises(TrainingError, match="not finite"):
        trainer.save()
    assert not (tmp_path / "o" / "vae").exists()


def test_nan_in_a_resumed_state_is_an_error_naming_the_step(run_copy, capsys):
    recipe, out = run_copy
    path = out / "vae" / "state.safetensors"
    meta, tensors = read(path)
    key = next(k for k in tensors if k.startswith("param."))
    tensors[key][...] = float("nan")
    save_file(tensors, str(path), meta)
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume", "--vae-steps", 3)
    assert code != 0
    one_clear_line(err, str(path), "step 2", "not finite")


# ---------------------------------------------------------------------------- issue 17 #5


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        meta, tensors = read(path)
        if how == "no step":
            del meta["step"]
        else:  # a missing tensor
            del tensors[next(k for k in tensors if k.startswith("param."))]
        save_file(tensors, str(path), meta)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "no step", "missing key"])
def test_damaged_state_is_one_line_naming_the_file(run_copy, capsys, how):
    recipe, out = run_copy
    path = out / "vae" / "state.safetensors"
    damage(path, how)
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume")
    assert code == 2
    one_clear_line(err, str(path), "delete it")


def test_resume_with_another_architecture_is_refused(run_copy, capsys, tmp_path, shapes_dir):
    _, out = run_copy
    vae = {**TINY["vae"], "base_channels": 64}
    recipe = write_recipe(tmp_path, shapes_dir, vae=vae)
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume")
    assert code == 2
    one_clear_line(err, str(out / "vae" / "state.safetensors"), "architecture")


def test_truncated_stage_file_is_written_again_from_its_state(run_copy, capsys):
    recipe, out = run_copy
    path = out / "vae" / "model.safetensors"
    _, before = read(path)
    path.write_bytes(path.read_bytes()[:1000])
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume")
    assert code == 0, err
    after = load_file(str(path))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_garbage_line_in_the_log_is_dropped_with_a_warning(run_copy, capsys, caplog):
    recipe, out = run_copy
    log = out / "vae" / "log.jsonl"
    log.write_text(log.read_text() + '{"stage": "vae", "st\n')
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume", "--vae-steps", 3)
    assert code == 0, err
    assert "is not a log entry" in caplog.text
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resuming_with_another_seed_or_learning_rate_warns(run_copy, capsys, caplog):
    recipe, _ = run_copy
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume", "--seed", 5,
                         "--vae-lr", 5e-4)  # fmt: skip
    assert code == 0, err
    assert "seed=5, but the run was started with seed=0" in caplog.text
    assert "vae_lr=0.0005, but the run was started with vae_lr=0.001" in caplog.text


# ---------------------------------------------------------------------------- issue 17 #10


def bomb_png(path, side=30000):
    """A valid PNG header claiming side x side pixels (far past PIL's bomb limit)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip


def test_decompression_bomb_in_the_data_is_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "data"
    write_dataset(folder, 12, seed=1, config=ShapesConfig())
    bomb_png(folder / "bomb.png")
    (folder / "bomb.txt").write_text("a bomb")
    data = ImageFolder.load(folder, 64)
    assert len(data) == 12
    assert "bomb.png: cannot read the image (DecompressionBombError" in caplog.text


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"steps": "100"}, ["'steps' is a string ('100'); expected an integer"]),
        ({"lr": True}, ["'lr' is a boolean (True); expected a number"]),
        ({"sample_prompts": "a cat"}, ["'sample_prompts'", "expected a list of strings"]),
        ({"vae": [32]}, ["'vae' is a list", "expected a JSON object"]),
        ({"vae": {"base_channels": "32"}}, ["vae.base_channels is a string ('32')"]),
        ({"unet": {"widht": 3}}, ["unet: unknown fields ['widht']"]),
        ({"schedule": {"beta_start": "x"}}, ["schedule.beta_start must be a positive number"]),
    ],
)
def test_wrong_types_in_a_recipe_are_one_line(tmp_path, shapes_dir, capsys, changes, words):
    recipe = write_recipe(tmp_path, shapes_dir, **changes)
    code, err = sd_train(capsys, "scratch", "--recipe", recipe)
    assert code == 2
    one_clear_line(err, *words)


@pytest.fixture(scope="module")
def model_file(vae_run):
    return vae_run / "diffusion" / "model.safetensors"


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", ["no such file"]),
        ("folder", ["is a folder"]),
        ("garbage", ["unreadable model file"]),
        ("not safetensors", ["use a '.safetensors' file name"]),
        ("int8", ["--dtype int8", "choose from: float32, float16, bfloat16"]),
        ("nonsense", ["--dtype float17"]),
    ],
)
def test_export_errors_are_one_line(tmp_path, capsys, model_file, case, words):
    src, dst, dtype = model_file, tmp_path / "x.safetensors", "float16"
    if case == "missing":
        src = tmp_path / "nothing.safetensors"
    elif case == "folder":
        src = tmp_path
    elif case == "garbage":
        src = tmp_path / "garbage.safetensors"
        src.write_bytes(os.urandom(300))
    elif case == "not safetensors":
        dst = tmp_path / "x.ckpt"
    else:
        dtype = "int8" if case == "int8" else "float17"
    code, err = sd_train(capsys, "export", src, dst, "--dtype", dtype)
    assert code == 2
    one_clear_line(err, *words)
    assert not dst.exists()


def test_export_casts(tmp_path, capsys, model_file):
    code, err = sd_train(capsys, "export", model_file, tmp_path / "h.safetensors")
    assert code == 0, err
    half = load_file(str(tmp_path / "h.safetensors"))
    assert {v.dtype for v in half.values()} == {torch.float16}


# ---------------------------------------------------------------------------- issue 17 #12


def test_stale_temporary_files_are_removed_and_nothing_else(run_copy, capsys):
    recipe, out = run_copy
    ours = [out / "vae" / ".state.safetensors.k3j_9x0a.tmp",
            out / "vae" / "state.safetensors.ab12cd34.tmp",
            out / "diffusion" / ".model.safetensors.zz99yy88.tmp",
            out / ".model.safetensors.q1w2e3r4.tmp"]  # fmt: skip
    theirs = [out / "vae" / "notes.tmp", out / "vae" / ".other.abcdefgh.tmp", out / "keep.txt"]
    for path in ours + theirs:
        path.write_bytes(b"partial")
    code, err = sd_train(capsys, "scratch", "--recipe", recipe, "--resume")
    assert code == 0, err
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)


def test_sigterm_stops_like_ctrl_c_and_leaves_no_litter(tmp_path, shapes_dir):
    recipe = write_recipe(tmp_path, shapes_dir, vae_steps=200)
    cmd = [sys.executable, "-m", "sd_pipeline.training", "scratch", "--recipe", str(recipe)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    state = tmp_path / "out" / "vae" / "state.safetensors"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*.tmp"))
    load_file(str(state))  # complete


# ---------------------------------------------------------------------------- issue 17 #3


def test_trained_model_with_norm_groups_8_loads_in_the_pipeline(tmp_path, shapes_dir):
    """A VAE of 16 channels in groups of 8: a loader that ignores the file's sd_vae.config
    infers SD's 32 groups and cannot build it."""
    vae = {**TINY["vae"], "base_channels": 16, "norm_groups": 8}
    final = train(TrainConfig(**{**TINY, "data": str(shapes_dir), "out": str(tmp_path / "o"),
                                 "vae": vae, "vae_steps": 1, "steps": 1}))  # fmt: skip
    pipe = StableDiffusion.from_checkpoint(final, device="cpu")
    assert pipe.vae.config.norm_groups == 8 and pipe.unet.config.norm_groups == 8
    image = pipe.txt2img("a red circle on a blue background", steps=2, seed=0, progress=False)[0]
    assert image.size == (64, 64)
