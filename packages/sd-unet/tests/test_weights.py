import pickle
from pathlib import Path

import pytest
import torch
from conftest import inputs, random_unet
from safetensors.torch import save_file

from sd_unet import CheckpointError, UNet, UNetConfig
from sd_unet.weights import SD_PREFIX, diffusers_key_map, infer_config


def sd_file_state(model: UNet, prefix: str = SD_PREFIX) -> dict[str, torch.Tensor]:
    """The tensors of an SD single file: the UNet under its prefix, plus the other components."""
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(8)
    return state


def same_output(a: UNet, b: UNet) -> bool:
    x, t, c = inputs(a.config)
    with torch.no_grad():
        return torch.allclose(a(x, t, c), b(x, t, c), rtol=1e-5, atol=1e-6)


def test_sd_safetensors_single_file(tiny, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(sd_file_state(tiny), path)
    loaded = UNet.from_checkpoint(path)
    assert loaded.config == tiny.config  # inferred from shapes
    assert same_output(loaded, tiny)


def test_cpu_load_reads_conv_weights_into_channels_last(tiny, tmp_path):
    """On the CPU the 4-d weights come out channels_last (copied from a mapping of their bytes),
    every tensor equal to the file's."""
    path = tmp_path / "model.safetensors"
    save_file(sd_file_state(tiny), path)
    loaded = UNet.from_checkpoint(path)
    theirs = tiny.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
        if tensor.dim() == 4:
            assert tensor.is_contiguous(memory_format=torch.channels_last), name
        else:
            assert tensor.is_contiguous(), name


@pytest.mark.parametrize("wrapped", [True, False])
def test_sd_pickle_single_file(tiny, tmp_path, wrapped):
    path = tmp_path / "model.ckpt"
    state = sd_file_state(tiny)
    torch.save({"state_dict": state, "global_step": 10} if wrapped else state, path)
    assert same_output(UNet.from_checkpoint(path), tiny)


def test_ema_weights_of_a_full_checkpoint(tiny, tmp_path):
    ema = random_unet(tiny.config, seed=5)
    state = sd_file_state(tiny)
    for k, v in ema.state_dict().items():
        state["model_ema.diffusion_model" + k.replace(".", "")] = v.contiguous()
    state["model_ema.num_updates"] = torch.tensor(100)
    path = tmp_path / "full.safetensors"
    save_file(state, path)
    assert same_output(UNet.from_checkpoint(path), tiny)
    assert same_output(UNet.from_checkpoint(path, ema=True), ema)


def test_ema_requested_from_an_ema_only_file(tiny, tmp_path):
    path = tmp_path / "emaonly.safetensors"
    save_file(sd_file_state(tiny), path)
    with pytest.raises(CheckpointError, match=r"no EMA weights.*ema=False"):
        UNet.from_checkpoint(path, ema=True)


def test_save_and_load_keeps_config_and_weights(tmp_path):
    config = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(2,), num_heads=2, context_dim=16)  # fmt: skip
    model = random_unet(config)
    model.save(tmp_path / "unet.safetensors")
    loaded = UNet.from_checkpoint(tmp_path / "unet.safetensors")
    assert loaded.config == config  # from the file's metadata: heads are not in the shapes
    assert same_output(loaded, model)


def test_bare_file_without_metadata_is_inferred(tiny, tmp_path):
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    save_file(state, tmp_path / "u.safetensors")
    torch.save(state, tmp_path / "u.pt")
    for name in ("u.safetensors", "u.pt"):
        loaded = UNet.from_checkpoint(tmp_path / name)
        assert loaded.config == tiny.config
        assert same_output(loaded, tiny)


def test_diffusers_folder_and_model_root(tiny, tmp_path):
    tiny.save_diffusers(tmp_path / "root" / "unet")
    for path in (tmp_path / "root" / "unet", tmp_path / "root"):
        loaded = UNet.from_checkpoint(path)
        assert loaded.config == tiny.config
        assert same_output(loaded, tiny)


