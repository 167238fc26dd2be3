"""SD 2.x and v-prediction against diffusers' StableDiffusionPipeline on the same weights:
plain v-prediction (DDIM, Euler), CFG rescale, zero terminal SNR; an SD 2.x single file
against the diffusers folder of the same weights.

The components are tiny SD 2.x ones: an OpenCLIP-layout text tower (exact GELU, its last
layer unused as SD 2.x leaves it, the tokenizer padding with ``!``), a UNet with 64-wide heads
and linear transformer projections. diffusers' side is built from the single file by
diffusers' own converters and tokenizes the prompts itself (transformers' CLIPTokenizer on the
same vocabulary, pad token ``!``), so both padding and conversion are checked independently.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import PREFIXES, randomize
from safetensors.torch import save_file
from sdxl_checkpoints import openclip_layout
from test_parity import SIZE, _hf_key, diffusers_unet, diffusers_vae

from sd_clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from sd_pipeline import StableDiffusion
from sd_unet import UNet, UNetConfig
from sd_vae import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint  # noqa: E402

GUIDANCE = 2.0  # see test_parity: random weights make strong guidance chaotic
# Max abs difference / max abs value of the decoded images, float32. Measured on these tiny
# models: 2e-7 to 2e-6. A real error (a wrong sign of v, a wrong rescale axis) is O(1).
REL_TOL = 2e-5
PROMPT, NEGATIVE = "a red circle", "blurry"
SD2_PREFIX = "cond_stage_model.model."


def sd2_configs(in_channels: int = 4):
    """Tiny SD 2.x configs: the text tower has one layer more than the model uses (SD 2.x runs
    OpenCLIP's penultimate layer), the UNet SD 2.x's head width and linear projections."""
    text = CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=512, activation="gelu")
    unet = dataclasses.replace(
        UNetConfig.tiny(), model_channels=64, num_heads=-1, num_head_channels=64,
        use_linear_in_transformer=True, context_dim=text.width, in_channels=in_channels,
    )  # fmt: skip
    return AutoencoderKLConfig.tiny(), text, unet


def sd2_state(in_channels: int = 4, seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """An SD 2.x single file's tensors (original layout) from random weights."""
    vae_c, text_c, unet_c = sd2_configs(in_channels)
    vae, text, unet = randomize((AutoencoderKL(vae_c), CLIPTextModel(text_c), UNet(unet_c)), seed)
    state = {PREFIXES["vae"] + k: v for k, v in vae.state_dict().items()}
    state.update({PREFIXES["unet"] + k: v for k, v in unet.state_dict().items()})
    state.update(openclip_layout(text.state_dict(), SD2_PREFIX))
    state.update(overrides)
    return {k: v.contiguous() for k, v in state.items()}


def write_sd2(path, in_channels: int = 4, seed: int = 0, **overrides):
    save_file(sd2_state(in_channels, seed, **overrides), str(path))
    return path


def _diffusers_text(state: dict):
    """transformers' CLIPTextModel as diffusers makes SD 2.x's: OpenCLIP's tensors converted by
    diffusers' convert_open_clip_checkpoint, all layers but the last, exact GELU."""
    _, text_c, _ = sd2_configs()
    used = text_c.layers - 1
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=text_c.vocab_size, hidden_size=text_c.width, intermediate_size=text_c.mlp_width,
        num_hidden_layers=used, num_attention_heads=text_c.heads, max_position_embeddings=77,
        hidden_act="gelu",
    ))  # fmt: skip
    converted = convert_open_clip_checkpoint(text, state, prefix=SD2_PREFIX)
    kept = {_hf_key(k, text): v for k, v in converted.items()
            if f"layers.{used}." not in k and "text_projection" not in k}  # fmt: skip
    missing, unexpected = text.load_state_dict(kept, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return text.eval()


def _diffusers_tokenizer(folder):
    CLIPTokenizer().save(folder)  # vocab.json and merges.txt
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        str(folder), pad_token="!", model_max_length=77
    )
    assert len(tokenizer) == 49408 and tokenizer.pad_token_id == 0
    return tokenizer


