"""LoRAs through StableDiffusion and sd-generate: load_lora / unload_loras, <lora:...> prompt
tags, Lora hashes in the PNG and --from-png finding them again."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from sd_pipeline import GenerationParameters, StableDiffusion
from sd_pipeline.cli import main
from sd_pipeline.metadata import read_parameters

FAST = dict(steps=2, progress=False, seed=0, output_type="latent")


def _compvis_lora(path, pipe, rank=2, seed=0):
    """A kohya-style LoRA on the pipeline's own (CompVis / transformers) module names, as
    AUTOMATIC1111-era files name them: attention projections of the UNet, the text encoder's."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear) or not name.endswith(("to_q", "to_v", "q_proj")):
                continue
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g)
            state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g)
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


@pytest.fixture()
def pipe(tiny_checkpoint):
    return StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)


def test_load_and_unload_lora(pipe, tmp_path):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = pipe.txt2img("x", **FAST)
    path = _compvis_lora(tmp_path / "style.safetensors", pipe)
    pipe.load_lora(path, weight=0.8, text_encoder_weight=0.5)
    styled = pipe.txt2img("x", **FAST)
    assert not torch.allclose(styled, plain)
    picture = pipe.txt2img("x", progress=False, steps=2, seed=0)[0]
    assert (
        GenerationParameters.from_text(picture.info["parameters"])
        .extra["Lora hashes"]
        .startswith("style: ")
    )
    pipe.unload_loras()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(pipe.txt2img("x", **FAST), plain)


def test_load_lora_in_place_equals_the_kept_copy_merge(pipe, tmp_path):
    """in_place=True: the same images as the kept-copy merge (the same sums, rounded alike),
    the weights in their own memory throughout, and back to float32 rounding on unload."""
    path = _compvis_lora(tmp_path / "style.safetensors", pipe)
    pipe.load_lora(path, weight=0.8, text_encoder_weight=0.5)
    copied = pipe.txt2img("x", **FAST)
    pipe.unload_loras()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora(path, weight=0.8, text_encoder_weight=0.5, in_place=True)
    assert {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()} == pointers
    torch.testing.assert_close(pipe.txt2img("x", **FAST), copied, rtol=1e-5, atol=1e-5)
    pipe.unload_loras()
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_prompt_tags_merge_for_the_run_only(pipe, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    _compvis_lora(folder / "ink.safetensors", pipe)
    plain = pipe.txt2img("x", **FAST)
    with pytest.raises(ValueError, match="no LoRA folder is set"):
        pipe.txt2img("x <lora:ink:1>", **FAST)
    pipe.lora_dir = folder
    tagged = pipe.txt2img("x <lora:ink:1>", **FAST)
    assert not torch.allclose(tagged, plain)
    # the same as loading it for good (text encoder weight = UNet weight = 1)
    pipe.load_lora(folder / "ink.safetensors")
    torch.testing.assert_close(pipe.txt2img("x", **FAST), tagged)
    pipe.unload_loras()
    assert torch.equal(pipe.txt2img("x", **FAST), plain)  # the tag's LoRA was taken out
    with pytest.raises(FileNotFoundError, match="nope"):
        pipe.txt2img("x <lora:nope:1>", **FAST)


def test_cli_lora_flags_and_from_png(tiny_checkpoint, tmp_path, capsys):
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu")
    folder = tmp_path / "loras"
    folder.mkdir()
    _compvis_lora(folder / "ink.safetensors", pipe)
    _compvis_lora(tmp_path / "extra.safetensors", pipe, seed=1)
    common = ["--checkpoint", str(tiny_checkpoint), "--steps", "2", "--no-progress", "--width",
              "16", "--height", "16", "--seed", "3"]  # fmt: skip
    out = tmp_path / "a.png"
    code = main(["x <lora:ink:0.7>", "-o", str(out), "--lora-dir", str(folder), "--lora",
                 f"{tmp_path / 'extra.safetensors'}:0.5", *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    params = read_parameters(out)
    assert params.prompt == "x <lora:ink:0.7>"
    assert "ink: " in params.extra["Lora hashes"] and "extra: " in params.extra["Lora hashes"]
    again = tmp_path / "b.png"
    code = main(["--from-png", str(out), "-o", str(again), "--lora-dir", str(folder), "--lora",
                 f"{tmp_path / 'extra.safetensors'}:0.5", *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    code = main(["x", "--lora", str(tmp_path / "missing.safetensors"), "-o",
                 str(tmp_path / "c.png"), *common])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--lora" in err and "missing.safetensors" in err
