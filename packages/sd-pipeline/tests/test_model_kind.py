"""Model-kind inference from a single file: SD 1.x, SD 1.x inpainting, SD 2.x 512 (epsilon),
SD 2.x 768-v, SD 2.x inpainting; the prediction override and what the files record; SD 2.x
depth and unCLIP refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import write_checkpoint
from test_parity import diffusers_unet
from test_sd2_parity import sd2_configs, sd2_state, write_sd2

from sd_pipeline import CheckpointError, StableDiffusion, model_kind

pytest.importorskip("diffusers")

OUT = "model.diffusion_model.out.2."  # the UNet's last convolution


def _constant_output(value: float, in_channels: int = 4) -> dict:
    """UNet tensors that make every prediction ``value``: A1111's test then reads
    mean(out - 0.5) = value - 0.5 (v below -1)."""
    weight = sd2_state(in_channels)[OUT + "weight"]
    return {OUT + "weight": torch.zeros_like(weight), OUT + "bias": torch.full((4,), value)}


def _load(path, **options) -> StableDiffusion:
    return StableDiffusion.from_checkpoint(path, device="cpu", **options)


@pytest.fixture()
def no_probe(monkeypatch):
    """Fail the test if the UNet is run to decide the prediction."""

    def refuse(unet):
        raise AssertionError("the UNet was probed although the prediction was decided")

    monkeypatch.setattr(model_kind, "v_prediction_score", refuse)


@pytest.mark.parametrize("in_channels", [4, 9])
def test_sd1_and_sd1_inpainting_are_epsilon_512(tmp_path, no_probe, in_channels):
    pipe = _load(write_checkpoint(tmp_path / "sd1.safetensors", in_channels=in_channels))
    assert (pipe.prediction, pipe.native_size) == ("epsilon", 512)
    assert pipe.is_inpainting_model == (in_channels == 9)
    assert pipe.tokenizer.pad_id == pipe.tokenizer.end_id  # CLIP's own padding


@pytest.mark.parametrize("value,prediction,size", [(0.5, "epsilon", 512), (-1.0, "v", 768)])
def test_sd2_prediction_by_automatic1111s_test(tmp_path, value, prediction, size):
    path = write_sd2(tmp_path / "sd2.safetensors", **_constant_output(value))
    pipe = _load(path)
    assert (pipe.prediction, pipe.native_size) == (prediction, size)
    assert pipe.tokenizer.pad_id == 0  # OpenCLIP's "!"


def test_probe_score_equals_the_same_test_on_diffusers_unet(tmp_path):
    """On random weights our score (one UNet call) equals A1111's formula run on diffusers'
    UNet converted from the same file: same input, timestep, context and reduction."""
    state = sd2_state(seed=3)
    path = tmp_path / "sd2.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    pipe = _load(path, prediction="epsilon")
    reference = diffusers_unet(state, sd2_configs()[2])
    x = torch.full((1, 4, 8, 8), 0.5)
    with torch.no_grad():
        out = reference(x, torch.tensor([999]), torch.full((1, 2, 128), 0.5)).sample
    expected = (out - x).mean().item()
    assert model_kind.v_prediction_score(pipe.unet) == pytest.approx(expected, abs=1e-5)


def test_prediction_given_or_recorded_wins(tmp_path, no_probe):
    v_file = write_sd2(tmp_path / "v.safetensors", **_constant_output(-1.0))
    pipe = _load(v_file, prediction="epsilon")
    assert (pipe.prediction, pipe.native_size) == ("epsilon", 512)
    pipe = _load(v_file, prediction="v", native_size=640)
    assert (pipe.prediction, pipe.native_size) == ("v", 640)
    marked = write_sd2(tmp_path / "marked.safetensors", v_pred=torch.tensor([]),
                       **_constant_output(0.5))  # fmt: skip
    assert _load(marked).prediction == "v"  # ComfyUI's / kohya's v_pred marker
    saved = pipe.save(tmp_path / "saved.safetensors")  # sd-pipeline's metadata records it
    again = _load(saved)
    assert (again.prediction, again.native_size) == ("v", 640)
    with pytest.raises(ValueError, match="prediction must be 'epsilon' or 'v'"):
        _load(v_file, prediction="sample")


def test_sd2_inpainting_is_epsilon_512(tmp_path, no_probe):
    pipe = _load(write_sd2(tmp_path / "sd2-inpainting.safetensors", in_channels=9))
    assert (pipe.prediction, pipe.native_size) == ("epsilon", 512)
    assert pipe.is_inpainting_model and pipe.tokenizer.pad_id == 0


def test_depth_and_unclip_are_refused_by_name(tmp_path):
    depth = write_sd2(tmp_path / "depth.safetensors", in_channels=5)
    with pytest.raises(CheckpointError, match=r"SD 2\.x depth-to-image model .*not supported"):
        _load(depth)
    unclip = write_sd2(tmp_path / "unclip.safetensors", **{
        "embedder.model.visual.conv1.weight": torch.zeros(8, 3, 14, 14),
        "noise_augmentor.betas": torch.zeros(1000),
    })  # fmt: skip
    with pytest.raises(CheckpointError, match=r"SD 2\.x unCLIP model .*not supported"):
        _load(unclip)


def test_infer_model_kind_labels(tmp_path):
    pipe = _load(write_sd2(tmp_path / "sd2.safetensors"), prediction="v")
    kind = model_kind.infer_model_kind(pipe.unet)
    assert (kind.family, kind.inpainting, kind.prediction) == ("sd2", False, None)
    decided = model_kind.ModelKind("sd2", False, "v")
    assert decided.native_size == 768 and decided.label == "SD 2.x (v)"
