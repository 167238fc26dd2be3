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


def test_extract_lora_recovers_a_merged_lora(files, tmp_path):
    """(base + a rank-2 LoRA) vs base, extracted at rank 2: the LoRA's delta comes back (to
    float rounding), and at rank 1 the best rank-1 approximation of it (Eckart-Young)."""
    from sd_lora import LoRA

    base_file = files[0]
    base = load_file(str(base_file))
    g = torch.Generator().manual_seed(3)
    lora_state, deltas = {}, {}
    for key in [k for k in base if k.endswith(("attn1.to_q.weight", "self_attn.v_proj.weight"))]:
        w = base[key]
        down = torch.randn(2, w.shape[1], generator=g)
        up = torch.randn(w.shape[0], 2, generator=g) * 0.1
        prefix = "lora_unet_" if key.startswith(PREFIXES["unet"]) else "lora_te_"
        start = PREFIXES["unet"] if prefix == "lora_unet_" else PREFIXES["text"]
        name = prefix + key[len(start) : -len(".weight")].replace(".", "_")
        lora_state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(2.0)}  # fmt: skip
        deltas[key] = up @ down
    assert len(deltas) >= 2
    tuned = {k: v + deltas[k] if k in deltas else v for k, v in base.items()}
    tuned_file = tmp_path / "tuned.safetensors"
    save_file(tuned, str(tuned_file))
    out = tmp_path / "extracted.safetensors"
    assert main(["extract-lora", str(tuned_file), str(base_file), str(out), "--rank", "2"]) == 0
    lora = LoRA.from_file(out)
    assert lora.rank == 2 and len(lora.keys()) == len(deltas)
    pipe = StableDiffusion.from_checkpoint(base_file, device="cpu")
    pipe.load_lora(out)
    merged = pipe.save(tmp_path / "merged.safetensors")
    again = load_file(str(merged))
    for key, delta in deltas.items():
        torch.testing.assert_close(again[key] - base[key], delta, atol=1e-5, rtol=1e-4)
    one = tmp_path / "rank1.safetensors"
    assert main(["extract-lora", str(tuned_file), str(base_file), str(one), "--rank", "1"]) == 0
    key = next(iter(deltas))
    u, s, vh = torch.linalg.svd(deltas[key].double())
    best = (s[0] * torch.outer(u[:, 0], vh[0])).float()
    layer = LoRA.from_file(one)
    pipe1 = StableDiffusion.from_checkpoint(base_file, device="cpu")
    pipe1.load_lora(one)
    got = load_file(str(pipe1.save(tmp_path / "m1.safetensors")))[key] - base[key]
    torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
    assert layer.rank == 1
    assert (
        main(["extract-lora", str(base_file), str(base_file), str(tmp_path / "none.safetensors")])
        == 2
    )
