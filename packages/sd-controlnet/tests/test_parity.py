"""Parity with diffusers' ControlNetModel on the same random weights.

The diffusers model gets the weights through diffusers' own single-file converter
(``convert_controlnet_checkpoint``), so nothing of ours converts what we are compared against;
the diffusers folder that our loader reads is written by diffusers' ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import inputs, random_controlnet
from safetensors.torch import save_file

from sd_controlnet import ControlNet, ControlNetConfig
from sd_controlnet.controlnet import timestep_embedding

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

# Max abs difference / max abs value, float32; measured up to 1e-6 (summation order).
REL_TOL = 1e-5
# Shapes do not tell the heads: inference assumes SD 2.x's and SDXL's 64-wide ones, hence 64
# model channels here.
SD2_TINY = dataclasses.replace(
    ControlNetConfig.tiny(), model_channels=64, num_heads=-1, num_head_channels=64, context_dim=48,
    use_linear_in_transformer=True,
)  # fmt: skip
# SDXL's shape in small: no attention on the first level, two blocks deep below, a deeper
# middle, linear projections, and the pooled-text-and-size embedding (label_emb).
POOLED, TIME_DIM = 16, 8
SDXL_TINY = dataclasses.replace(
    ControlNetConfig.tiny(), model_channels=64, num_heads=-1, num_head_channels=64,
    attention_resolutions=(2, 4),
    transformer_depth=(0, 2, 3), transformer_depth_middle=3, use_linear_in_transformer=True,
    adm_in_channels=POOLED + 6 * TIME_DIM,
)  # fmt: skip


def diffusers_controlnet(config: ControlNetConfig, state: dict):
    c = config
    channels = [c.model_channels * m for m in c.channel_mult]
    attn = [2**level in c.attention_resolutions for level in range(len(channels))]
    kwargs = dict(
        in_channels=c.in_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        block_out_channels=channels,
        layers_per_block=c.num_res_blocks,
        cross_attention_dim=c.context_dim,
        attention_head_dim=[c.heads(ch)[0] for ch in channels],
        use_linear_projection=c.use_linear_in_transformer,
        transformer_layers_per_block=[max(d, 1) for d in c.transformer_depth[:-1]]
        + [c.transformer_depth_middle],
        norm_num_groups=c.norm_groups,
    )
    if c.adm_in_channels is not None:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                      projection_class_embeddings_input_dim=c.adm_in_channels)  # fmt: skip
    model = diffusers.ControlNetModel(**kwargs)
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": c.num_res_blocks})
    if c.adm_in_channels is not None:  # the converter leaves SDXL's embedding to its caller
        for ours, theirs in (("0.0", "linear_1"), ("0.2", "linear_2")):
            for kind in ("weight", "bias"):
                converted[f"add_embedding.{theirs}.{kind}"] = state[
                    f"control_model.label_emb.{ours}.{kind}"
                ]
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _compare(ours: ControlNet, theirs, config: ControlNetConfig, batch=2, size=8, guide=1):
    x, t, context, hint = inputs(config, batch=batch, size=size)
    context = torch.cat([context] * guide)
    kwargs, y = {}, None
    if config.adm_in_channels is not None:
        g = torch.Generator().manual_seed(5)
        pooled = torch.randn(batch * guide, POOLED, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * (batch * guide))
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        size_emb = timestep_embedding(time_ids.flatten(), TIME_DIM).reshape(batch * guide, -1)
        y = torch.cat([pooled, size_emb], dim=1)
    with torch.no_grad():
        down, mid = ours(x, t, context, hint, y=y)
        rows = [torch.cat([v] * guide) for v in (x, t, hint)]
        their_down, their_mid = theirs(*rows[:2], context, rows[2], return_dict=False, **kwargs)
    assert len(down) == len(their_down)
    errors = [_rel(a, b) for a, b in zip([*down, mid], [*their_down, their_mid])]
    print(f"largest relative difference of the {len(errors)} residuals: {max(errors):.2e}")
    assert max(errors) < REL_TOL, errors
    return max(errors)


@pytest.mark.parametrize("config", [ControlNetConfig.tiny(), SD2_TINY, SDXL_TINY],
                         ids=["sd1", "sd2", "sdxl"])  # fmt: skip
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_single_file_matches_diffusers(tmp_path, config, suffix):
    """A published-layout file (control_model.* keys) loads with its config inferred from the
    shapes, and gives diffusers' residuals."""
    model = random_controlnet(config)
    state = {"control_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"control{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = ControlNet.from_checkpoint(path)
    assert loaded.config == config
    _compare(loaded, diffusers_controlnet(config, state), config)


def test_diffusers_folder_matches_diffusers(tmp_path):
    config = ControlNetConfig.tiny()
    model = random_controlnet(config, seed=3)
    state = {"control_model." + k: v for k, v in model.state_dict().items()}
    theirs = diffusers_controlnet(config, state)
    theirs.save_pretrained(tmp_path / "controlnet")
    loaded = ControlNet.from_checkpoint(tmp_path)  # the model root: its controlnet/ subfolder
    _compare(loaded, theirs, config)


def test_shared_latents_match_diffusers_on_repeated_rows(tiny):
    """Context of 2B rows and latents of B (classifier-free guidance): as diffusers given the
    latents and control image twice."""
    config = ControlNetConfig.tiny()
    state = {"control_model." + k: v for k, v in tiny.state_dict().items()}
    _compare(tiny, diffusers_controlnet(config, state), config, guide=2)


def test_save_round_trips(tmp_path, tiny):
    tiny.save(tmp_path / "c.safetensors")
    tiny.save_diffusers(tmp_path / "folder")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder").eval()
    for loaded in (ControlNet.from_checkpoint(tmp_path / "c.safetensors"),
                   ControlNet.from_checkpoint(tmp_path / "folder")):  # fmt: skip
        assert loaded.config == tiny.config
        _compare(loaded, theirs, tiny.config)


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers():
    """SD 1.5's ControlNet at full size (361M parameters), 64x64 latents."""
    config = ControlNetConfig.sd15()
    model = random_controlnet(config)
    state = {"control_model." + k: v for k, v in model.state_dict().items()}
    theirs = diffusers_controlnet(config, state)
    torch.set_num_threads(2)
    _compare(model, theirs, config, batch=1, size=64)


@pytest.mark.parametrize("config", [ControlNetConfig.tiny(), SDXL_TINY], ids=["sd1", "sdxl"])
def test_diffusers_single_file_matches_diffusers(tmp_path, config):
    """A lone diffusers-named .safetensors (as SDXL ControlNets are often published): its
    config inferred from diffusers' names."""
    model = random_controlnet(config, seed=4)
    state = {"control_model." + k: v for k, v in model.state_dict().items()}
    theirs = diffusers_controlnet(config, state)
    theirs.save_pretrained(tmp_path / "folder")
    single = tmp_path / "diffusers_xl_canny.safetensors"
    (tmp_path / "folder" / "diffusion_pytorch_model.safetensors").rename(single)
    loaded = ControlNet.from_checkpoint(single)
    assert loaded.config == config
    _compare(loaded, theirs, config)


def test_winograd_convolutions_match_diffusers(monkeypatch, tiny):
    """The 3x3 convolutions through Winograd's algorithm (used from 2048 output pixels, so not
    at the tiny sizes above): still diffusers' residuals."""
    from sd_controlnet.controlnet import Conv3x3

    monkeypatch.setattr(Conv3x3, "winograd_min_pixels", 1)
    state = {"control_model." + k: v for k, v in tiny.state_dict().items()}
    _compare(tiny, diffusers_controlnet(tiny.config, state), tiny.config, guide=2)


def test_bgr_diffusers_folder_takes_rgb_hints(tmp_path, tiny):
    config = tiny.config
    state = {"control_model." + k: v for k, v in tiny.state_dict().items()}
    theirs = diffusers_controlnet(config, state)
    theirs.register_to_config(controlnet_conditioning_channel_order="bgr")
    theirs.save_pretrained(tmp_path / "controlnet")
    loaded = ControlNet.from_checkpoint(tmp_path / "controlnet")
    x, t, context, hint = inputs(config)
    with torch.no_grad():
        _, mid = loaded(x, t, context, hint)
        _, their_mid = theirs(x, t, context, hint, return_dict=False)  # flips it to BGR itself
    assert _rel(mid, their_mid) < REL_TOL