def test_dtype_and_device(tiny, tmp_path):
    tiny.save(tmp_path / "unet.safetensors")
    loaded = UNet.from_checkpoint(tmp_path / "unet.safetensors", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not loaded.training


def test_key_map_is_one_to_one_and_sd15_names_are_the_known_ones():
    names = diffusers_key_map(UNetConfig.sd15())
    assert len(set(names.values())) == len(names) == 686
    assert names["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert names["output_blocks.2.1.conv.bias"] == "up_blocks.0.upsamplers.0.conv.bias"
    assert names["output_blocks.5.2.conv.weight"] == "up_blocks.1.upsamplers.0.conv.weight"
    assert names["middle_block.1.proj_in.weight"] == "mid_block.attentions.0.proj_in.weight"
    assert names["input_blocks.4.0.skip_connection.weight"] == (
        "down_blocks.1.resnets.0.conv_shortcut.weight"
    )
    assert names["output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight"] == (
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"
    )
    assert names["time_embed.2.weight"] == "time_embedding.linear_2.weight"
    assert names["out.2.bias"] == "conv_out.bias"


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        UNet.from_checkpoint(tmp_path / "nope.safetensors")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        UNet.from_checkpoint(path)
    path = tmp_path / "notes.ckpt"
    path.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        UNet.from_checkpoint(path)


def test_no_unet_in_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"no UNet in this file.*model\.diffusion_model\."):
        UNet.from_checkpoint(path)


def test_folder_without_a_unet(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers UNet"):
        UNet.from_checkpoint(tmp_path)


def test_wrong_shape_names_key_and_shapes(tiny, tmp_path):
    state = sd_file_state(tiny)
    key = SD_PREFIX + "input_blocks.1.0.in_layers.2.weight"
    state[key] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as err:
        UNet.from_checkpoint(path)
    message = str(err.value)
    assert "input_blocks.1.0.in_layers.2.weight" in message
    assert "(32, 32, 3, 3)" in message and "(32, 32, 1, 1)" in message


def test_missing_key_is_named(tiny, tmp_path):
    state = sd_file_state(tiny)
    del state[SD_PREFIX + "middle_block.2.out_layers.3.bias"]
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing \(first: 'middle_block\.2\.out_layers"):
        UNet.from_checkpoint(path)


def test_config_that_cannot_be_inferred_names_the_key(tiny):
    state = dict(tiny.state_dict())
    del state["middle_block.1.proj_in.weight"]
    with pytest.raises(CheckpointError, match=r"middle_block\.1\.proj_in\.weight.*config="):
        infer_config(state, "x")


def test_given_config_that_does_not_fit(tiny, tmp_path):
    tiny.save(tmp_path / "unet.safetensors")
    with pytest.raises(
        CheckpointError, match=r"shape mismatch at 'time_embed.0.weight'.*\(256, 64\).*\(128, 32\)"
    ):
        UNet.from_checkpoint(tmp_path / "unet.safetensors", config=UNetConfig(model_channels=64,
                             channel_mult=(1, 2, 2), num_res_blocks=1,
                             attention_resolutions=(1, 2), context_dim=32))  # fmt: skip


class _TouchOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_running_pickle_is_refused(tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    state = sd_file_state(tiny)
    with open(path, "wb") as f:
        pickle.dump({"state_dict": state, "payload": _TouchOnLoad(marker)}, f)
    torch.save({"state_dict": state, "payload": _TouchOnLoad(marker)}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="refused to load"):
            UNet.from_checkpoint(p)
    assert not marker.exists()


def test_truncated_safetensors(tiny, tmp_path):
    path = tmp_path / "unet.safetensors"
    tiny.save(path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        UNet.from_checkpoint(path)


def test_owned_read_takes_only_the_prefixs_bytes(tiny, tmp_path, monkeypatch):
    """The CPU read (``_owned_read``): the header, then only model.diffusion_model. tensors, each
    copied from a mapping of its own bytes, 4-d ones into channels_last."""
    import builtins
    import json
    import mmap

    from safetensors.torch import load_file

    import sd_unet._owned_read as owned

    path = tmp_path / "sd.safetensors"
    save_file(sd_file_state(tiny), path)
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    entries = json.loads(path.read_bytes()[8 : 8 + header_size])
    ends = {  # where each UNet tensor's bytes end in the file: its size
        8 + header_size + info["data_offsets"][1]: info["data_offsets"][1] - info["data_offsets"][0]
        for name, info in entries.items()
        if name.startswith(SD_PREFIX)
    }
    total = {"bytes": 0}
    real_mmap = mmap.mmap

    def counting_mmap(fileno, length, offset=0, **kwargs):
        total["bytes"] += ends[offset + length]  # a mapping that ends where one ends
        return real_mmap(fileno, length, offset=offset, **kwargs)

    monkeypatch.setattr(owned.mmap, "mmap", counting_mmap)

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def read(self, n=-1):
            data = self.f.read(n)
            total["bytes"] += len(data)
            return data

    opener = builtins.open  # the wrapper closes it: its __exit__ is the file's
    monkeypatch.setattr(owned, "open", lambda *a, **k: Counting(opener(*a, **k)), raising=False)
    state = owned.read_owned(path, SD_PREFIX)
    stored = load_file(path)
    assert len(state) == len(ends)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, stored[SD_PREFIX + name], rtol=0, atol=0)
        layout = torch.channels_last if tensor.dim() == 4 else torch.contiguous_format
        assert tensor.is_contiguous(memory_format=layout)
    ours = sum(t.numel() * t.element_size() for t in state.values())
    assert total["bytes"] == 8 + header_size + ours < path.stat().st_size


def test_a_tensor_whose_bytes_do_not_fit_its_shape(tmp_path):
    """A header whose offsets disagree with a tensor's shape (safetensors refuses such a file
    when it opens it; the owned read checks it again itself)."""
    import json

    from sd_unet._owned_read import read_owned

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(2, 2, 1, 1), "b": torch.zeros(2)}, path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["w"]["shape"] = [3, 2, 1, 1]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    assert len(text) == size
    path.write_bytes(data[:8] + text + data[8 + size :])
    with pytest.raises(CheckpointError, match=r"'w' holds 16 bytes, not the 24 of its shape"):
        read_owned(path, "")


def test_tensors_already_read_load_like_the_file(tiny, tmp_path, monkeypatch):
    """`load_state_dict` reads a pickle once; `from_checkpoint` takes what it returns (or any
    mapping) with the same inference, EMA choice and errors, and reads no file for it."""
    import sd_unet._checkpoint as checkpoint
    from sd_unet import load_state_dict

    ema = random_unet(tiny.config, seed=5)
    state = sd_file_state(tiny)
    for k, v in ema.state_dict().items():
        state["model_ema.diffusion_model" + k.replace(".", "")] = v.contiguous()
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, path)
    tensors = load_state_dict(path)
    assert set(tensors) == set(state) and tensors.source == str(path)

    def no_reading(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(checkpoint.torch, "load", no_reading)
    monkeypatch.setattr(checkpoint, "safe_open", no_reading)
    for source in (tensors, dict(state), {"state_dict": state}):
        loaded = UNet.from_checkpoint(source)
        assert loaded.config == tiny.config and same_output(loaded, tiny)
    assert same_output(UNet.from_checkpoint(tensors, ema=True), ema)
    others = checkpoint.StateDict(
        {k: v for k, v in tensors.items() if "diffusion_model" not in k}, source=tensors.source
    )
    with pytest.raises(CheckpointError, match=r"full\.ckpt: no UNet in this file"):
        UNet.from_checkpoint(others)
    with pytest.raises(CheckpointError, match=r"the given state dict: no UNet"):
        UNet.from_checkpoint({"first_stage_model.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"tensor names must be strings"):
        UNet.from_checkpoint({1: torch.zeros(1)})
