"""sd-train lora (issue 19): LoRA adapters trained on a tiny random checkpoint's frozen UNet and
text encoder. The kohya file it writes loads in diffusers (``load_lora_weights`` on a
``StableDiffusionPipeline`` of the same random components) with the same outputs as our
``load_lora``; ``LoRA.from_file`` merged equals the adapters as trained (attached by hooks);
a run killed mid-way and resumed equals an uninterrupted one bit for bit; two DDP ranks equal
one process to float32 rounding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import checkpoint_state, tiny_components, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from sd_lora import LoRA
from sd_lora.training import inject
from sd_pipeline import training as tr
from sd_pipeline.lora import apply_loras, remove_loras
from sd_pipeline.training.shapes import ShapesConfig, write_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LIMIT = 240
BASE = {
    "mode": "lora",
    "resolution": 64,
    "batch_size": 2,
    "grad_accum": 2,
    "steps": 3,
    "lr": 1e-2,  # large, so that a few steps move the adapters measurably
    "warmup_steps": 1,
    "network_dim": 4,
    "network_alpha": 2.0,
    "network_targets": "all",  # LoCon: linear, 1x1 and 3x3 conv layers
    "train_text_encoder": True,
    "random_flip": True,
    "checkpoint_every": 1,
    "log_every": 1,
    "progress": False,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-train")
    write_dataset(root / "data", 6, seed=0, config=ShapesConfig())
    checkpoint = write_checkpoint(root / "base.safetensors")
    return root, {**BASE, "data": str(root / "data"), "checkpoint": str(checkpoint)}


@pytest.fixture(scope="module")
def trained(setup):
    root, base = setup
    path = tr.train(tr.TrainConfig(**{**base, "out": str(root / "ref")}))
    return root / "ref", path


def _inputs(text_width: int):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, text_width, generator=g)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    return latents, torch.tensor([10.0, 500.0]), context, ids


def _ours(unet, text, latents, t, context, ids):
    with torch.no_grad():
        return unet(latents, t, context), text(ids)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_lora_file_is_kohya_and_only_the_adapters_trained(trained):
    out, path = trained
    assert path == out / "lora.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys  # LoCon 3x3
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "3"
    lora = LoRA.from_file(path)
    assert (lora.rank, lora.alpha, lora.components()) == (4, 2.0, {"unet", "te"})
    # the optimizer held the adapters alone: the state's parameters are the file's tensors
    state = load_file(str(out / "lora" / "state.safetensors"))
    params = {k.removeprefix("param.lora.") for k in state if k.startswith("param.")}
    assert params == {k for k in keys if not k.endswith(".alpha")}
    ups = [v for k, v in load_file(str(path)).items() if k.endswith("lora_up.weight")]
    assert all(bool(u.abs().max() > 0) for u in ups)  # every up moved off its zero start


def test_trained_lora_loads_in_diffusers_as_in_ours(trained):
    """diffusers' load_lora_weights (through peft) of our file, fused at 0.8 on the UNet and
    0.5 on the text encoder, against our load_lora at the same weights."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from test_parity import _diffusers_parts

    _, path = trained
    _, their_text, their_unet = _diffusers_parts(checkpoint_state(), 4)
    _, text, unet = tiny_components()
    unet, text = unet.eval(), text.eval()
    latents, t, context, ids = _inputs(text.config.width)

    def theirs():
        with torch.no_grad():
            eps = their_unet(latents, t, encoder_hidden_states=context).sample
            return eps, their_text(ids).last_hidden_state

    base = theirs()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=their_text, tokenizer=None,
                                   unet=their_unet, scheduler=None, safety_checker=None,
                                   feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(str(path), adapter_name="trained")
    pipe.fuse_lora(components=["unet"], lora_scale=0.8, adapter_names=["trained"])
    pipe.fuse_lora(components=["text_encoder"], lora_scale=0.5, adapter_names=["trained"])
    fused = theirs()

    apply_loras(unet, text, [(LoRA.from_file(path), 0.8, 0.5)])
    ours = _ours(unet, text, latents, t, context, ids)
    remove_loras(unet, text)
    for label, o, th, b in zip(("UNet", "text encoder"), ours, fused, base):
        print(
            f"{label}: LoRA changes the output by {_rel(th, b):.2e}, ours vs diffusers "
            f"{_rel(o, th):.2e}"
        )  # fmt: skip (shown with pytest -s: the parity figures)
        assert _rel(th, b) > 1e-3, f"{label}: the trained LoRA should change the output"
        assert _rel(o, th) < 1e-5, f"{label}: relative error {_rel(o, th):.2e}"


