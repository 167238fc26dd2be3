"""Hostile and careless generation settings (issue 17, items 7, 8, 13 and the request side of
10): each is refused with one clear message before anything large is allocated, or stopped
during sampling, never turned into a black picture."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sd_pipeline import LIMITS, CheckpointError, NonFiniteError, RequestError, StableDiffusion
from sd_pipeline.cli import main

FAST = dict(steps=2, progress=False)


def _files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def _png_with(tmp_path, parameters: str):
    path = tmp_path / "params.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return path


def _cli(tiny_checkpoint, tmp_path, capsys, *argv):
    out = tmp_path / "out"
    code = main([*argv, "--checkpoint", str(tiny_checkpoint), "-o", f"{out}/", "--no-progress"])
    err = capsys.readouterr().err
    return code, err, out


# 7: no silent black pictures


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_is_refused(tiny_pipe, scale):
    with pytest.raises(RequestError, match="guidance_scale must be a finite number"):
        tiny_pipe.txt2img("x", guidance_scale=scale, **FAST)


def test_huge_guidance_is_refused_unless_limits_are_lifted(tiny_pipe):
    with pytest.raises(RequestError, match=r"guidance_scale must be at most 100.*no-limits"):
        tiny_pipe.txt2img("x", guidance_scale=1e30, **FAST)
    # lifted: 1e30 * (cond - uncond) overflows float32 and sampling stops, naming the cause
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        tiny_pipe.txt2img("x", guidance_scale=1e30, limits=False, **FAST)


def test_nan_latents_stop_sampling(tiny_pipe):
    latents = torch.full((1, 4, 4, 4), float("nan"))
    with pytest.raises(NonFiniteError, match="at model call 1"):
        tiny_pipe.txt2img("x", latents=latents, sampler="euler", **FAST)


def test_nan_weights_stop_sampling(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_checkpoint))
    key = next(k for k in state if k.startswith("model.diffusion_model.out."))
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu", native_size=32)
    with pytest.raises(NonFiniteError):
        pipe.txt2img("x", seed=0, **FAST)


def test_nan_vae_is_caught_at_decode(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe.vae, "decode", lambda z, tile_size=None: z.new_full(
        (z.shape[0], 3, 32, 32), float("nan")))  # fmt: skip
    with pytest.raises(NonFiniteError, match="VAE decoded NaN"):
        tiny_pipe.txt2img("x", seed=0, **FAST)


def test_cfg_nan_in_a_png_is_refused_before_loading(tiny_checkpoint, tmp_path, capsys):
    png = _png_with(
        tmp_path, "a cat\nSteps: 2, Sampler: Euler, CFG scale: nan, Seed: 1, Size: 32x32"
    )
    code, err, out = _cli(tiny_checkpoint, tmp_path, capsys, "--from-png", str(png))
    assert code != 0 and "CFG scale field must be a finite number" in err
    assert "--cfg" not in err  # #13: name what the user gave, not a flag they never typed
    assert not out.exists()


# 8: resource bounds, checked before allocating


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ("x\nSteps: 999999999, Sampler: Euler, CFG scale: 7, Seed: 1", r"Steps field must be at most 1000"),
        ("x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 100000x100000", r"Size field must be at most 4096"),
        ("x\nSteps: 2, Sampler: Warp drive, CFG scale: 7, Seed: 1", r"Sampler field .Warp drive. is unknown"),
        ("x\nSteps: 0, Sampler: Euler, CFG scale: 7, Seed: 1", r"Steps field must be a positive integer"),
    ],
)  # fmt: skip
def test_png_values_past_the_limits(tiny_checkpoint, tmp_path, capsys, parameters, message):
    png = _png_with(tmp_path, parameters)
    code, err, out = _cli(tiny_checkpoint, tmp_path, capsys, "--from-png", str(png))
    assert code != 0 and re.search(message, err), err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x", "--batch", "100000"], r"--batch asks for 100000 images in one call; at most 64"),
        (["x", "--width", "100000"], r"--width must be at most 4096"),
        (["x", "--steps", "5000"], r"--steps must be at most 1000"),
        (["x", "--width", "4096", "--height", "4096", "--batch", "8"], r"--batch x size is 8 images"),
        (["x", "--mask-blur", "1e9", "--init-image", "{init}", "--mask", "{init}"], r"--mask-blur must be at most 512"),
    ],
)  # fmt: skip
def test_cli_values_past_the_limits(tiny_checkpoint, tmp_path, capsys, argv, message):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32)).save(init)
    argv = [a.format(init=init) for a in argv]
    code, err, out = _cli(tiny_checkpoint, tmp_path, capsys, *argv)
    assert code == 2 and re.search(message, err), err
    assert "--no-limits" in err and not out.exists()


def test_no_limits_lifts_them(tiny_pipe):
    with pytest.raises(RequestError, match="batch_size asks for 65 images"):
        tiny_pipe.txt2img("x", batch_size=65, output_type="latent", **FAST)
    latents = tiny_pipe.txt2img("x", batch_size=65, width=8, height=8, output_type="latent",
                                limits=False, **FAST)  # fmt: skip
    assert latents.shape[0] == 65
    assert LIMITS.images == 64


@pytest.mark.parametrize("sample_size", [10**6, [64, 64], "64", 0])
def test_absurd_diffusers_sample_size(tmp_path, sample_size):
    """A diffusers root's unet/config.json whose sample_size would ask for terabytes, or has the
    wrong type, is refused naming the file and the field."""
    from conftest import write_diffusers_root

    root = tmp_path / "model"
    write_diffusers_root(root, sample_size=sample_size)
    with pytest.raises(CheckpointError, match=r"unet/config\.json.*sample_size"):
        StableDiffusion.from_checkpoint(root, device="cpu")


# 10 and 13: clear messages, no tracebacks


def test_negative_prompt_errors_name_the_negative_prompt(tiny_pipe):
    with pytest.raises(TypeError, match=r"^negative_prompt must be a str"):
        tiny_pipe.txt2img("x", negative_prompt=3, **FAST)


@pytest.mark.parametrize("bad", [2.5, "3", True])
def test_wrong_types_are_named(tiny_pipe, bad):
    with pytest.raises(RequestError, match=r"^steps must be an integer"):
        tiny_pipe.txt2img("x", steps=bad, progress=False)


def test_one_error_type_around_from_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    for path in (junk, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(path.name)):
            StableDiffusion.from_checkpoint(path)


def test_cuda_without_cuda(tiny_checkpoint, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err, _ = _cli(tiny_checkpoint, tmp_path, capsys, "x", "--device", "cuda")
    assert code == 2 and "CUDA is not available here; use --device cpu" in err


def test_nothing_written_when_sampling_fails(tiny_checkpoint, tmp_path, capsys):
    code, err, out = _cli(tiny_checkpoint, tmp_path, capsys, "x", "--cfg", "1e30", "--no-limits",
                          "--steps", "2", "--width", "32", "--height", "32")  # fmt: skip
    assert code == 1 and "NaN or infinite" in err
    assert not out.exists() or _files(out) == []
    assert np.isfinite(1.0)  # the run above printed one line, not a traceback
    assert "Traceback" not in err


def test_a_pickle_is_read_once_per_pipeline_load(tmp_path, monkeypatch):
    """One torch.load for the three parts (it was five reads of a multi-GB pickle)."""
    from conftest import checkpoint_state

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": checkpoint_state(), "global_step": 3}, path)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu", native_size=32)
    assert len(calls) == 1
    assert pipe.txt2img("x", seed=0, **FAST)[0].size == (32, 32)


def test_sd2_file_pads_with_bang_and_an_sdxl_key_alone_changes_nothing(tmp_path):
    from conftest import PREFIXES, checkpoint_state, tiny_components
    from sdxl_checkpoints import openclip_layout

    state = checkpoint_state()
    _, text, _ = tiny_components()
    sd2 = {k: v for k, v in state.items() if not k.startswith(PREFIXES["text"])}
    sd2.update(openclip_layout(text.state_dict(), "cond_stage_model.model."))
    path = tmp_path / "sd2.safetensors"
    save_file(sd2, str(path))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu", native_size=32)
    assert pipe.tokenizer.pad_id == 0  # OpenCLIP's "!", not the end token
    assert pipe.txt2img("x", seed=0, **FAST)[0].size == (32, 32)
    # the family comes from the UNet's weights: an SD 1.x UNet with a stray SDXL encoder key
    # is SD 1.x (SDXL files are tested in test_sdxl)
    sdxl = dict(state)
    sdxl["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = (
        state[PREFIXES["text"] + "text_model.embeddings.token_embedding.weight"].clone()
    )
    path = tmp_path / "sdxl.safetensors"
    save_file(sdxl, str(path))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu")
    assert pipe.unet.config.family == "sd1" and pipe.text_encoder_2 is None
