"""from_checkpoint through every layout, save, and the errors for files that do not fit."""

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import sd_clip._checkpoint as checkpoint
from sd_clip import CheckpointError, CLIPTextConfig, CLIPTextModel

SD = "cond_stage_model.transformer."
TINY = CLIPTextConfig.tiny()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CLIPTextModel(TINY).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a mix-up would show
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))


def others():
    """Tensors of the other SD components that share a single file with the text encoder."""
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "model_ema.decay": torch.tensor(0.9999),
    }


def single_file(model) -> dict[str, torch.Tensor]:
    return {SD + k: v.clone() for k, v in model.state_dict().items()} | others()


def assert_same(loaded, model, ids):
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_sd_single_safetensors(model, ids, tmp_path):
    path = tmp_path / "v1-5.safetensors"
    save_file(single_file(model), str(path))
    loaded = CLIPTextModel.from_checkpoint(str(path))
    assert loaded.config == TINY  # inferred from shapes: heads = width / 64
    assert_same(loaded, model, ids)


def test_sd_single_safetensors_is_lazy(model, tmp_path, monkeypatch):
    # Only the text encoder's tensors are read from a safetensors file.
    path = tmp_path / "v1-5.safetensors"
    save_file(single_file(model), str(path))
    read = []
    real_open = checkpoint.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def metadata(self):
            return self.f.metadata()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    CLIPTextModel.from_checkpoint(path)
    assert read and all(k.startswith(SD) for k in read)
    assert len(read) == len(model.state_dict()) + 1  # + position_ids, which lies under the prefix


@pytest.mark.parametrize("wrapped", [True, False])
def test_sd_single_ckpt(model, ids, tmp_path, wrapped):
    state = single_file(model)
    path = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": state, "global_step": 470000} if wrapped else state, path)
    assert_same(CLIPTextModel.from_checkpoint(path), model, ids)


def test_keys_without_text_model_level(model, ids, tmp_path):
    # Very old SD files (and transformers 5's own state dicts) have no "text_model." level.
    state = {SD + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    path = tmp_path / "old.safetensors"
    save_file(state | others(), str(path))
    assert_same(CLIPTextModel.from_checkpoint(path), model, ids)


def test_sdxl_first_text_encoder(model, ids, tmp_path):
    state = {"conditioner.embedders.0.transformer." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "sdxl.safetensors"
    save_file(state | others(), str(path))
    assert_same(CLIPTextModel.from_checkpoint(path), model, ids)


@pytest.mark.parametrize("name", ["text_encoder.safetensors", "text_encoder.bin", "te.pt"])
def test_bare_file(model, ids, tmp_path, name):
    path = tmp_path / name
    state = model.state_dict()
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert_same(CLIPTextModel.from_checkpoint(path), model, ids)


def diffusers_config(config: CLIPTextConfig) -> dict:
    # What transformers writes for SD 1.5's text_encoder/config.json (fields that matter here).
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_act": config.activation,
        "hidden_size": config.width,
        "intermediate_size": config.mlp_width,
        "layer_norm_eps": config.layer_norm_eps,
        "max_position_embeddings": config.max_positions,
        "num_attention_heads": config.heads,
        "num_hidden_layers": config.layers,
        "vocab_size": config.vocab_size,
        "torch_dtype": "float32",
    }


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("root", [True, False])
def test_diffusers_folder(model, ids, tmp_path, weights, root):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config(TINY)))
    state = model.state_dict() | {"text_model.embeddings.position_ids": torch.arange(77)[None]}
    if weights.endswith(".safetensors"):
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    (tmp_path / "unet").mkdir()  # a model root holds other components too
    assert_same(CLIPTextModel.from_checkpoint(tmp_path if root else folder), model, ids)


def test_diffusers_config_sets_what_shapes_cannot(model, tmp_path):
    # heads and activation come from config.json, not from the 64-wide-head rule.
    config = dataclasses.replace(TINY, heads=4, activation="gelu")
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config(config)))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    assert CLIPTextModel.from_checkpoint(tmp_path).config == config


def test_dtype_and_device(model, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in single_file(model).items()}, str(path))
    assert CLIPTextModel.from_checkpoint(path).dtype == torch.float32  # default: float32
    half = CLIPTextModel.from_checkpoint(path, dtype=torch.bfloat16, device="cpu")
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@pytest.mark.parametrize("position_embedding", ["learned", "rotary"])
def test_save_round_trip(tmp_path, ids, position_embedding):
    # save stores the config too, so even settings the shapes cannot tell come back.
    config = CLIPTextConfig(
        width=96, layers=3, heads=3, mlp_width=200, activation="gelu",
        position_embedding=position_embedding, max_positions=40,
    )  # fmt: skip
    torch.manual_seed(2)
    original = CLIPTextModel(config).eval()
    original.save(tmp_path / "te.safetensors")
    loaded = CLIPTextModel.from_checkpoint(tmp_path / "te.safetensors")
    assert loaded.config == config
    assert_same(loaded, original, ids[:, :40])