def test_merged_file_equals_the_adapters_as_trained(trained):
    """The adapters attached as in training (sd_lora.training's hooks, the file's weights
    loaded into them) against LoRA.from_file merged into the weights: two computations."""
    _, path = trained
    _, text, unet = tiny_components()
    unet, text = unet.eval(), text.eval()
    inputs = _inputs(text.config.width)
    plain = _ours(unet, text, *inputs)
    network = inject(unet, 4, 2.0, "all")
    inject(text, 4, 2.0, "all", network=network)
    network.load_state_dict(load_file(str(path)))
    attached = _ours(unet, text, *inputs)
    network.remove()
    assert all(torch.equal(a, b) for a, b in zip(_ours(unet, text, *inputs), plain))
    apply_loras(unet, text, [(LoRA.from_file(path), 1.0, 1.0)])
    merged = _ours(unet, text, *inputs)
    remove_loras(unet, text)
    for a, m, p in zip(attached, merged, plain):
        print(f"attached changes {_rel(a, p):.2e}, merged vs attached {_rel(m, a):.2e}")
        assert _rel(a, p) > 1e-3
        assert _rel(m, a) < 1e-5


def _recipe(tmp_path, base, **changes):
    path = tmp_path / "recipe.json"
    values = {**base, "out": str(tmp_path / "out"), **changes}
    path.write_text(json.dumps(values))
    return str(path), values


def test_lora_resume_after_sigkill_matches_uninterrupted_run(tmp_path, setup):
    _, base = setup
    path, values = _recipe(tmp_path, base, steps=6, ema_decay=0.9)
    reference = tr.train(tr.TrainConfig(**{**values, "out": str(tmp_path / "ref")}))

    cmd = [sys.executable, "-m", "sd_pipeline.training", "lora", "--recipe", path]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "out" / "lora" / "state.safetensors"
    deadline = time.time() + LIMIT
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "out" / "lora.safetensors").exists()

    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True,
                          timeout=LIMIT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stderr
    a, b = load_file(str(tmp_path / "out" / "lora.safetensors")), load_file(str(reference))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "out" / "lora" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_lora_ddp_two_ranks_match_single_process(tmp_path, setup, trained):
    """Two ranks of 1 image x 2 micro-steps against the one process of 2 x 2 (``trained``)."""
    _, base = setup
    ref_dir, ref_path = trained
    path, _ = _recipe(tmp_path, base, batch_size=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "sd_pipeline.training", "lora", "--recipe", path]  # fmt: skip
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-3000:]

    def log(out):
        return [json.loads(x) for x in (out / "lora" / "log.jsonl").read_text().splitlines()]

    two = log(tmp_path / "out")
    assert [x["agree"] for x in two if "agree" in x] == [True]  # both ranks' weights the same
    one_losses = [x["loss"] for x in log(ref_dir) if "loss" in x]
    assert [x["loss"] for x in two if "loss" in x] == pytest.approx(one_losses, rel=1e-5)
    a, b = load_file(str(tmp_path / "out" / "lora.safetensors")), load_file(str(ref_path))
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    print(f"DDP 2 ranks vs 1 process: |diff| median {diffs.median():.2e} max {diffs.max():.2e}")
    # Adam divides by |grad|: rounding noise on a ~0 gradient can move a weight by up to lr
    assert diffs.median() < 1e-6 and diffs.max() < BASE["lr"]


def test_text_encoder_only_and_attention_only(tmp_path, setup):
    """--no-train-unet --train-text-encoder: the text encoder's adapters alone; the default
    targets: its attention projections only."""
    _, base = setup
    changes = {"train_unet": False, "network_targets": "attention", "steps": 1}
    path = tr.train(tr.TrainConfig(**{**base, **changes, "out": str(tmp_path / "te")}))
    layers = {k.split(".")[0] for k in load_file(str(path))}
    assert layers and all(k.startswith("lora_te_text_model_encoder_layers_") for k in layers)
    assert {k.rsplit("_", 2)[-2] + "_" + k.rsplit("_", 1)[-1] for k in layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"checkpoint": None}, "lora needs --checkpoint"),
        ({"network_dim": 0}, "network_dim must be at least 1"),
        ({"network_alpha": -1.0}, "network_alpha must be a positive number"),
        ({"network_targets": "everything"}, "network_targets 'everything' is not valid"),
        ({"train_unet": False, "train_text_encoder": False}, "a LoRA of nothing"),
        ({"fsdp": True}, "drop --fsdp"),
        ({"cache_text_encoder_outputs": True}, "needs a frozen text encoder"),
    ],
)
def test_bad_lora_settings(changes, message, setup):
    _, base = setup
    with pytest.raises(tr.TrainingError, match=message):
        tr.TrainConfig(**{**base, **changes}).validate()
