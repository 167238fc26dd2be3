"""Live previews (AUTOMATIC1111's Approx cheap) and stopping a run from its callback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sd_pipeline import StopSampling
from sd_pipeline.previews import cheap_preview, latent_preview, latent_space

# AUTOMATIC1111's cheap_approximation table for SD 1.x latents, typed from its source.
A1111_SD1 = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
]


def test_cheap_preview_is_the_linear_map():
    latents = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 0.5
    expected = torch.zeros(2, 3, 6, 5)
    for c in range(4):
        for r in range(3):
            expected[:, r] += latents[:, c] * A1111_SD1[c][r]
    torch.testing.assert_close(cheap_preview(latents), expected.clamp(-1, 1))
    pictures = latent_preview(latents, size=(40, 48))
    assert len(pictures) == 2 and pictures[0].size == (40, 48)
    assert latent_preview(latents)[0].size == (5, 6)  # latent resolution by default
    with pytest.raises(ValueError, match="unknown latent space 'sd3'"):
        cheap_preview(latents, "sd3")


def test_the_cheap_table_is_chosen_by_the_vae_it_was_fitted_to():
    from types import SimpleNamespace

    from sd_vae import AutoencoderKLConfig

    def space(config):
        return latent_space(SimpleNamespace(config=config))

    assert space(AutoencoderKLConfig.sd15()) == "sd1"
    assert space(AutoencoderKLConfig.sdxl()) == "sdxl"
    assert space(AutoencoderKLConfig.tiny()) is None  # another latent space: no table
    assert space(dataclasses.replace(AutoencoderKLConfig.sd15(), scaling_factor=0.5)) is None


def test_previews_without_a_table_are_the_vaes_own_decode(tiny_pipe):
    """On a model whose VAE no cheap table fits, the preview of the last step is the image."""
    from sd_pipeline.previews import preview_callback

    got = []
    callback = preview_callback(lambda d, pictures: got.append(pictures[0]), vae=tiny_pipe.vae)
    image = tiny_pipe.txt2img("x", seed=0, steps=3, sampler="euler", callback=callback,
                              progress=False)[0]  # fmt: skip
    assert len(got) == 3 and got[-1].size == image.size
    difference = np.abs(np.asarray(got[-1], float) - np.asarray(image, float))
    assert difference.max() <= 1  # the same decode, up to rounding to 8 bits


def test_model_preview_picks_the_table_or_the_vae(tiny_pipe):
    from types import SimpleNamespace

    from sd_pipeline.previews import model_preview
    from sd_vae import AutoencoderKLConfig

    latents = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(0))
    sd_like = SimpleNamespace(config=AutoencoderKLConfig.sd15())
    torch.testing.assert_close(model_preview(latents, sd_like), cheap_preview(latents))
    vae = tiny_pipe.vae
    with torch.inference_mode():
        decoded = vae.decode(latents / vae.config.scaling_factor).clamp(-1, 1)
    torch.testing.assert_close(model_preview(latents, vae), decoded)


def test_a_callback_can_stop_the_run_and_get_what_there_is(tiny_pipe):
    seen = []

    def stop_at_second_step(d):
        seen.append(d["denoised"].clone())
        if d["i"] == 1:
            raise StopSampling

    out = tiny_pipe.txt2img("x", seed=0, steps=6, sampler="euler", callback=stop_at_second_step,
                            output_type="latent", progress=False)  # fmt: skip
    assert len(seen) == 2
    torch.testing.assert_close(out, seen[-1])
    full = tiny_pipe.txt2img("x", seed=0, steps=6, sampler="euler", output_type="latent",
                             progress=False)  # fmt: skip
    assert not torch.allclose(out, full)
    images = tiny_pipe.txt2img("x", seed=0, steps=6, callback=stop_at_second_step, progress=False)
    assert len(images) == 1 and images[0].size == (32, 32)


def test_stopping_one_image_of_a_batch_stops_the_rest(tiny_pipe):
    """A sampler that runs a batch one image at a time (DDIM with eta > 0) stops them all."""
    calls = []

    def stop(d):
        calls.append(d["i"])
        raise StopSampling

    out = tiny_pipe.txt2img("x", seed=0, steps=4, sampler="ddim", eta=1.0, batch_size=3,
                            callback=stop, output_type="latent", progress=False)  # fmt: skip
    assert calls == [0] and out.shape[0] == 3
    assert torch.isfinite(out).all()


def test_taesd_previews_are_full_size_and_the_decoders_pictures(tiny_pipe, tmp_path):
    from sd_pipeline.images import tensor_to_pil
    from sd_vae import TinyDecoder

    decoder = TinyDecoder().eval()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    picture = latent_preview(latents, decoder=decoder)[0]
    assert picture.size == (32, 32)
    with torch.no_grad():
        expected = tensor_to_pil(decoder(latents))[0]
    assert picture.tobytes() == expected.tobytes()


def test_preview_callback_hands_previews_to_the_caller(tiny_pipe):
    from sd_pipeline.previews import preview_callback

    got = []
    callback = preview_callback(lambda d, pictures: got.append((d["i"], pictures)), every=2)
    tiny_pipe.txt2img("x", seed=0, steps=5, batch_size=2, callback=callback, progress=False)
    assert [i for i, _ in got] == [0, 2, 4]
    assert all(len(p) == 2 and p[0].size == (4, 4) for _, p in got)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        preview_callback(print, every=0)
