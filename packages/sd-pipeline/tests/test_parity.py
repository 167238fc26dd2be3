"""Parity with diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline on the same weights.

The diffusers side is built from the same single-file checkpoint with diffusers' own converters
(convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint) and transformers' CLIPTextModel, so
nothing of ours converts the weights it is compared against. Both sides start from the same
standard-normal latents; DDIM runs as the original code (leading spacing, offset 1, alpha_bar_0
at the end), Euler on k-diffusion's uniform ladder (diffusers' linspace spacing; 4 or 10 steps
so that every timestep is an integer, where linear and log-sigma interpolation agree).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PREFIXES, checkpoint_state, tiny_configs
from PIL import Image

from sd_pipeline import StableDiffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

SIZE = 32
# Random weights make sampling chaotic under strong guidance (differences of 1e-7 grow to 1e-3
# over ten steps at 7.5); a moderate scale still tests the guidance arithmetic.
GUIDANCE = 2.0
# Max abs difference / max abs value, float32. Measured 2e-6 to 5.5e-4: the most chaotic case,
# 9-channel inpainting with Euler, feeds a VAE encoding into the random UNet, so the VAE's own
# float32 rounding (1e-6 of a float64 encoding, whichever layout its weights are in) moves its
# image by 2e-4 to 5.5e-4 as the convolution kernels change. A real error (a wrong mask,
# scaling or sigma) is O(1).
REL_TOL = 1e-3


def _diffusers_parts(state: dict, in_channels: int):
    vae_c, text_c, unet_c = tiny_configs(in_channels)
    return (
        diffusers_vae(state, vae_c),
        _transformers_text(state, text_c),
        diffusers_unet(state, unet_c),
    )


def diffusers_unet(state: dict, unet_c):
    """diffusers' UNet2DConditionModel from a single file's UNet tensors, by diffusers'
    converter: SD 1.x's fixed head count, or SD 2.x's 64-wide heads and linear projections."""
    levels = len(unet_c.channel_mult)
    down = [
        "CrossAttnDownBlock2D" if 2**i in unet_c.attention_resolutions else "DownBlock2D"
        for i in range(levels)
    ]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    heads = unet_c.num_heads  # diffusers' attention_head_dim: the head count(s)
    if heads == -1:
        heads = tuple(unet_c.model_channels * m // unet_c.num_head_channels
                      for m in unet_c.channel_mult)  # fmt: skip
    unet_config = dict(
        sample_size=SIZE // 8,
        in_channels=unet_c.in_channels,
        out_channels=4,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(unet_c.model_channels * m for m in unet_c.channel_mult),
        layers_per_block=unet_c.num_res_blocks,
        cross_attention_dim=unet_c.context_dim,
        attention_head_dim=heads,
        use_linear_projection=unet_c.use_linear_in_transformer,
        norm_num_groups=unet_c.norm_groups,
    )
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    return unet.eval()


def diffusers_vae(state: dict, vae_c):
    """diffusers' AutoencoderKL from a single file's VAE tensors, by diffusers' converter."""
    vae_config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_c.channel_mult),
        up_block_types=("UpDecoderBlock2D",) * len(vae_c.channel_mult),
        block_out_channels=tuple(vae_c.base_channels * m for m in vae_c.channel_mult),
        layers_per_block=vae_c.num_res_blocks,
        latent_channels=vae_c.latent_channels,
        norm_num_groups=vae_c.norm_groups,
        sample_size=SIZE,
        scaling_factor=vae_c.scaling_factor,
    )
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    return vae.eval()


def _transformers_text(state: dict, text_c):
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=text_c.vocab_size,
            hidden_size=text_c.width,
            intermediate_size=text_c.mlp_width,
            num_hidden_layers=text_c.layers,
            num_attention_heads=text_c.heads,
            max_position_embeddings=text_c.max_positions,
            hidden_act=text_c.activation,
            layer_norm_eps=text_c.layer_norm_eps,
        )
    )
    prefix = PREFIXES["text"]
    missing, unexpected = text.load_state_dict(
        {_hf_key(k[len(prefix) :], text): v for k, v in state.items() if k.startswith(prefix)},
        strict=False,
    )
    assert not unexpected and all("position_ids" in k for k in missing)
    return text.eval()


