"""ControlNet units with our UNet against diffusers' ControlNetModel + UNet2DConditionModel
(the same weights, converted by diffusers' own single-file converters), and the units' options.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PREFIXES, checkpoint_state, tiny_configs
from PIL import Image, ImageDraw

from sd_controlnet import ControlNet, ControlNetConfig
from sd_pipeline.controlnet import ControlledUNet, ControlUnit, prepare_controls
from sd_unet import UNet

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402
from test_parity import _diffusers_parts  # noqa: E402

SIZE = 64  # pixels; latents 8x8 (at 4x4 the deepest GroupNorms see 2 values: rounding grows)
REL_TOL = 1e-5  # float32; measured 1.0e-6 to 1.5e-6


def _controlnet_config() -> ControlNetConfig:
    unet = tiny_configs()[2]
    return dataclasses.replace(ControlNetConfig.tiny(), context_dim=unet.context_dim,
                               num_heads=unet.num_heads)  # fmt: skip


def random_controlnet(seed: int) -> ControlNet:
    """Every weight random, the zero convolutions included (or every residual would be 0)."""
    g = torch.Generator().manual_seed(seed)
    model = ControlNet(_controlnet_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.02
            p.copy_(torch.randn(p.shape, generator=g) * scale + (p.ndim == 1 and "norm" in name
                                                                  and "weight" in name))  # fmt: skip
    return model


def diffusers_controlnet(model: ControlNet):
    c = model.config
    levels = range(len(c.channel_mult))
    theirs = diffusers.ControlNetModel(
        down_block_types=["CrossAttnDownBlock2D" if 2**i in c.attention_resolutions
                          else "DownBlock2D" for i in levels],
        block_out_channels=[c.model_channels * m for m in c.channel_mult],
        layers_per_block=c.num_res_blocks,
        cross_attention_dim=c.context_dim,
        attention_head_dim=c.num_heads,
        norm_num_groups=c.norm_groups,
    )  # fmt: skip
    state = {"control_model." + k: v for k, v in model.state_dict().items()}
    theirs.load_state_dict(convert_controlnet_checkpoint(state, {"layers_per_block":
                                                                 c.num_res_blocks}))  # fmt: skip
    return theirs.eval()


@pytest.fixture(scope="module")
def models():
    state = checkpoint_state()
    prefix = PREFIXES["unet"]
    unet = UNet(tiny_configs()[2]).eval()
    unet.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    their_unet = _diffusers_parts(state, 4)[2]
    controlnets = [random_controlnet(1), random_controlnet(2)]
    return unet, their_unet, controlnets, [diffusers_controlnet(c) for c in controlnets]


def control_image(seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (20, 40, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((12 + seed, 16, 40, 52 - seed), fill=(230, 200, 10))
    draw.ellipse((28, 4, 60, 36 + seed), fill=(5, 250, 120))
    return image


def _call(seed: int = 3, guided: bool = True):
    g = torch.Generator().manual_seed(seed)
    context_dim = tiny_configs()[2].context_dim
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    context = torch.randn(2 if guided else 1, 7, context_dim, generator=g)
    return x, torch.tensor([421.0]), context


def _hint(image: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype="float32") / 255).permute(2, 0, 1)[None]


def _rel(a, b):
    assert b.std() > 1e-3
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"relative difference {rel:.2e}")
    return rel


def _theirs(their_unet, their_cns, weights, images, x, t, context, guess=()):
    """diffusers: each ControlNet on both rows (or, guess mode, the conditional row with its
    extension soft weights and zeros for the unconditional one), summed, into the UNet."""
    x2, t2 = torch.cat([x] * context.shape[0]), torch.cat([t] * context.shape[0])
    total = None
    for i, (cn, w, image) in enumerate(zip(their_cns, weights, images)):
        hint = torch.cat([_hint(image)] * context.shape[0])
        if i in guess:
            down, mid = cn(x, t, context[1:], hint[:1], return_dict=False)
            res = [r * w * 0.825 ** (12 - j) for j, r in enumerate([*down, mid])]
            res = [torch.cat([torch.zeros_like(r), r]) for r in res]
        else:
            down, mid = cn(x2, t2, context, hint, conditioning_scale=w, return_dict=False)
            res = [*down, mid]
        total = res if total is None else [a + b for a, b in zip(total, res)]
    return their_unet(x2, t2, context, down_block_additional_residuals=total[:-1],
                      mid_block_additional_residual=total[-1]).sample  # fmt: skip


def test_one_controlnet_matches_diffusers(models):
    unet, their_unet, cns, their_cns = models
    x, t, context = _call()
    image = control_image()
    controls = prepare_controls([ControlUnit(cns[0], image, weight=0.8)], SIZE, SIZE, unet=unet)
    with torch.no_grad():
        ours = ControlledUNet(unet, controls, steps=10)(x, t, context)
        theirs = _theirs(their_unet, their_cns[:1], [0.8], [image], x, t, context)
        plain = unet(x, t, context)
    assert _rel(ours, theirs) < REL_TOL
    assert _rel(plain, theirs) > 1e-2  # the control changed the prediction


def test_two_controlnets_sum_and_guess_mode_matches_diffusers(models):
    unet, their_unet, cns, their_cns = models
    x, t, context = _call(4)
    images = [control_image(0), control_image(3)]
    units = [ControlUnit(cns[0], images[0], weight=1.2),
             ControlUnit(cns[1], images[1], weight=0.6, mode="ControlNet is more important")]  # fmt: skip
    with torch.no_grad():
        ours = ControlledUNet(unet, prepare_controls(units, SIZE, SIZE), steps=10)(x, t, context)
        theirs = _theirs(their_unet, their_cns, [1.2, 0.6], images, x, t, context, guess={1})
    assert _rel(ours, theirs) < REL_TOL


def test_without_guidance_all_rows_are_conditional(models):
    unet, their_unet, cns, their_cns = models
    x, t, context = _call(5, guided=False)
    image = control_image(1)
    units = [ControlUnit(cns[1], image, mode="control")]
    with torch.no_grad():
        ours = ControlledUNet(unet, prepare_controls(units, SIZE, SIZE), steps=4)(x, t, context)
        down, mid = their_cns[1](x, t, context, _hint(image), return_dict=False)
        res = [r * 0.825 ** (12 - j) for j, r in enumerate([*down, mid])]
        theirs = their_unet(x, t, context, down_block_additional_residuals=res[:-1],
                            mid_block_additional_residual=res[-1]).sample  # fmt: skip
    assert _rel(ours, theirs) < REL_TOL


def test_start_end_window(models):
    """At step i of 10 the unit acts while 0.2 <= i / 10 <= 0.5; the callback advances i."""
    unet, _, cns, _ = models
    x, t, context = _call(6)
    unit = ControlUnit(cns[0], control_image(), start=0.2, end=0.5)
    controlled = ControlledUNet(unet, prepare_controls([unit], SIZE, SIZE), steps=10)
    with torch.no_grad():
        plain = unet(x, t, context)
        acted = []
        for i in range(10):
            acted.append(not torch.equal(controlled(x, t, context), plain))
            controlled.callback({"i": i})
    assert acted == [False, False, True, True, True, True, False, False, False, False]


def test_control_image_of_another_size_is_resized(models):
    cns = models[2]
    wide = Image.new("RGB", (100, 50), "white")
    for mode in ("just_resize", "Crop and Resize", "resize_and_fill"):
        (control,) = prepare_controls([ControlUnit(cns[0], wide, resize_mode=mode)], 48, 32)
        assert control.hint.shape == (1, 3, 32, 48)
    with pytest.raises(
        ValueError, match="the control image tensor is 16x16; the image to generate is 64x64"
    ):
        prepare_controls([ControlUnit(cns[0], torch.zeros(3, 16, 16))], SIZE, SIZE)


def test_controlnet_for_another_base_model_is_a_clear_error(models):
    unet = models[0]
    other = ControlNet(dataclasses.replace(_controlnet_config(), context_dim=48))
    with pytest.raises(ValueError, match="ControlNet 0 is for another base model: text width 48"):
        prepare_controls([ControlUnit(other, control_image())], SIZE, SIZE, unet=unet)


def test_bad_units_are_clear_errors(models):
    cn = models[2][0]
    with pytest.raises(ValueError, match="unknown preprocessor 'openpose'; choose from: none"):
        ControlUnit(cn, control_image(), preprocessor="openpose")
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        ControlUnit(cn, control_image(), start=0.6, end=0.3)
    with pytest.raises(ValueError, match="unknown control mode"):
        ControlUnit(cn, control_image(), mode="louder")
    unit = ControlUnit(cn, control_image(), preprocessor="canny",
                       preprocessor_params={"low_threshold": 50})  # fmt: skip
    assert prepare_controls([unit], SIZE, SIZE)[0].hint.unique().tolist() in ([0.0, 1.0], [0.0])


def test_padded_latents_get_a_padded_hint(models):
    """GuidedModel pads latents whose sides the UNet's downsamplings do not divide (40 pixels:
    5 latents, padded to 8); the hint is padded the same way (its edge replicated)."""
    from sd_pipeline.guidance import pad_to

    unet, _, cns, _ = models
    (control,) = prepare_controls([ControlUnit(cns[0], control_image())], 40, 40, unet=unet)
    g = torch.Generator().manual_seed(8)
    x = pad_to(torch.randn(1, 4, 5, 5, generator=g), 4)
    context = torch.randn(2, 7, unet.config.context_dim, generator=g)
    with torch.no_grad():
        out = ControlledUNet(unet, [control], steps=1)(x, torch.tensor([10.0]), context)
        padded = torch.nn.functional.pad(control.hint, (0, 24, 0, 24), mode="replicate")
        want = ControlledUNet(unet, [dataclasses.replace(control, hint=padded)], steps=1)(
            x, torch.tensor([10.0]), context
        )
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, want)


def test_the_pipeline_runs_controlnet_units(tiny_checkpoint):
    """StableDiffusion.txt2img(controlnets=[...]): the units change the picture, a unit of
    weight 0 or outside its start/end window leaves it as without, and the PNG metadata
    carries the extension's ControlNet fields."""
    from sd_pipeline import GenerationParameters, StableDiffusion
    from sd_pipeline.controlnet import ControlUnit

    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=SIZE)
    net = random_controlnet(7)
    kw = dict(seed=1, steps=3, sampler="euler", progress=False, output_type="latent")
    plain = pipe.txt2img("x", **kw)
    unit = ControlUnit(net, control_image(), weight=1.0)
    controlled = pipe.txt2img("x", controlnets=[unit], **kw)
    assert not torch.allclose(controlled, plain)
    zero = ControlUnit(net, control_image(), weight=0.0)
    torch.testing.assert_close(pipe.txt2img("x", controlnets=[zero], **kw), plain)
    late = ControlUnit(net, control_image(), start=1.0, end=1.0)  # acts at no step of 3 but i=3
    assert _rel(pipe.txt2img("x", controlnets=[late], **kw), plain) < _rel(controlled, plain)
    picture = pipe.txt2img("x", controlnets=[unit], seed=1, steps=2, progress=False)[0]
    params = GenerationParameters.from_text(picture.info["parameters"])
    assert params.extra["ControlNet 0"].startswith("Module: none, Model: ")
    assert "Control Mode: Balanced" in params.extra["ControlNet 0"]


def test_sd_generate_controlnet_flags(tiny_checkpoint, tmp_path, capsys):
    from sd_pipeline.cli import main
    from sd_pipeline.metadata import read_parameters

    net_file = tmp_path / "control_tiny.safetensors"
    random_controlnet(7).save(net_file)
    image = tmp_path / "control.png"
    control_image().save(image)
    common = ["x", "--checkpoint", str(tiny_checkpoint), "--steps", "2", "--no-progress",
              "--width", str(SIZE), "--height", str(SIZE), "--seed", "1"]  # fmt: skip
    out = tmp_path / "a.png"
    code = main([*common, "-o", str(out), "--controlnet", str(net_file), "--control-image",
                 str(image), "--control-weight", "0.8", "--preprocessor", "canny"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    field = read_parameters(out).extra["ControlNet 0"]
    assert "Module: canny" in field and "Model: control_tiny" in field and "Weight: 0.8" in field
    code = main([*common, "-o", str(tmp_path / "b.png"), "--controlnet", str(net_file)])
    err = capsys.readouterr().err
    assert code == 2 and "one --control-image per --controlnet" in err
