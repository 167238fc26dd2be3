"""Generation features beyond the basics (issue 22): variation seeds, seed resizing, the RNG
sources, batch count and the hires fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sd_pipeline import GenerationParameters, GenerationRequest, RequestError
from sd_pipeline.hires import upscale_latents
from sd_pipeline.noise import image_noise, philox_randn, randn, slerp
from sd_pipeline.request import HiresFix

FAST = dict(steps=3, progress=False, sampler="euler")


def test_nv_rng_gives_torch_cudas_numbers():
    """torch.randn(4, device="cuda") after torch.manual_seed(0) prints
    tensor([-0.9247, -0.4253, -2.6438,  0.1452]) on every NVIDIA GPU (PyTorch's documentation
    and countless notebooks show it); the emulation must give the same."""
    first = philox_randn(0, (4,))
    torch.testing.assert_close(first, torch.tensor([-0.9247, -0.4253, -2.6438, 0.1452]),
                               atol=1e-4, rtol=0)  # fmt: skip
    big = philox_randn(12345, (4, 64, 64))
    assert abs(big.mean().item()) < 0.03 and abs(big.std().item() - 1) < 0.03
    assert not torch.equal(philox_randn(1, (8,)), philox_randn(2, (8,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nv_rng_equals_the_gpu_rng_on_cuda():
    cuda = torch.device("cuda")
    torch.testing.assert_close(randn(7, (4, 8, 8), "nv"), randn(7, (4, 8, 8), "gpu", cuda))


def test_cpu_rng_is_torchs_cpu_generator():
    expected = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(randn(5, (4, 8, 8), "cpu"), expected)
    with pytest.raises(ValueError, match=r"rng 'gpu' .* needs a CUDA device"):
        randn(5, (4, 8, 8), "gpu", torch.device("cpu"))


def test_slerp_ends_and_middle():
    a, b = randn(1, (4, 8, 8)), randn(2, (4, 8, 8))
    assert torch.equal(slerp(0.0, a, b), a) and torch.equal(slerp(1.0, a, b), b)
    # two orthogonal unit vectors along H: a third of the way is 30 degrees from the first
    e1, e2 = torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.0], [1.0]]])
    third = slerp(1 / 3, e1, e2)
    torch.testing.assert_close(third[0, :, 0], torch.tensor([3**0.5 / 2, 0.5]))


def test_seed_resize_pastes_the_smaller_noise_centred():
    small = randn(3, (4, 4, 6))
    big = image_noise(3, (4, 8, 8), resize_from=(4, 6))
    assert torch.equal(big[:, 2:6, 1:7], small)
    larger = image_noise(3, (4, 4, 4), resize_from=(8, 8))
    assert torch.equal(larger, randn(3, (4, 8, 8))[:, 2:6, 2:6])


def test_subseed_strength_zero_and_one_equal_the_plain_seeds(tiny_pipe):
    plain = tiny_pipe.txt2img("x", seed=1, output_type="latent", **FAST)
    other = tiny_pipe.txt2img("x", seed=2, output_type="latent", **FAST)
    zero = tiny_pipe.txt2img("x", seed=1, subseed=2, subseed_strength=0.0,
                             output_type="latent", **FAST)  # fmt: skip
    one = tiny_pipe.txt2img("x", seed=1, subseed=2, subseed_strength=1.0,
                            output_type="latent", **FAST)  # fmt: skip
    assert torch.equal(zero, plain) and torch.equal(one, other)
    half = tiny_pipe.txt2img("x", seed=1, subseed=2, subseed_strength=0.5, **FAST)[0]
    params = GenerationParameters.from_text(half.info["parameters"])
    assert params.extra["Variation seed"] == "2"
    assert params.extra["Variation seed strength"] == "0.5"


def test_batch_count_continues_the_seeds(tiny_pipe):
    both = tiny_pipe.txt2img("x", seed=10, batch_size=2, n_iter=2, output_type="latent", **FAST)
    assert both.shape[0] == 4
    for i in range(4):
        single = tiny_pipe.txt2img("x", seed=10 + i, output_type="latent", **FAST)
        # a batched matmul sums in another order: equal to rounding, relative to the scale
        assert ((both[i : i + 1] - single).abs().max() / single.abs().max()).item() < 1e-3
    pictures = tiny_pipe.txt2img("x", seed=10, n_iter=3, **FAST)
    seeds = [GenerationParameters.from_text(p.info["parameters"]).seed for p in pictures]
    assert seeds == [10, 11, 12]


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "latent-bicubic-antialiased"])
def test_hires_fix_equals_the_two_passes_by_hand(tiny_pipe, upscaler):
    hires = HiresFix(scale=1.5, steps=4, denoise=0.6, upscaler=upscaler)
    out = tiny_pipe.txt2img("x", seed=3, width=32, height=32, hires=hires,
                            output_type="latent", **FAST)  # fmt: skip
    first = tiny_pipe.txt2img("x", seed=3, width=32, height=32, output_type="latent", **FAST)
    up = upscale_latents(first, (6, 6), upscaler)
    second = tiny_pipe.img2img("x", init_latents=up, strength=0.6, seed=3, output_type="latent",
                               **{**FAST, "steps": 4})  # fmt: skip
    assert out.shape == (1, 4, 6, 6)
    torch.testing.assert_close(out, second)


def test_hires_fix_in_pixel_space_and_its_metadata(tiny_pipe):
    hires = HiresFix(scale=2, denoise=0.5, upscaler="lanczos", sampler="dpmpp_2m")
    picture = tiny_pipe.txt2img("x", seed=3, width=16, height=16, hires=hires, **FAST)[0]
    assert picture.size == (32, 32)
    params = GenerationParameters.from_text(picture.info["parameters"])
    assert (params.width, params.height, params.denoising_strength) == (16, 16, 0.5)
    assert params.extra["Hires upscale"] == "2" and params.extra["Hires upscaler"] == "Lanczos"
    assert params.extra["Hires sampler"] == "DPM++ 2M"


def test_hires_and_seed_extras_are_checked():
    base = GenerationRequest(prompts=("x",), steps=2, sampler="euler", guidance_scale=2)
    for bad, match in [
        (dict(hires=HiresFix(upscaler="esrgan")), "hires.upscaler 'esrgan' is unknown"),
        (dict(hires=HiresFix(scale=0.5)), "hires.scale must be at least 1"),
        (dict(subseed_strength=1.5), r"subseed_strength must be in \[0, 1\]"),
        (dict(rng="mps"), "rng is 'mps'; choose from: cpu, gpu, nv"),
        (dict(n_iter=0), "n_iter must be a positive integer"),
        (dict(n_iter=1000), "n_iter must be at most 100"),
        (dict(seed_resize_from=(0, 8)), "seed_resize_from must be at least 8"),
    ]:
        with pytest.raises(RequestError, match=match):
            dataclasses.replace(base, **bad).check()
