"""End-to-end runs of StableDiffusion on tiny random-weight checkpoints in the SD file layout."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import PREFIXES, checkpoint_state, write_checkpoint
from PIL import Image
from safetensors.torch import save_file

from sd_pipeline import GenerationParameters, StableDiffusion
from sd_pipeline.images import pil_to_tensor

FAST = dict(steps=2, progress=False)


def _image(size=32, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


def test_txt2img_returns_pil_images_with_parameters(tiny_pipe):
    images = tiny_pipe.txt2img("a red circle", "blurry", sampler="euler", seed=3, **FAST)
    assert len(images) == 1 and images[0].size == (32, 32) and images[0].mode == "RGB"
    params = GenerationParameters.from_text(images[0].info["parameters"])
    assert (params.prompt, params.negative_prompt, params.seed) == ("a red circle", "blurry", 3)
    assert (params.steps, params.sampler, params.width, params.height) == (2, "euler", 32, 32)
    assert params.model == "tiny" and params.model_hash == tiny_pipe.model_hash
    assert len(tiny_pipe.model_hash) == 10


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    a = tiny_pipe.txt2img("x", seed=1, output_type="latent", **FAST)
    b = tiny_pipe.txt2img("x", seed=1, output_type="latent", **FAST)
    c = tiny_pipe.txt2img("x", seed=2, output_type="latent", **FAST)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m_sde", "ddpm", "ddim"])
def test_batch_reproduces_single_runs(tiny_pipe, sampler):
    batch = tiny_pipe.txt2img(
        "a cat", sampler=sampler, seed=10, batch_size=3, output_type="latent", **FAST
    )
    for i in range(3):
        single = tiny_pipe.txt2img(
            "a cat", sampler=sampler, seed=10 + i, output_type="latent", **FAST
        )
        # equal up to float rounding (a batched matmul sums in another order), which random
        # weights and guidance amplify: relative to the latents' scale
        assert _relative(batch[i : i + 1], single) < 1e-3
    assert _relative(batch[0], batch[1]) > 0.1


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_prompt_lists_and_batch_size(tiny_pipe):
    images = tiny_pipe.txt2img(["a", "b"], ["n1", "n2"], batch_size=2, seed=0, **FAST)
    prompts = [GenerationParameters.from_text(im.info["parameters"]) for im in images]
    assert [(p.prompt, p.negative_prompt, p.seed) for p in prompts] == [
        ("a", "n1", 0),
        ("a", "n1", 1),
        ("b", "n2", 2),
        ("b", "n2", 3),
    ]


def test_empty_prompt_and_no_guidance(tiny_pipe):
    images = tiny_pipe.txt2img("", guidance_scale=1.0, seed=0, **FAST)
    assert images[0].size == (32, 32)


def test_width_height_and_latents(tiny_pipe):
    images = tiny_pipe.txt2img("x", width=48, height=24, seed=0, **FAST)
    assert images[0].size == (48, 24)
    noise = torch.randn(2, 4, 3, 6, generator=torch.Generator().manual_seed(0))
    a = tiny_pipe.txt2img(
        "x", width=48, height=24, latents=noise, batch_size=2, sampler="euler", **FAST
    )
    b = tiny_pipe.txt2img(
        "x", width=48, height=24, latents=noise, batch_size=2, sampler="euler", **FAST
    )
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_callback_sees_every_step(tiny_pipe):
    seen = []
    tiny_pipe.txt2img("x", steps=3, progress=False, sampler="euler", callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert set(seen[0]) >= {"x", "i", "sigma", "denoised"}


def test_clip_skip_changes_the_conditioning(tiny_pipe):
    a = tiny_pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    b = tiny_pipe.txt2img("x", seed=0, clip_skip=2, output_type="latent", **FAST)
    assert not torch.allclose(a, b)
    assert (
        "Clip skip: 2" in tiny_pipe.txt2img("x", seed=0, clip_skip=2, **FAST)[0].info["parameters"]
    )


def test_img2img_strength(tiny_pipe):
    image = _image()
    # strength 0: no step runs, the result is the image's VAE round trip
    kept = tiny_pipe.img2img("x", image, strength=0.0, output_type="tensor", **FAST)
    with torch.no_grad():
        z = tiny_pipe.vae.encode(pil_to_tensor(image)).mean
        round_trip = tiny_pipe.vae.decode(z)
    torch.testing.assert_close(kept, round_trip, atol=1e-5, rtol=1e-5)
    out = tiny_pipe.img2img("x", image, strength=1.0, seed=0, **FAST)[0]
    assert "Denoising strength: 1" in out.info["parameters"]
    resized = tiny_pipe.img2img("x", _image(40), width=32, height=24, strength=0.5, **FAST)
    assert resized[0].size == (32, 24)


def test_inpaint_keeps_the_unmasked_region(tiny_pipe):
    """Latents outside the mask come back exactly; pixels there differ from the image's VAE
    round trip only through the decoder (its receptive field spans the whole tiny image)."""
    image = _image(64)
    mask = np.zeros((64, 64), np.uint8)
    mask[:16, :16] = 255
    latents = tiny_pipe.inpaint(
        "x", image, Image.fromarray(mask), seed=0, output_type="latent", **FAST
    )
    with torch.no_grad():
        original = tiny_pipe.vae.encode(pil_to_tensor(image)).mean * 0.18215
        round_trip = tiny_pipe.vae.decode(original / 0.18215)
        result = tiny_pipe.vae.decode(latents / 0.18215)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[:2, :2] = False
    assert torch.equal(latents[0][:, keep], original[0][:, keep])
    assert not torch.allclose(latents[0][:, ~keep], original[0][:, ~keep])
    far = (slice(None), slice(None), slice(40, None), slice(40, None))  # 24 px from the mask
    near_err = (result - round_trip)[..., :16, :16].abs().mean().item()
    far_err = (result - round_trip)[far].abs().mean().item()
    vae_err = (round_trip - pil_to_tensor(image)).abs().mean().item()
    print(f"inpaint: unmasked pixels vs VAE round trip {far_err:.4f}, masked {near_err:.4f}, "
          f"VAE round trip vs image {vae_err:.4f} (random weights)")  # fmt: skip
    assert far_err < near_err / 5


def test_inpaint_with_blur_and_9_channel_model(tiny_pipe, tiny_inpaint_checkpoint):
    image, mask = _image(), Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    assert len(tiny_pipe.inpaint("x", image, mask, mask_blur=4, seed=0, **FAST)) == 1
    pipe9 = StableDiffusion.from_checkpoint(tiny_inpaint_checkpoint, device="cpu")
    assert pipe9.is_inpainting_model and not tiny_pipe.is_inpainting_model
    out = pipe9.inpaint("x", image, mask, seed=0, **FAST)
    assert out[0].size == (32, 32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p.txt2img("x", width=30, **FAST), "width must be a multiple of 8, got 30"),
        (lambda p: p.txt2img("x", height=0, **FAST), "height must be a positive integer"),
        (lambda p: p.txt2img("x", sampler="eular", **FAST), "sampler 'eular' is unknown; choose"),
        (lambda p: p.txt2img("x", steps=0, progress=False), "steps must be a positive integer"),
        (lambda p: p.txt2img("x", batch_size=0, **FAST), "batch_size must be a positive"),
        (lambda p: p.txt2img(["a", "b"], ["n"] * 3, **FAST), "one negative prompt or one per"),
        (lambda p: p.txt2img("x", latents=torch.zeros(1, 4, 2, 2), **FAST), "latents must have"),
        (lambda p: p.txt2img("x", output_type="png", **FAST), "output_type is .png.; choose from"),
        (lambda p: p.img2img("x", _image(), strength=1.5, **FAST), r"strength must be in \[0, 1\]"),
        (lambda p: p.img2img("x", _image(), strength=-0.1, **FAST), r"strength must be in"),
        (lambda p: p.img2img("x", _image(36), **FAST), "width must be a multiple of 8, got 36"),
        (
            lambda p: p.inpaint("x", _image(32), Image.new("L", (16, 16)), **FAST),
            "the mask is 16x16 but the image is 32x32",
        ),
        (
            lambda p: p.inpaint("x", _image(32), np.zeros((32, 32, 3)), **FAST),
            "mask must be greyscale",
        ),
    ],
)
def test_bad_arguments(tiny_pipe, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_pipe)


def test_bad_prompt_type(tiny_pipe):
    with pytest.raises(TypeError, match="prompt must be a str"):
        tiny_pipe.txt2img(3, **FAST)


def test_separate_vae_replaces_the_builtin_one(tiny_checkpoint, tmp_path):
    other = checkpoint_state(seed=5)
    vae_file = tmp_path / "vae.safetensors"
    save_file(
        {k[len(PREFIXES["vae"]) :]: v for k, v in other.items() if k.startswith(PREFIXES["vae"])},
        str(vae_file),
    )
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, vae=vae_file, device="cpu")
    expected = other[PREFIXES["vae"] + "decoder.conv_out.weight"]
    assert torch.equal(pipe.vae.decoder.conv_out.weight, expected)


def test_pickle_checkpoint_loads_the_same(tiny_checkpoint, tmp_path):
    state = checkpoint_state()
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state}, path)
    a = StableDiffusion.from_checkpoint(path, device="cpu", native_size=32)
    b = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    assert torch.equal(
        a.txt2img("x", seed=0, output_type="latent", **FAST),
        b.txt2img("x", seed=0, output_type="latent", **FAST),
    )


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        StableDiffusion.from_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        StableDiffusion.from_checkpoint(junk)
    vae_only = tmp_path / "vae_only.safetensors"
    state = checkpoint_state()
    save_file({k: v for k, v in state.items() if k.startswith(PREFIXES["vae"])}, str(vae_only))
    with pytest.raises(ValueError, match=r"vae_only\.safetensors"):
        StableDiffusion.from_checkpoint(vae_only)


def test_offload_gives_the_same_result(tiny_checkpoint):
    a = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    b = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32, offload=True)
    torch.testing.assert_close(
        a.txt2img("x", seed=0, output_type="tensor", **FAST),
        b.txt2img("x", seed=0, output_type="tensor", **FAST),
    )


def test_compile_routes_the_unet_through_torch_compile(tiny_checkpoint, monkeypatch):
    """compile() hands the UNet to torch.compile, sampling then calls what it returned without
    autograd and with inductor's freezing on (where inductor reads it when it compiles); to()
    drops it. (The real compilation is the slow test below.)"""
    from torch._inductor import config as inductor_config

    seen = {}

    def fake_compile(module, **kwargs):
        seen["module"], seen["kwargs"], seen["calls"] = module, kwargs, 0

        def compiled(*args):
            seen["calls"] += 1
            assert inductor_config.freezing and not torch.is_grad_enabled()
            return module(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    eager = pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    assert pipe.compile() is pipe
    assert seen["module"] is pipe.unet
    torch.testing.assert_close(pipe.txt2img("x", seed=0, output_type="latent", **FAST), eager)
    assert seen["calls"] == 2  # two steps, each one UNet batch (CFG halves together)
    pipe.to("cpu")
    pipe.txt2img("x", seed=0, output_type="latent", **FAST)
    assert seen["calls"] == 2
    pipe.offload = True
    with pytest.raises(ValueError, match="offload"):
        pipe.compile()


@pytest.mark.slow
def test_compiled_unet_gives_the_same_image(tiny_checkpoint, monkeypatch):
    from torch._inductor import freezing

    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", native_size=32)
    eager = pipe.txt2img("x", seed=0, output_type="tensor", **FAST)
    froze = []
    real_freeze = freezing.freeze
    monkeypatch.setattr(freezing, "freeze", lambda *a, **k: froze.append(1) or real_freeze(*a, **k))
    compiled = pipe.compile().txt2img("x", seed=0, output_type="tensor", **FAST)
    assert froze, "inductor compiled the UNet without freezing its weights"
    # float sums reordered by the fused kernels: the same image to well under a grey level
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


def test_tiled_vae_is_close_to_untiled(tiny_checkpoint):
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu")
    latents = pipe.txt2img("x", width=64, height=64, seed=0, output_type="latent", **FAST)
    whole = pipe.decode(latents)
    pipe.vae_tiling, pipe.vae_tile_size = True, 32
    tiled = pipe.decode(latents)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.5 * whole.abs().mean()


def test_half_precision_decode_is_finite(tiny_checkpoint):
    pipe = StableDiffusion.from_checkpoint(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16 if hasattr(pipe.unet, "dtype") else True
    images = pipe.txt2img("x", seed=0, width=16, height=16, output_type="tensor", **FAST)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_default_falls_back_to_a_random_model_with_a_warning(monkeypatch, caplog):
    import sd_pipeline.pipeline as pipeline

    monkeypatch.setattr(pipeline, "bundled_checkpoint", lambda: None)
    with caplog.at_level(logging.WARNING, logger="sd_pipeline.pipeline"):
        pipe = StableDiffusion.default(device="cpu")
    assert "RANDOM weights" in caplog.text
    assert pipe.txt2img("a red circle", seed=0, **FAST)[0].size == (64, 64)


def test_diffusers_model_root(tmp_path):
    """A diffusers model root, written by each package's own saver, with its scheduler config."""
    diffusers = pytest.importorskip("diffusers")
    from conftest import write_diffusers_root

    root = tmp_path / "model"
    write_diffusers_root(root, sample_size=4)
    scheduler = diffusers.DDIMScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="linear")
    scheduler.save_pretrained(root / "scheduler")
    pipe = StableDiffusion.from_checkpoint(root, device="cpu")
    assert pipe.native_size == 32
    assert torch.allclose(pipe.schedule.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6)
    assert pipe.txt2img("x", seed=0, **FAST)[0].size == (32, 32)


