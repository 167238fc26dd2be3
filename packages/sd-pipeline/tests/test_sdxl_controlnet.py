"""ControlNet on SDXL: parity with diffusers' StableDiffusionXLControlNetPipeline on the same
random tiny components and ControlNet, and the refusal of a ControlNet of the other family.

The diffusers ControlNet gets our weights through diffusers' own single-file converter
(``convert_controlnet_checkpoint``); it leaves SDXL's ``label_emb`` to its caller, which maps
it onto ``add_embedding`` by hand (two linear layers). Both pipelines get the same token ids,
starting latents and control image (a PIL image at the generated size, so neither resizes it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from sdxl_checkpoints import UNETS, sdxl_components, sgm_state
from test_sdxl import (
    AT_SIZE,
    OURS,
    SIZE,
    diffusers_parts,
    noise,
    reference,
    relative,
    run_reference,
)

from sd_controlnet import ControlNet, ControlNetConfig
from sd_pipeline import StableDiffusion
from sd_pipeline.controlnet import ControlUnit

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint  # noqa: E402

REL_TOL = 1e-5
UNET = UNETS["sdxl"]
# The tiny SDXL UNet's encoder: 64 channels x (1, 2, 2), attention 1 and 2 deep on the lower two
# levels (2 in the middle, the deepest level's), 64-wide heads, its added conditioning's width.
CONTROLNET = ControlNetConfig(
    model_channels=UNET.model_channels, channel_mult=UNET.channel_mult, num_res_blocks=1,
    attention_resolutions=(2, 4), num_heads=-1, num_head_channels=64, transformer_depth=(0, 1, 2),
    transformer_depth_middle=2, context_dim=UNET.context_dim, use_linear_in_transformer=True,
    adm_in_channels=UNET.adm_in_channels,
)  # fmt: skip


def random_controlnet(config: ControlNetConfig, seed: int) -> ControlNet:
    """Every weight random, the zero convolutions included (or every residual would be 0)."""
    g = torch.Generator().manual_seed(seed)
    model = ControlNet(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.02
            one = p.ndim == 1 and "norm" in name and "weight" in name
            p.copy_(torch.randn(p.shape, generator=g) * scale + one)
    return model


def diffusers_controlnet(model: ControlNet):
    """diffusers' ControlNetModel of the tiny SDXL shape (written out by hand) on our weights."""
    theirs = diffusers.ControlNetModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=192,
        attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=128 + 6 * 256,
    )  # fmt: skip
    state = {"control_model." + k: v for k, v in model.state_dict().items()}
    converted = convert_controlnet_checkpoint(state, {"layers_per_block": 1})
    for ours, name in (("0.0", "linear_1"), ("0.2", "linear_2")):
        for kind in ("weight", "bias"):
            converted[f"add_embedding.{name}.{kind}"] = state[
                f"control_model.label_emb.{ours}.{kind}"
            ]
    theirs.load_state_dict(converted, strict=True)
    return theirs.eval()


def control_image() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (20, 40, 60))
    draw = ImageDraw.Draw(image)
    draw.rectangle((12, 16, 40, 52), fill=(230, 200, 10))
    draw.ellipse((28, 4, 60, 36), fill=(5, 250, 120))
    return image


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-cn") / "sdxl.safetensors"
    state = sgm_state(sdxl_components("sdxl", seed=0))
    save_file(state, str(path))
    return StableDiffusion.from_checkpoint(path, device="cpu"), state


@pytest.fixture(scope="module")
def controlnet():
    return random_controlnet(CONTROLNET, seed=11)


@pytest.mark.parametrize("sampler,steps,weight,start", [("euler", 10, 1.0, 0.0),
                                                        ("ddim", 5, 0.7, 0.3)])  # fmt: skip
def test_sdxl_controlnet_matches_diffusers_pipeline(base, controlnet, sampler, steps, weight,
                                                    start):  # fmt: skip
    """``start`` 0.3 of 5 steps: both skip steps 0 and 1 (diffusers keeps a step while
    i / n >= start and (i + 1) / n <= end; with end 1 that is our start <= i / n <= end)."""
    from test_parity import _scheduler

    pipe, state = base
    parts = diffusers_parts("sdxl", state)
    ref = reference(parts, _scheduler(sampler), cls=diffusers.StableDiffusionXLControlNetPipeline,
                    controlnet=diffusers_controlnet(controlnet))  # fmt: skip
    image, latents = control_image(), noise()
    theirs = run_reference(ref, parts, "a red circle", "blurry", steps, latents=latents.clone(),
                           image=image, controlnet_conditioning_scale=weight,
                           control_guidance_start=start, **AT_SIZE)  # fmt: skip
    unit = ControlUnit(controlnet, image, weight=weight, start=start)
    args = dict(steps=steps, sampler=sampler, latents=latents, **AT_SIZE, **OURS)
    ours = pipe.txt2img("a red circle", "blurry", controlnets=[unit], **args)
    assert relative(ours, theirs, f"SDXL ControlNet {sampler} latents") < REL_TOL
    with torch.no_grad():
        their_image = ref.vae.decode(theirs / 0.13025).sample
    assert relative(pipe.decode(ours), their_image, f"SDXL ControlNet {sampler} image") < REL_TOL
    plain = pipe.txt2img("a red circle", "blurry", **args)
    assert relative(plain, theirs, "without the ControlNet") > 1e-2  # the control acted


def test_controlnet_of_the_other_family_is_refused(base, controlnet, tiny_checkpoint):
    pipe, _ = base
    sd1_net = ControlNet(dataclasses.replace(ControlNetConfig.tiny(), context_dim=192))
    args = dict(steps=1, progress=False, output_type="latent", **AT_SIZE)
    with pytest.raises(ValueError, match=r"ControlNet 0 is for SD 1\.x/2\.x; this model is SDXL"):
        pipe.txt2img("x", controlnets=[ControlUnit(sd1_net, control_image())], **args)
    sd1 = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"ControlNet 0 is for SDXL; this model is SD 1\.x/2\.x"):
        sd1.txt2img("x", controlnets=[ControlUnit(controlnet, control_image())], **args)
    narrower = random_controlnet(dataclasses.replace(CONTROLNET, adm_in_channels=64), seed=1)
    with pytest.raises(ValueError, match=r"another base model: .* added conditioning 64 wide"):
        pipe.txt2img("x", controlnets=[ControlUnit(narrower, control_image())], **args)


def test_the_refiner_stage_runs_without_the_controlnet(base, controlnet, tmp_path):
    """The base with its ControlNet, then the refiner (whose UNet the ControlNet does not fit):
    the unit changes the base's part only, and nothing fails on the refiner's 128-wide text."""
    pipe, _ = base
    path = tmp_path / "refiner.safetensors"
    save_file(sgm_state(sdxl_components("sdxl-refiner", seed=1)), str(path))
    refiner = StableDiffusion.from_checkpoint(path, device="cpu")
    args = dict(steps=4, sampler="euler", latents=noise(), refiner=refiner, refiner_switch=0.5,
                **AT_SIZE, **OURS)  # fmt: skip
    unit = ControlUnit(controlnet, control_image())
    controlled = pipe.txt2img("a cat", controlnets=[unit], **args)
    plain = pipe.txt2img("a cat", **args)
    assert torch.isfinite(controlled).all() and not torch.allclose(controlled, plain)
    # a unit acting only after the switch (its start at step 2 of 4) changes nothing
    late = ControlUnit(controlnet, control_image(), start=0.5)
    torch.testing.assert_close(pipe.txt2img("a cat", controlnets=[late], **args), plain)
