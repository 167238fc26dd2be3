"""Parity with diffusers' UNet2DConditionModel on the same weights, through both layouts."""

import pytest
import torch
from conftest import inputs, random_unet

from sd_unet import UNet, UNetConfig
from sd_unet.weights import SD_PREFIX, diffusers_key_map

diffusers = pytest.importorskip("diffusers")

# The diffusers configs are written out by hand, so that they check our config conversion.
TINY_SD1 = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
TINY_SD2 = dict(  # 64-wide heads, linear projections, 1024-wide context
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=(1, 2, 2),
    use_linear_projection=True,
)
TINY_INPAINT = dict(TINY_SD1, in_channels=9)
CASES = {"sd1": TINY_SD1, "sd2": TINY_SD2, "inpaint": TINY_INPAINT}
OURS = {
    "sd1": UNetConfig.tiny(),
    "sd2": UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_heads=-1,
        num_head_channels=64,
        context_dim=1024,
        use_linear_in_transformer=True,
    ),
    "inpaint": UNetConfig(
        in_channels=9,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        context_dim=32,
    ),
}


def random_diffusers(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def compare(ours: UNet, theirs, size: int = 16) -> float:
    x, t, c = inputs(ours.config, size=size)
    with torch.no_grad():
        return relative_error(ours(x, t, c), theirs(x, t, c).sample)


@pytest.mark.parametrize("case", CASES)
def test_diffusers_folder_loads_and_matches(case, tmp_path):
    theirs = random_diffusers(CASES[case])
    theirs.save_pretrained(tmp_path / "model" / "unet")
    ours = UNet.from_checkpoint(tmp_path / "model")
    assert ours.config == OURS[case]
    assert compare(ours, theirs) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_our_weights_load_in_diffusers(case, tmp_path):
    ours = random_unet(OURS[case])
    ours.save_diffusers(tmp_path / "unet")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert compare(ours, theirs) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_sd_single_file_matches_diffusers(case, tmp_path):
    from safetensors.torch import save_file

    theirs = random_diffusers(CASES[case], seed=3)
    to_ours = {v: k for k, v in diffusers_key_map(OURS[case]).items()}
    state = {SD_PREFIX + to_ours[k]: v.contiguous() for k, v in theirs.state_dict().items()}
    save_file(state, tmp_path / "sd.safetensors")
    ours = UNet.from_checkpoint(tmp_path / "sd.safetensors", config=OURS[case])
    assert compare(ours, theirs) < 1e-4
    if case != "sd2":  # SD 1.x-style and SD 2.x-style heads are inferred from the shapes
        assert UNet.from_checkpoint(tmp_path / "sd.safetensors").config == OURS[case]


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["diffusers_to_ours", "ours_to_diffusers"])
def test_full_sd15_size_matches_diffusers(direction):
    config = UNetConfig.sd15()
    names = diffusers_key_map(config)
    theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()
    if direction == "diffusers_to_ours":
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(0, 0.02)
        to_ours = {v: k for k, v in names.items()}
        ours = UNet(config).eval()
        ours.load_state_dict({to_ours[k]: v for k, v in theirs.state_dict().items()})
    else:
        ours = random_unet(config)
        for p in ours.parameters():
            p.data.mul_(0.4)  # std 0.02, like the other direction
        theirs.load_state_dict({names[k]: v for k, v in ours.state_dict().items()})
    ours.to(memory_format=torch.channels_last)  # as from_checkpoint leaves it on the CPU
    x, t, c = inputs(config, batch=2, size=32, tokens=77)
    with torch.no_grad():
        ref = theirs(x, t, c).sample
        del theirs
        out = ours(x, t, c)
    err = relative_error(out, ref)
    print(f"full-size {direction}: max abs {(out - ref).abs().max():.3g}, relative {err:.3g}")
    assert err < 1e-4