def _hf_key(key: str, model) -> str:
    """transformers 5 names the text model's tensors without the ``text_model.`` of 4.x."""
    if key in model.state_dict():
        return key
    return key.removeprefix("text_model.")


def _scheduler(name: str):
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if name == "ddim":
        return diffusers.DDIMScheduler(
            **common,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        )
    return diffusers.EulerDiscreteScheduler(**common, timestep_spacing="linspace")


def _embeds(pipe: StableDiffusion, text, prompt: str, negative: str):
    ids = pipe.tokenizer([prompt, negative])
    with torch.no_grad():
        hidden = text(ids).last_hidden_state
    return hidden[:1], hidden[1:]


def _reference(kind: str, sampler: str, in_channels: int, seed: int = 0):
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    state = checkpoint_state(in_channels, seed)
    vae, text, unet = _diffusers_parts(state, in_channels)
    cls = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }[kind]
    ref = cls(
        vae=vae,
        text_encoder=text,
        tokenizer=None,
        unet=unet,
        scheduler=_scheduler(sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref, text, state


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Our pipelines, loaded from checkpoint files holding the same weights."""
    from safetensors.torch import save_file

    out = {}
    for in_channels in (4, 9):
        path = tmp_path_factory.mktemp("parity") / f"tiny{in_channels}.safetensors"
        save_file(checkpoint_state(in_channels, 0), str(path))
        out[in_channels] = StableDiffusion.from_checkpoint(path, device="cpu", native_size=SIZE)
    return out


def _init_image():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def _mask():
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    return Image.fromarray(mask)


def _compare(pipe, ours: torch.Tensor, theirs: torch.Tensor, ref, label: str):
    """Final latents, and images decoded from them (unclamped: random weights give latents far
    outside a trained model's range, and clamping would hide differences), relative to the
    reference's largest value."""
    with torch.no_grad():
        ours_image = pipe.vae.decode(ours / pipe.vae.config.scaling_factor)
        theirs_image = ref.vae.decode(theirs / ref.vae.config.scaling_factor).sample
    for what, a, b in (("latents", ours, theirs), ("image", ours_image, theirs_image)):
        diff = (a - b).abs().max().item()
        rel = diff / b.abs().max().item()
        print(f"{label} {what}: max abs {diff:.2e}, relative {rel:.2e}")
        assert b.std() > 0.05, "the reference is flat: the test would prove nothing"
        assert rel < REL_TOL, f"{label} {what}: relative difference {rel:.3g} >= {REL_TOL}"


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("euler", 4)])
def test_txt2img_matches_diffusers(pipes, sampler, steps):
    pipe = pipes[4]
    ref, text, _ = _reference("txt2img", sampler, 4)
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    cond, uncond = _embeds(pipe, text, "a red circle", "blurry")
    with torch.no_grad():
        theirs = ref(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            latents=noise.clone(),
            height=SIZE,
            width=SIZE,
            output_type="latent",
        ).images
    ours = pipe.txt2img(
        "a red circle",
        "blurry",
        steps=steps,
        sampler=sampler,
        guidance_scale=GUIDANCE,
        latents=noise,
        progress=False,
        output_type="latent",
    )
    _compare(pipe, ours, theirs, ref, f"txt2img {sampler}")


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_img2img_matches_diffusers(pipes, sampler):
    pipe = pipes[4]
    ref, text, _ = _reference("img2img", sampler, 4)
    noise_shape = (1, 4, SIZE // 8, SIZE // 8)
    g = torch.Generator().manual_seed(3)
    cond, uncond = _embeds(pipe, text, "a cat", "")
    with torch.no_grad():
        theirs = ref(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            image=_init_image(),
            strength=0.5,
            num_inference_steps=10,
            guidance_scale=GUIDANCE,
            generator=g,
            output_type="latent",
        ).images
    # diffusers drew the posterior sample first, then the noise, from the same generator
    g = torch.Generator().manual_seed(3)
    torch.randn(noise_shape, generator=g)
    noise = torch.randn(noise_shape, generator=g)
    ours = pipe.img2img(
        "a cat",
        _init_image(),
        strength=0.5,
        steps=10,
        guidance_scale=GUIDANCE,
        sampler=sampler,
        latents=noise,
        progress=False,
        output_type="latent",
    )
    _compare(pipe, ours, theirs, ref, f"img2img {sampler}")


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_inpaint_9_channel_matches_diffusers(pipes, sampler):
    pipe = pipes[9]
    assert pipe.is_inpainting_model
    ref, text, _ = _reference("inpaint", sampler, 9)
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    cond, uncond = _embeds(pipe, text, "a dog", "")
    with torch.no_grad():
        theirs = ref(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            image=_init_image(),
            mask_image=_mask(),
            strength=1.0,
            num_inference_steps=4,
            guidance_scale=GUIDANCE,
            latents=noise.clone(),
            height=SIZE,
            width=SIZE,
            output_type="latent",
        ).images
    ours = pipe.inpaint(
        "a dog",
        _init_image(),
        _mask(),
        steps=4,
        sampler=sampler,
        guidance_scale=GUIDANCE,
        latents=noise,
        progress=False,
        output_type="latent",
    )
    _compare(pipe, ours, theirs, ref, f"inpaint-9ch {sampler}")


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_inpaint_blending_matches_diffusers(pipes, sampler):
    pipe = pipes[4]
    assert not pipe.is_inpainting_model
    ref, text, _ = _reference("inpaint", sampler, 4)
    shape = (1, 4, SIZE // 8, SIZE // 8)
    cond, uncond = _embeds(pipe, text, "a dog", "")
    with torch.no_grad():
        theirs = ref(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            image=_init_image(),
            mask_image=_mask(),
            strength=0.8,
            num_inference_steps=10,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(11),
            height=SIZE,
            width=SIZE,
            output_type="latent",
        ).images
    g = torch.Generator().manual_seed(11)
    torch.randn(shape, generator=g)  # diffusers' posterior sample of the image
    noise = torch.randn(shape, generator=g)
    ours = pipe.inpaint(
        "a dog",
        _init_image(),
        _mask(),
        strength=0.8,
        steps=10,
        sampler=sampler,
        guidance_scale=GUIDANCE,
        latents=noise,
        progress=False,
        output_type="latent",
    )
    _compare(pipe, ours, theirs, ref, f"inpaint-blend {sampler}")


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_controlnet_txt2img_matches_diffusers(tmp_path, sampler):
    """Our txt2img with a ControlNet unit against diffusers' StableDiffusionControlNetPipeline
    with the same components, ControlNet, control image and starting latents: final latents."""
    from diffusers import StableDiffusionControlNetPipeline
    from safetensors.torch import save_file
    from test_controlnet import SIZE as CN_SIZE
    from test_controlnet import control_image, diffusers_controlnet, random_controlnet

    from sd_pipeline.controlnet import ControlUnit

    path = tmp_path / "tiny.safetensors"
    save_file(checkpoint_state(4, 0), str(path))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu", native_size=CN_SIZE)
    base, text, _ = _reference("txt2img", sampler, 4)
    net = random_controlnet(7)
    ref = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=text, tokenizer=None, unet=base.unet,
        controlnet=diffusers_controlnet(net), scheduler=_scheduler(sampler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    image = control_image()
    noise = torch.randn(
        1, 4, CN_SIZE // 8, CN_SIZE // 8, generator=torch.Generator().manual_seed(7)
    )
    cond, uncond = _embeds(pipe, text, "a red circle", "blurry")
    with torch.no_grad():
        theirs = ref(
            prompt_embeds=cond, negative_prompt_embeds=uncond, image=image,
            num_inference_steps=4, guidance_scale=GUIDANCE, latents=noise.clone(),
            height=CN_SIZE, width=CN_SIZE, output_type="latent", controlnet_conditioning_scale=0.8,
        ).images  # fmt: skip
    ours = pipe.txt2img("a red circle", "blurry", steps=4, sampler=sampler, guidance_scale=GUIDANCE,
                        latents=noise, progress=False, output_type="latent",
                        controlnets=[ControlUnit(net, image, weight=0.8)])  # fmt: skip
    plain = pipe.txt2img("a red circle", "blurry", steps=4, sampler=sampler,
                         guidance_scale=GUIDANCE, latents=noise, progress=False,
                         output_type="latent")  # fmt: skip
    assert (plain - theirs).abs().max() > 10 * (ours - theirs).abs().max()  # the unit matters
    _compare(pipe, ours, theirs, ref, f"controlnet txt2img {sampler}")