def test_settings_stored_in_the_checkpoint(tmp_path):
    """sd-pipeline's training writes resolution, prediction and schedule into the file."""
    import json

    path = tmp_path / "trained.safetensors"
    config = {"resolution": 48, "prediction": "v", "schedule": {"beta_start": 0.001,
              "beta_end": 0.02, "num_timesteps": 500}}  # fmt: skip
    save_file(checkpoint_state(), str(path), metadata={"sd_pipeline.config": json.dumps(config)})
    pipe = StableDiffusion.from_checkpoint(path, device="cpu")
    assert (pipe.native_size, pipe.prediction, len(pipe.schedule)) == (48, "v", 500)
    assert pipe.txt2img("x", seed=0, **FAST)[0].size == (48, 48)


def test_generation_defaults_stored_in_the_checkpoint(tmp_path):
    """A model file can name the steps, sampler and guidance that suit it; calls that leave
    them out use those, calls that give them win, and the PNG parameters say what ran."""
    import json

    path = tmp_path / "trained.safetensors"
    config = {"resolution": 32, "steps": 3, "sampler": "ddim", "guidance_scale": 2.5}
    save_file(checkpoint_state(), str(path), metadata={"sd_pipeline.config": json.dumps(config)})
    pipe = StableDiffusion.from_checkpoint(path, device="cpu")
    assert pipe.defaults == {"steps": 3, "sampler": "ddim", "guidance_scale": 2.5}
    calls = []
    image = pipe.txt2img("x", seed=0, progress=False, callback=calls.append)[0]
    assert len(calls) == 3
    text = image.info["parameters"]
    assert "Steps: 3, Sampler: DDIM, CFG scale: 2.5" in text  # A1111 names the sampler
    calls.clear()
    image = pipe.txt2img("x", seed=0, steps=2, sampler="euler", progress=False,
                         callback=calls.append)[0]  # fmt: skip
    assert len(calls) == 2 and "Sampler: Euler," in image.info["parameters"]
    plain = StableDiffusion.from_checkpoint(write_checkpoint(tmp_path / "plain.safetensors"))
    assert plain.defaults == {"steps": 20, "guidance_scale": 7.5, "sampler": "euler_a"}