def test_config_override(model, ids, tmp_path):
    # Shapes say quick_gelu; the caller knows better.
    path = tmp_path / "te.safetensors"
    save_file(model.state_dict(), str(path))
    gelu = dataclasses.replace(TINY, activation="gelu")
    loaded = CLIPTextModel.from_checkpoint(path, config=gelu)
    assert loaded.config == gelu
    with torch.no_grad():
        assert not torch.allclose(loaded(ids), model(ids))


def test_rule_for_wide_openclip_encoders(tmp_path):
    # 1024 wide: OpenCLIP ViT-H (SD 2.x) shapes infer 16 heads and exact GELU.
    config = CLIPTextConfig(vocab_size=64, width=1024, layers=1, heads=16, mlp_width=8)
    with torch.device("meta"):
        shapes = CLIPTextModel(config).state_dict()
    path = tmp_path / "h.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, str(path))
    loaded = CLIPTextModel.from_checkpoint(path)
    assert (loaded.config.heads, loaded.config.activation) == (16, "gelu")


# -- errors ------------------------------------------------------------------------------------


def test_missing_key(model, tmp_path):
    state = single_file(model)
    del state[SD + "text_model.encoder.layers.1.mlp.fc2.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError, match=r"1 missing \(first: 'text_model.encoder.layers.1.mlp"
    ):
        CLIPTextModel.from_checkpoint(path)


def test_unexpected_key(model, tmp_path):
    state = model.state_dict() | {"text_model.encoder.layers.0.extra.weight": torch.zeros(2)}
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected .*layers.0.extra.weight"):
        CLIPTextModel.from_checkpoint(path)


def test_wrong_shape(model, tmp_path):
    path = tmp_path / "te.safetensors"
    save_file(model.state_dict(), str(path))
    narrow = dataclasses.replace(TINY, mlp_width=256)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch at .*fc1.weight.*\(256, 128\).*\(512, 128\)"
    ):
        CLIPTextModel.from_checkpoint(path, config=narrow)


def test_width_without_head_rule(tmp_path):
    with torch.device("meta"):
        shapes = CLIPTextModel(
            CLIPTextConfig(vocab_size=10, width=48, heads=3, layers=1)
        ).state_dict()
    path = tmp_path / "odd.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"width 48 is not a multiple of 64.*config="):
        CLIPTextModel.from_checkpoint(path)


def test_no_text_encoder_in_file(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"no CLIP text encoder found.*first_stage_model"):
        CLIPTextModel.from_checkpoint(path)


@pytest.mark.parametrize("name", ["notes.ckpt", "notes.safetensors", "notes.txt"])
def test_not_a_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_text("a cat sitting on a mat\n" * 20)
    with pytest.raises(CheckpointError, match=r"not a readable"):
        CLIPTextModel.from_checkpoint(path)


def test_folder_without_text_encoder(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no text encoder.*text_encoder/"):
        CLIPTextModel.from_checkpoint(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint"):
        CLIPTextModel.from_checkpoint(tmp_path / "absent.safetensors")


def test_save_needs_safetensors_name(model, tmp_path):
    with pytest.raises(CheckpointError, match=r"use a '.safetensors' file name"):
        model.save(tmp_path / "te.ckpt")


class Payload:
    """Unpickling this creates a file: stands for any code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_code_running_pickle_is_refused(model, tmp_path):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(Payload(live)))  # the payload is real: a plain unpickle runs it
    assert live.exists()

    marker = tmp_path / "marker"
    state = single_file(model) | {"evil": Payload(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"refused to load.*run code"):
        CLIPTextModel.from_checkpoint(path)
    assert not marker.exists()


def test_tensors_already_read_load_like_the_file(model, ids, tmp_path, monkeypatch):
    """`load_state_dict` reads a pickle once; `from_checkpoint` takes what it returns (or any
    mapping) with the same inference, metadata config and errors, and reads no file for it."""
    from sd_clip import load_state_dict

    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": single_file(model), "global_step": 10}, path)
    tensors = load_state_dict(path)
    assert set(tensors) == set(single_file(model)) and tensors.source == str(path)
    saved = tmp_path / "te.safetensors"
    model.save(saved)
    with_config = load_state_dict(saved)
    assert json.loads(with_config.metadata["sd_clip.config"])["heads"] == TINY.heads

    def no_reading(*args, **kwargs):
        raise AssertionError("a file was read")

    monkeypatch.setattr(checkpoint.torch, "load", no_reading)
    monkeypatch.setattr(checkpoint, "safe_open", no_reading)
    for source in (tensors, with_config, dict(single_file(model))):
        loaded = CLIPTextModel.from_checkpoint(source)
        assert loaded.config == TINY
        assert_same(loaded, model, ids)
    others = checkpoint.StateDict({"first_stage_model.x": torch.zeros(1)}, source=str(path))
    with pytest.raises(CheckpointError, match=r"sd\.ckpt: no CLIP text encoder found"):
        CLIPTextModel.from_checkpoint(others)
    with pytest.raises(CheckpointError, match=r"the given state dict: no CLIP text encoder"):
        CLIPTextModel.from_checkpoint({"first_stage_model.x": torch.zeros(1)})
