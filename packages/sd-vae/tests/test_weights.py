"""Loading from every layout users have, saving, and the errors bad files give."""

import json
import os
import shutil
import stat

import pytest
import torch
from conftest import assert_same_weights, random_vae, sd_single_file, write_weights
from safetensors.torch import save_file

from sd_vae import AutoencoderKL, AutoencoderKLConfig, CheckpointError, load_state_dict
from sd_vae.weights import from_diffusers, rename_key, to_diffusers


def bare(vae: AutoencoderKL) -> dict:
    return {k: v.clone() for k, v in vae.state_dict().items()}


def diffusers_state(vae: AutoencoderKL, legacy: bool = False) -> dict:
    state = to_diffusers(vae.state_dict(), len(vae.config.channel_mult))
    if legacy:  # diffusers < 0.14 names for the attention projections
        old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        for new_name, old_name in old.items():
            state = {k.replace(new_name, old_name): v for k, v in state.items()}
    return state


# Each writer puts the tiny VAE in one layout and returns what to pass to from_checkpoint.
LAYOUTS = {
    "sd-single-file.safetensors": lambda vae, d: sd_single_file(vae, d / "sd.safetensors"),
    "sd-single-file.ckpt (state_dict wrapper)": lambda vae, d: sd_single_file(vae, d / "sd.ckpt"),
    "sd-single-file.pt (no wrapper)": lambda vae, d: sd_single_file(
        vae, d / "sd.pt", wrapped=False
    ),
    "sd-single-file legacy pickle": lambda vae, d: _legacy_pickle(vae, d / "sd.ckpt"),
    "standalone.safetensors": lambda vae, d: write_weights(bare(vae), d / "vae.safetensors"),
    "standalone.ckpt with loss.* keys": lambda vae, d: write_weights(
        bare(vae) | {"loss.logvar": torch.zeros(())}, d / "vae.ckpt", wrapped=True
    ),
    "standalone, linear attention weights": lambda vae, d: write_weights(
        {k: v.flatten(1) if ".attn_1." in k and v.ndim == 4 else v for k, v in bare(vae).items()},
        d / "vae.safetensors",
    ),
    "save()": lambda vae, d: (vae.save(d / "saved.safetensors"), d / "saved.safetensors")[1],
    "diffusers folder": lambda vae, d: (vae.save_diffusers(d / "vae"), d / "vae")[1],
    "diffusers model root": lambda vae, d: _diffusers_root(vae, d),
    "diffusers folder, .bin": lambda vae, d: _diffusers_bin(vae, d / "vae"),
    "diffusers folder, pre-0.14 names": lambda vae, d: _diffusers_legacy(vae, d / "vae"),
    "diffusers weight file alone": lambda vae, d: write_weights(
        diffusers_state(vae), d / "diffusion_pytorch_model.safetensors"
    ),
    # the tensors already read: what a pipeline passes to read a pickle once for three models
    "load_state_dict(sd.ckpt)": lambda vae, d: load_state_dict(sd_single_file(vae, d / "sd.ckpt")),
    "load_state_dict(save())": lambda vae, d: load_state_dict(
        (vae.save(d / "saved.safetensors"), d / "saved.safetensors")[1]
    ),
    "a plain dict, SD layout": lambda vae, d: {
        "first_stage_model." + k: v for k, v in vae.state_dict().items()
    },
    "a plain dict, a checkpoint's whole object": lambda vae, d: {
        "state_dict": {"first_stage_model." + k: v for k, v in vae.state_dict().items()},
        "global_step": 5,
    },
}


def _legacy_pickle(vae, path):
    state = {"first_stage_model." + k: v.clone() for k, v in vae.state_dict().items()}
    torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=False)
    return path