def test_inpaint_pastes_the_original_pixels_back_outside_the_mask(tiny_pipe):
    """As AUTOMATIC1111: the kept region is the original picture, not its VAE round trip; with
    a blurred mask the blend follows the blurred mask; keep_unmasked=False turns it off."""
    image = _image(32)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))
    original = pil_to_tensor(image)
    out = tiny_pipe.inpaint("x", image, mask, seed=0, output_type="tensor", **FAST)
    keep = pil_to_tensor(mask.convert("RGB"))[:, :1] < 0  # black = keep
    assert torch.equal(out[:, :, keep[0, 0]], original[:, :, keep[0, 0]])
    assert not torch.allclose(out[..., :16, :16], original[..., :16, :16])
    pictures = tiny_pipe.inpaint("x", image, mask, seed=0, **FAST)
    kept = np.asarray(pictures[0])[16:, 16:]
    assert np.array_equal(kept, np.asarray(image)[16:, 16:])
    raw = tiny_pipe.inpaint("x", image, mask, seed=0, keep_unmasked=False, output_type="tensor",
                            **FAST)  # fmt: skip
    assert not torch.allclose(raw[..., 16:, 16:], original[..., 16:, 16:], atol=1e-3)
    blurred = tiny_pipe.inpaint("x", image, mask, seed=0, mask_blur=3, output_type="tensor",
                                **FAST)  # fmt: skip
    assert torch.equal(blurred[..., 28:, 28:], original[..., 28:, 28:])  # far from the edge
    edge = (blurred - original)[..., 14:18, 14:18].abs().mean()
    assert 0 < edge < (raw - original)[..., :16, :16].abs().mean()


