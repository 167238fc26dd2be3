"""sd-model: every command's result against the same operation written plainly here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PREFIXES, checkpoint_state
from safetensors.torch import load_file, save_file

from sd_pipeline import StableDiffusion
from sd_pipeline.model_tools import main, model_kind


@pytest.fixture()
def files(tmp_path):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    for seed, path in enumerate((a, b, c)):
        save_file(checkpoint_state(seed=seed), str(path))
    return a, b, c


def _same(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_convert_safetensors_and_ckpt_round_trip_exactly(files, tmp_path):
    a = files[0]
    assert main(["convert", str(a), str(tmp_path / "a.ckpt")]) == 0
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    assert _same(ckpt, load_file(str(a)))
    assert main(["convert", str(tmp_path / "a.ckpt"), str(tmp_path / "back.safetensors")]) == 0
    assert _same(load_file(str(tmp_path / "back.safetensors")), load_file(str(a)))
    assert main(["convert", str(a), str(tmp_path / "half.safetensors"), "--dtype", "float16"]) == 0
    half = load_file(str(tmp_path / "half.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.values())


def test_convert_to_a_diffusers_folder_and_back(files, tmp_path):
    a = files[0]
    folder = tmp_path / "diffusers"
    assert main(["convert", str(a), str(folder)]) == 0
    assert (folder / "unet" / "config.json").is_file() and (folder / "tokenizer").is_dir()
    from_file = StableDiffusion.from_checkpoint(a, device="cpu", native_size=32)
    from_folder = StableDiffusion.from_checkpoint(folder, device="cpu", native_size=32)
    kw = dict(seed=0, steps=2, output_type="latent", progress=False)
    torch.testing.assert_close(from_folder.txt2img("x", **kw), from_file.txt2img("x", **kw))
    assert main(["convert", str(folder), str(tmp_path / "again.safetensors")]) == 0
    again = load_file(str(tmp_path / "again.safetensors"))
    original = load_file(str(a))
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_merges_are_automatic1111s_formulas(files, tmp_path):
    a, b, c = files
    ta, tb, tc = (load_file(str(p)) for p in files)
    out = tmp_path / "ws.safetensors"
    assert main(["merge", str(a), str(b), str(out), "--alpha", "0.3"]) == 0
    merged = load_file(str(out))
    for k in ta:
        torch.testing.assert_close(merged[k], ta[k] * 0.7 + tb[k] * 0.3, rtol=0, atol=1e-7)
    out = tmp_path / "ad.safetensors"
    assert main(["merge", str(a), str(b), str(out), "--method", "add-difference", "--base",
                 str(c), "--alpha", "1"]) == 0  # fmt: skip
    merged = load_file(str(out))
    for k in ta:
        torch.testing.assert_close(merged[k], ta[k] + (tb[k] - tc[k]), rtol=0, atol=1e-6)
    assert main(["merge", str(a), str(b), str(tmp_path / "x.safetensors"), "--alpha", "0"]) == 0
    assert _same(load_file(str(tmp_path / "x.safetensors")), ta)


def test_bake_vae_replaces_only_the_vae(files, tmp_path):
    a, b, _ = files
    tb = load_file(str(b))
    vae_file = tmp_path / "vae.safetensors"
    vae = {k[len(PREFIXES["vae"]) :]: v for k, v in tb.items() if k.startswith(PREFIXES["vae"])}
    save_file(vae, str(vae_file))
    out = tmp_path / "baked.safetensors"
    assert main(["bake-vae", str(a), str(vae_file), str(out)]) == 0
    baked, ta = load_file(str(out)), load_file(str(a))
    for k, v in baked.items():
        assert torch.equal(v, tb[k] if k.startswith(PREFIXES["vae"]) else ta[k])
    assert baked.keys() == ta.keys()


def test_prune_drops_or_keeps_the_ema_copy(files, tmp_path):
    state = checkpoint_state()
    unet_keys = [k for k in state if k.startswith(PREFIXES["unet"])]
    ema = {"model_ema." + ("diffusion_model." + k[len(PREFIXES["unet"]) :]).replace(".", ""):
           state[k] * 2 for k in unet_keys}  # fmt: skip
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**state, **ema}, "global_step": 5}, full)
    assert main(["prune", str(full), str(tmp_path / "pruned.safetensors")]) == 0
    assert _same(load_file(str(tmp_path / "pruned.safetensors")), state)
    assert main(["prune", str(full), str(tmp_path / "ema.safetensors"), "--keep", "ema"]) == 0
    kept = load_file(str(tmp_path / "ema.safetensors"))
    assert all(torch.equal(kept[k], state[k] * 2) for k in unet_keys)


def test_info_and_kinds(files, capsys):
    assert main(["info", str(files[0])]) == 0
    out = capsys.readouterr().out
    assert "kind: SD 1.x" in out and "model hash: " in out and "unet (" in out
    nine = checkpoint_state(in_channels=9)
    assert model_kind(nine) == "SD 1.x inpainting"
    assert model_kind({"encoder.conv_in.weight": torch.zeros(1)}) == "VAE"


def test_never_overwrites_and_errors_are_one_line(files, tmp_path, capsys):
    a, b, _ = files
    before = np.fromfile(b, dtype=np.uint8)
    assert main(["convert", str(a), str(b)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert np.array_equal(np.fromfile(b, dtype=np.uint8), before)
    assert main(["merge", str(a), str(b), str(tmp_path / "m.safetensors"),
                 "--method", "add-difference"]) == 2  # fmt: skip
    assert "needs --base" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"junk")
    assert main(["convert", str(junk), str(tmp_path / "j.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "junk.ckpt" in err and "Traceback" not in err
    assert not (tmp_path / "j.safetensors").exists()