def _diffusers_root(vae, root):
    vae.save_diffusers(root / "vae")
    (root / "unet").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def _diffusers_bin(vae, folder):
    vae.save_diffusers(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(diffusers_state(vae), folder / "diffusion_pytorch_model.bin")
    return folder


def _diffusers_legacy(vae, folder):
    vae.save_diffusers(folder)
    save_file(
        diffusers_state(vae, legacy=True), str(folder / "diffusion_pytorch_model.safetensors")
    )
    return folder


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_through_every_layout(tiny_vae, tmp_path, layout):
    path = LAYOUTS[layout](tiny_vae, tmp_path)
    loaded = AutoencoderKL.from_checkpoint(path)
    assert loaded.config == tiny_vae.config  # inferred from shapes, config.json or metadata
    assert_same_weights(loaded, tiny_vae)
    assert not loaded.training


def test_save_keeps_a_non_default_config(tmp_path):
    config = AutoencoderKLConfig(
        base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=16, scaling_factor=0.5
    )
    vae = random_vae(config)
    vae.save(tmp_path / "vae.safetensors")
    loaded = AutoencoderKL.from_checkpoint(tmp_path / "vae.safetensors")
    assert loaded.config == config
    assert_same_weights(loaded, vae)
    with torch.no_grad():
        z = torch.randn(1, 4, 4, 4)
        # loaded on the CPU it runs channels_last: the same up to rounding
        torch.testing.assert_close(loaded.decode(z), vae.decode(z), rtol=1e-4, atol=1e-5)


def test_saved_file_has_a_new_files_mode(tmp_path):
    """Written through a private temporary file, but left as readable as any new file."""
    old = os.umask(0o022)
    try:
        random_vae(AutoencoderKLConfig.tiny()).save(tmp_path / "vae.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "vae.safetensors").stat().st_mode) == 0o644
    assert [f.name for f in tmp_path.iterdir()] == ["vae.safetensors"]


def test_state_dict_is_the_compvis_layout():
    """Keys and shapes as in v1-5-pruned-emaonly's first_stage_model. (248 tensors)."""
    with torch.device("meta"):
        state = AutoencoderKL(AutoencoderKLConfig.sd15()).state_dict()
    assert len(state) == 248
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "encoder.down.3.downsample.conv.weight" not in state
    assert "decoder.up.0.upsample.conv.weight" not in state


@pytest.mark.parametrize(
    ("compvis", "diffusers"),
    [
        ("encoder.down.2.block.1.conv1.weight", "encoder.down_blocks.2.resnets.1.conv1.weight"),
        (
            "encoder.down.0.block.0.nin_shortcut.bias",
            "encoder.down_blocks.0.resnets.0.conv_shortcut.bias",
        ),
        (
            "encoder.down.1.downsample.conv.weight",
            "encoder.down_blocks.1.downsamplers.0.conv.weight",
        ),
        ("decoder.up.3.block.0.norm1.bias", "decoder.up_blocks.0.resnets.0.norm1.bias"),
        ("decoder.up.1.upsample.conv.bias", "decoder.up_blocks.2.upsamplers.0.conv.bias"),
        ("decoder.mid.block_2.conv1.weight", "decoder.mid_block.resnets.1.conv1.weight"),
        ("encoder.mid.attn_1.norm.weight", "encoder.mid_block.attentions.0.group_norm.weight"),
        ("encoder.mid.attn_1.proj_out.bias", "encoder.mid_block.attentions.0.to_out.0.bias"),
        ("decoder.norm_out.bias", "decoder.conv_norm_out.bias"),
        ("post_quant_conv.weight", "post_quant_conv.weight"),
    ],
)
def test_key_rules_both_ways(compvis, diffusers):
    assert rename_key(compvis, 4, to_diffusers=True) == diffusers
    assert rename_key(diffusers, 4, to_diffusers=False) == compvis


def test_attention_weights_change_shape_both_ways(tiny_vae):
    state = to_diffusers(tiny_vae.state_dict(), 4)
    assert state["encoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    back = from_diffusers(state)
    assert back.keys() == tiny_vae.state_dict().keys()
    assert back["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


def test_dtype_and_default_dtype(tiny_vae, tmp_path):
    path = tmp_path / "half.safetensors"
    write_weights({k: v.half() for k, v in bare(tiny_vae).items()}, path)
    assert AutoencoderKL.from_checkpoint(path).dtype == torch.float32
    half = AutoencoderKL.from_checkpoint(path, dtype=torch.float16, device="cpu")
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half.device == torch.device("cpu")


def test_only_the_autoencoder_is_read_from_a_single_file(tiny_vae, tmp_path, monkeypatch):
    """safetensors tensors outside first_stage_model. are never read (and the autoencoder's
    stay memory-mapped: see test_a_loaded_vae_runs_channels_last_on_its_mapped_weights)."""
    from safetensors import safe_open

    path = sd_single_file(tiny_vae, tmp_path / "sd.safetensors")
    read = []
    real_open = safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            handle = self.f.__enter__()
            outer = self

            class Handle:
                def keys(self):
                    return handle.keys()

                def metadata(self):
                    return handle.metadata()

                def get_tensor(self, name):
                    read.append(name)
                    return handle.get_tensor(name)

            outer.handle = Handle()
            return outer.handle

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr("sd_vae._checkpoint.safe_open", Recording)
    AutoencoderKL.from_checkpoint(path)
    assert read and all(name.startswith("first_stage_model.") for name in read)
    assert len(read) == len(tiny_vae.state_dict())


def test_a_loaded_vae_runs_channels_last_on_its_mapped_weights(tiny_vae, tmp_path):
    """Loaded on the CPU, the weights stay in the file's layout (contiguous, as safetensors
    maps them) and the convolutions still get channels_last inputs, the CPU's fast layout, in
    both directions; the numbers are the saved model's up to rounding."""
    path = sd_single_file(tiny_vae, tmp_path / "sd.safetensors")
    vae = AutoencoderKL.from_checkpoint(path)
    assert_same_weights(vae, tiny_vae)
    assert vae.decoder.conv_in.weight.is_contiguous()
    seen = []
    for conv in (vae.encoder.conv_in, vae.decoder.conv_in, vae.decoder.conv_out):
        conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for banded in (False, True):
            seen.clear()
            z = vae.encode(x, banded=banded).mean
            out = vae.decode(z, banded=banded)
            torch.testing.assert_close(out, tiny_vae.decode(z), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(z, tiny_vae.encode(x).mean, rtol=1e-4, atol=1e-5)
            assert len(seen) >= 2  # the conv_ins (the banded path calls conv_out functionally)
            assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)


# ---------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.safetensors: no such checkpoint"):
        AutoencoderKL.from_checkpoint(tmp_path / "nothere.safetensors")


@pytest.mark.parametrize("name", ["notes.safetensors", "notes.ckpt", "notes.txt"])
def test_not_a_checkpoint(tmp_path, name):
    (tmp_path / name).write_text("these are not weights\n" * 10)
    with pytest.raises(CheckpointError, match=f"{name}: not a readable"):
        AutoencoderKL.from_checkpoint(tmp_path / name)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file(tiny_vae, tmp_path, suffix):
    path = sd_single_file(tiny_vae, tmp_path / f"sd{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=f"sd{suffix}: not a readable .*(truncated|not fully covered)"
    ):
        AutoencoderKL.from_checkpoint(path)


def test_checkpoint_without_a_vae(tmp_path):
    path = write_weights(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)},
        tmp_path / "unet-only.safetensors",
    )
    with pytest.raises(CheckpointError, match=r"unet-only\.safetensors: no autoencoder"):
        AutoencoderKL.from_checkpoint(path)


def test_vae_of_another_shape(tiny_vae, tmp_path):
    path = sd_single_file(tiny_vae, tmp_path / "sd.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch at 'encoder.conv_in.weight': the model expects \(128, 3, 3, 3\), "
        r"the file has \(32, 3, 3, 3\)",
    ):
        AutoencoderKL.from_checkpoint(path, config=AutoencoderKLConfig.sd15())


def test_one_tensor_of_the_wrong_shape(tiny_vae, tmp_path):
    state = bare(tiny_vae) | {"decoder.mid.attn_1.v.bias": torch.zeros(32)}
    path = write_weights(state, tmp_path / "vae.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"'decoder.mid.attn_1.v.bias': the model expects \(64,\), the file has \(32,\)",
    ):
        AutoencoderKL.from_checkpoint(path)


def test_missing_tensor(tiny_vae, tmp_path):
    state = bare(tiny_vae)
    del state["decoder.up.1.block.1.norm2.bias"]
    path = write_weights(state, tmp_path / "vae.ckpt")
    with pytest.raises(
        CheckpointError, match=r"1 missing \(first: 'decoder.up.1.block.1.norm2.bias'\)"
    ):
        AutoencoderKL.from_checkpoint(path)


def test_folder_that_is_not_a_diffusers_vae(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match=r"not a diffusers autoencoder: expected config\.json"
    ):
        AutoencoderKL.from_checkpoint(tmp_path)


def test_diffusers_vae_of_another_kind(tiny_vae, tmp_path):
    tiny_vae.save_diffusers(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text()) | {"use_quant_conv": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported autoencoder: use_quant_conv=False"):
        AutoencoderKL.from_checkpoint(tmp_path)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tiny_vae, tmp_path):
    marker = tmp_path / "code-ran"
    state = {"first_stage_model." + k: v for k, v in tiny_vae.state_dict().items()}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callback": _RunsCode(marker)}, path)

    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load"):
        AutoencoderKL.from_checkpoint(path)
    assert not marker.exists()

    # The crafted file is live: an unsafe load does run its code.
    shutil.copy(path, tmp_path / "copy.ckpt")
    torch.load(tmp_path / "copy.ckpt", weights_only=False)
    assert marker.exists()


def test_shapes_that_fit_no_config(tiny_vae, tmp_path):
    state = bare(tiny_vae)
    del state["post_quant_conv.weight"]
    path = write_weights(state, tmp_path / "vae.safetensors")
    with pytest.raises(
        CheckpointError, match=r"cannot infer the autoencoder's shape: no 'post_quant_conv\.weight'"
    ):
        AutoencoderKL.from_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"1 missing \(first: 'post_quant_conv.weight'\)"):
        AutoencoderKL.from_checkpoint(path, config=AutoencoderKLConfig.tiny())