def test_constructor_leaves_the_parts_alone():
    """StableDiffusion(...) neither moves, casts, freezes nor switches the modes of the parts."""
    from sd_pipeline.loading import random_parts

    parts = random_parts()
    for part in parts.values():
        part.train()
    pipe = StableDiffusion(**parts, native_size=32, dtype=torch.float32)
    assert all(p.training for p in parts.values())
    assert all(q.requires_grad for p in parts.values() for q in p.parameters())
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.txt2img("x", seed=0, output_type="latent", **FAST).shape == (1, 4, 4, 4)
    assert all(q.requires_grad for p in parts.values() for q in p.parameters())


def test_save_writes_a_single_file_that_loads_back(tiny_pipe, tmp_path):
    import safetensors

    from sd_unet import UNet
    from sd_vae import AutoencoderKL

    path = tiny_pipe.save(tmp_path / "model.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith(tuple(PREFIXES.values())) for k in keys)
    assert {"sd_vae.config", "sd_clip.config", "sd_unet.config", "sd_pipeline.config"} <= set(meta)
    again = StableDiffusion.from_checkpoint(path, device="cpu")
    assert again.native_size == tiny_pipe.native_size and again.defaults == tiny_pipe.defaults
    assert torch.equal(
        again.txt2img("x", seed=0, output_type="latent", **FAST),
        tiny_pipe.txt2img("x", seed=0, output_type="latent", **FAST),
    )
    # each package's own loader reads its part of the file
    assert torch.equal(UNet.from_checkpoint(path).out[2].weight, tiny_pipe.unet.out[2].weight)
    assert AutoencoderKL.from_checkpoint(path).config == tiny_pipe.vae.config
    half = tiny_pipe.save(tmp_path / "half.safetensors", dtype="float16")
    with safetensors.safe_open(str(half), "pt") as f:
        assert f.get_tensor(keys[0]).dtype == torch.float16


def test_loaded_parts_are_frozen_for_inference(tiny_pipe):
    """from_checkpoint freezes what it loads (the constructor leaves given parts alone), so
    calling a step outside run() builds no autograd graph."""
    for part in (tiny_pipe.vae, tiny_pipe.text_encoder, tiny_pipe.unet):
        assert not any(p.requires_grad for p in part.parameters()) and not part.training
    latents = torch.zeros(1, 4, 4, 4)
    assert tiny_pipe.decode(latents).grad_fn is None