def _scheduler(kind: str, **extra):
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="v_prediction", **extra)  # fmt: skip
    if kind == "ddim":  # the original DDIM, as ours
        common = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                      timestep_spacing="leading") | common  # fmt: skip
        return diffusers.DDIMScheduler(**common)
    if kind == "ddim_trailing":  # the zero-SNR recipe (Lin et al.), ending at alpha-bar 1
        common = (
            dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing") | common
        )
        return diffusers.DDIMScheduler(**common)
    return diffusers.EulerDiscreteScheduler(**common, timestep_spacing="linspace")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """Our pipeline from an SD 2.x single file, diffusers' parts from the same tensors."""
    folder = tmp_path_factory.mktemp("sd2")
    state = sd2_state()
    path = folder / "sd2-v.safetensors"
    save_file(state, str(path))
    pipe = StableDiffusion.from_checkpoint(path, device="cpu", prediction="v")
    vae_c, _, unet_c = sd2_configs()
    parts = dict(vae=diffusers_vae(state, vae_c), text_encoder=_diffusers_text(state),
                 unet=diffusers_unet(state, unet_c),
                 tokenizer=_diffusers_tokenizer(folder / "tokenizer"))  # fmt: skip
    return pipe, parts, path


def _reference(parts, scheduler):
    ref = diffusers.StableDiffusionPipeline(
        **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return ref


def _noise(seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def _theirs(ref, steps: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                   guidance_scale=GUIDANCE, latents=_noise(), height=SIZE, width=SIZE,
                   output_type="latent", **kwargs).images  # fmt: skip


def _ours(pipe, sampler: str, steps: int, **kwargs) -> torch.Tensor:
    return pipe.txt2img(PROMPT, NEGATIVE, sampler=sampler, steps=steps, guidance_scale=GUIDANCE,
                        latents=_noise(), width=SIZE, height=SIZE, progress=False,
                        output_type="latent", **kwargs)  # fmt: skip


def _images_rel(pipe, ref, ours: torch.Tensor, theirs: torch.Tensor, label: str) -> float:
    """The decoded images' max abs difference relative to the reference's largest value (both
    decoded by diffusers' VAE; unclamped, as in test_parity)."""
    with torch.no_grad():
        a = ref.vae.decode(ours / ref.vae.config.scaling_factor).sample
        b = ref.vae.decode(theirs / ref.vae.config.scaling_factor).sample
    assert b.std() > 0.05, "the reference is flat: the test would prove nothing"
    rel = ((a - b).abs().max() / b.abs().max()).item()
    latents = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    print(f"{label}: latents relative {latents:.2e}, images relative {rel:.2e}")
    return rel


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("euler", 4)])
def test_v_prediction_txt2img_matches_diffusers(sd2, sampler, steps):
    pipe, parts, _ = sd2
    assert pipe.tokenizer.pad_id == 0 and pipe.prediction == "v"
    ref = _reference(parts, _scheduler(sampler))
    theirs = _theirs(ref, steps)
    ours = _ours(pipe, sampler, steps)
    assert _images_rel(pipe, ref, ours, theirs, f"v {sampler}") < REL_TOL
    pipe.prediction = "epsilon"  # the same weights read as epsilon: far off
    try:
        wrong = _ours(pipe, sampler, steps)
    finally:
        pipe.prediction = "v"
    assert _images_rel(pipe, ref, wrong, theirs, f"eps-as-v {sampler}") > 100 * REL_TOL


def test_guidance_rescale_matches_diffusers(sd2):
    """diffusers rescales the guided UNet output (v here) towards the conditional one's std;
    ours does it on the same prediction, before the sampler turns it into x_0."""
    pipe, parts, _ = sd2
    ref = _reference(parts, _scheduler("ddim"))
    theirs = _theirs(ref, 5, guidance_rescale=0.7)
    ours = _ours(pipe, "ddim", 5, guidance_rescale=0.7)
    assert _images_rel(pipe, ref, ours, theirs, "v ddim rescale 0.7") < REL_TOL
    plain = _ours(pipe, "ddim", 5)
    assert _images_rel(pipe, ref, plain, theirs, "no rescale") > 100 * REL_TOL


