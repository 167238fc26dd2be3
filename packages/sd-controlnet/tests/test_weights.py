"""Loading: published files, difference files, bad files; config inference."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from conftest import inputs
from safetensors.torch import save_file

from sd_controlnet import CheckpointError, ControlNet, ControlNetConfig
from sd_controlnet.weights import infer_config


def _save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _same_weights(a: ControlNet, b: ControlNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


@pytest.mark.parametrize("preset", ["sd15", "sd2", "sdxl", "tiny"])
def test_config_inferred_from_shapes(preset):
    config = getattr(ControlNetConfig, preset)()
    with torch.device("meta"):
        state = ControlNet(config).state_dict()
    assert infer_config(state) == config


def test_bare_keys_and_state_dict_pickles(tmp_path, tiny):
    _save(tiny.state_dict(), tmp_path / "bare.safetensors")
    torch.save({"state_dict": {"control_model." + k: v for k, v in tiny.state_dict().items()}},
               tmp_path / "wrapped.pth")  # fmt: skip
    for name in ("bare.safetensors", "wrapped.pth"):
        assert _same_weights(ControlNet.from_checkpoint(tmp_path / name), tiny)


def test_difference_file_needs_and_uses_the_base_unet(tmp_path, tiny):
    """diff_control_*: each weight the UNet has too is stored minus the UNet's."""
    g = torch.Generator().manual_seed(9)
    shared = [k for k in tiny.state_dict() if k.startswith(("input_blocks", "middle_block.",
                                                            "time_embed"))]  # fmt: skip
    base = {k: torch.randn(tiny.state_dict()[k].shape, generator=g) for k in shared}
    base["out.2.weight"] = torch.randn(4, 32, 3, 3)  # the UNet's decoder: not the ControlNet's
    diff = {k: v - base[k] if k in base else v for k, v in tiny.state_dict().items()}
    state = {"control_model." + k: v for k, v in diff.items()} | {"difference": torch.tensor([])}
    path = _save(state, tmp_path / "diff_control_tiny.safetensors")
    with pytest.raises(CheckpointError, match="pass base_unet="):
        ControlNet.from_checkpoint(path)
    assert _same_weights(ControlNet.from_checkpoint(path, base_unet=base), tiny)
    sd = _save(
        {"model.diffusion_model." + k: v for k, v in base.items()}, tmp_path / "sd.safetensors"
    )
    assert _same_weights(ControlNet.from_checkpoint(path, base_unet=sd), tiny)
    other = {k: torch.zeros(3) for k in base}
    with pytest.raises(CheckpointError, match="another base model"):
        ControlNet.from_checkpoint(path, base_unet=other)
    whole = _save(tiny.state_dict(), tmp_path / "whole.safetensors")
    with pytest.raises(CheckpointError, match="not a diff_control"):
        ControlNet.from_checkpoint(whole, base_unet=base)


def test_files_that_are_not_controlnets(tmp_path, tiny):
    unet_only = _save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)},
                      tmp_path / "sd.safetensors")  # fmt: skip
    with pytest.raises(CheckpointError, match="no ControlNet in this file"):
        ControlNet.from_checkpoint(unet_only)
    adapter = _save({"adapter.body.0.block1.weight": torch.zeros(3)}, tmp_path / "t2i.safetensors")
    with pytest.raises(CheckpointError, match="T2I-Adapter"):
        ControlNet.from_checkpoint(adapter)
    with pytest.raises(FileNotFoundError, match="no such ControlNet"):
        ControlNet.from_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers ControlNet"):
        ControlNet.from_checkpoint(tmp_path / "empty")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"control_model.input_hint_block.0.weight": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        ControlNet.from_checkpoint(path)


def test_wrong_config_names_the_key(tmp_path, tiny):
    path = _save(tiny.state_dict(), tmp_path / "c.safetensors")
    wider = dataclasses.replace(ControlNetConfig.tiny(), model_channels=64)
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'time_embed.0.weight'"):
        ControlNet.from_checkpoint(path, config=wider)


def test_bad_inputs_are_clear_errors(tiny):
    x, t, context, hint = inputs(tiny.config)
    with pytest.raises(
        ValueError, match=r"control image is 32x32 pixels; latents of 8x8 need 64x64"
    ):
        tiny(x, t, context, hint[..., :32, :32])
    with pytest.raises(ValueError, match="another base model"):
        tiny(x, t, torch.zeros(2, 5, 768), hint)
    with pytest.raises(ValueError, match="needs no y"):
        tiny(x, t, context, hint, y=torch.zeros(2, 8))


def test_one_hint_for_the_batch_and_shared_latents(tiny):
    """A (1, 3, H, W) hint serves every row; context of 2B rows gives residuals of 2B rows,
    equal to the latents given twice."""
    x, t, context, hint = inputs(tiny.config)
    c2 = torch.cat([context, context.flip(0)])
    with torch.no_grad():
        down, mid = tiny(x, t, c2, hint[:1])
        want_down, want_mid = tiny(torch.cat([x, x]), torch.cat([t, t]), c2,
                                   torch.cat([hint[:1]] * 4))  # fmt: skip
    assert len(down) == len(tiny.config.skip_channels()) and down[0].shape[0] == 4
    for a, b in zip([*down, mid], [*want_down, want_mid]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert [d.shape[1] for d in down] == tiny.config.skip_channels()


def test_shuffle_yaml_beside_the_file_sets_global_pooling(tmp_path, tiny):
    path = _save(tiny.state_dict(), tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert not ControlNet.from_checkpoint(path).config.global_average_pooling
    (tmp_path / "control_v11e_sd15_shuffle.yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n"
        "        global_average_pooling: True\n"
    )
    assert ControlNet.from_checkpoint(path).config.global_average_pooling


def test_half_precision_difference_file_loads_in_its_precision(tmp_path, tiny):
    base = {k: torch.randn(v.shape) for k, v in tiny.state_dict().items() if k.startswith("input")}
    state = {"control_model." + k: (v - base[k] if k in base else v).half()
             for k, v in tiny.state_dict().items()} | {"difference": torch.tensor([])}  # fmt: skip
    loaded = ControlNet.from_checkpoint(_save(state, tmp_path / "d.safetensors"), base_unet=base)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    want = tiny.state_dict()["input_blocks.1.0.in_layers.2.weight"]
    got = loaded.state_dict()["input_blocks.1.0.in_layers.2.weight"].float()
    assert torch.allclose(got, want, atol=1e-2)