def test_zero_terminal_snr_matches_diffusers(sd2):
    """Zero terminal SNR. Against a diffusers scheduler given our schedule's betas (the last
    alpha-bar AUTOMATIC1111's 4.9e-8, so sigma_max is finite): equal, for the original DDIM and
    for the usual recipe (trailing DDIM ending at alpha-bar 1, which is our Euler on the
    "simple" ladder: DDIM is Euler on the sigma scale). Against diffusers' own
    rescale_betas_zero_snr=True (alpha-bar exactly 0 at t = 999): its first step's x_0 is
    exactly -v, ours x / (1 + sigma^2) - v sigma / sqrt(1 + sigma^2), 2e-4 x apart, which
    stays a small difference in the image (measured 1.1e-4 relative here)."""
    pipe, parts, _ = sd2
    betas = pipe.schedule.zero_terminal_snr().betas.float().numpy()
    ref = _reference(parts, _scheduler("ddim", trained_betas=betas))
    ours = _ours(pipe, "ddim", 5, zero_terminal_snr=True)
    assert _images_rel(pipe, ref, ours, _theirs(ref, 5), "ztsnr ddim") < REL_TOL
    trailing = _reference(parts, _scheduler("ddim_trailing", trained_betas=betas))
    ours = _ours(pipe, "euler", 5, scheduler="simple", zero_terminal_snr=True)
    # Euler's first step starts at x = 4519 noise: float32 rounds it to 5e-4, which the step
    # down to sigma 3 keeps (measured 2.8e-5; DDIM works on the unit scale)
    rel = _images_rel(pipe, ref, ours, _theirs(trailing, 5), "ztsnr trailing")
    assert rel < 5 * REL_TOL
    exact = _reference(parts, _scheduler("ddim_trailing", rescale_betas_zero_snr=True))
    rel = _images_rel(pipe, ref, ours, _theirs(exact, 5), "ztsnr vs alpha-bar 0")
    assert rel < 2e-3
    rescaled = _theirs(exact, 5, guidance_rescale=0.7)
    ours = _ours(pipe, "euler", 5, scheduler="simple", zero_terminal_snr=True,
                 guidance_rescale=0.7)  # fmt: skip
    assert _images_rel(pipe, ref, ours, rescaled, "ztsnr + rescale vs alpha-bar 0") < 2e-3
    plain = _ours(pipe, "euler", 5, scheduler="simple")
    assert _images_rel(pipe, ref, plain, _theirs(exact, 5), "not ztsnr") > 100 * rel


def test_single_file_equals_the_diffusers_folder(sd2, tmp_path):
    """The diffusers folder of the same weights (written by diffusers' save_pretrained: its
    scheduler says v_prediction; its tokenizer pads with '!') makes the same image as our
    single file, and the folder's image equals diffusers' own."""
    pipe, parts, _ = sd2
    ref = _reference(parts, _scheduler("euler"))
    ref.save_pretrained(tmp_path / "sd2-v")  # (its tokenizer: transformers 5's tokenizer.json)
    folder = StableDiffusion.from_checkpoint(tmp_path / "sd2-v", device="cpu")
    assert folder.prediction == "v" and folder.tokenizer.pad_id == 0
    assert folder.native_size == SIZE  # the unet config's sample_size
    from_file = _ours(pipe, "euler", 4)
    from_folder = _ours(folder, "euler", 4)
    assert (from_file - from_folder).abs().max() <= 1e-6 * from_folder.abs().max()
    assert _images_rel(folder, ref, from_folder, _theirs(ref, 4), "folder v euler") < REL_TOL


def test_rescale_guidance_equals_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from sd_pipeline.guidance import rescale_guidance

    g = torch.Generator().manual_seed(0)
    guided, positive = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        expected = rescale_noise_cfg(guided * 3, positive, guidance_rescale=phi)
        torch.testing.assert_close(rescale_guidance(guided * 3, positive, phi), expected)
