"""AUTOMATIC1111's prompt language through the pipeline: emphasis, long prompts, prompt editing
per step (every sampler, second-order ones too), AND, and textual-inversion embeddings."""

from __future__ import annotations

import pytest
import torch

from sd_clip import Embedding, prompt_schedule
from sd_pipeline import GenerationParameters
from sd_samplers import SAMPLERS

FAST = dict(progress=False, seed=0, output_type="latent")


def _contexts_seen(pipe, monkeypatch, **kwargs):
    """The context of each UNet call during one txt2img."""
    seen = []
    forward = pipe.unet.forward

    def spy(x, t, context, *args, **kw):
        seen.append(context.clone())
        return forward(x, t, context, *args, **kw)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe.txt2img(**kwargs, **FAST)
    monkeypatch.setattr(pipe.unet, "forward", forward)
    return seen


def test_neutral_emphasis_is_the_plain_prompt_and_weights_change_it(tiny_pipe):
    plain = tiny_pipe.txt2img("a red circle", steps=2, **FAST)
    assert torch.equal(tiny_pipe.txt2img("a (red:1.0) circle", steps=2, **FAST), plain)
    assert not torch.allclose(tiny_pipe.txt2img("a (red:1.5) circle", steps=2, **FAST), plain)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "ddim", "dpmpp_sde", "plms"])
def test_prompt_editing_gives_each_step_its_text(tiny_pipe, monkeypatch, sampler):
    steps = 4
    text = "a [cat:dog:2]"
    seen = _contexts_seen(tiny_pipe, monkeypatch, prompt=text, steps=steps, sampler=sampler,
                          guidance_scale=1.0)  # fmt: skip
    schedule = prompt_schedule(text, steps)  # [(2, "a cat"), (4, "a dog")]
    encoded = tiny_pipe.text_encoder.encode_prompt([t for _, t in schedule])
    calls = SAMPLERS[sampler].model_calls(steps)
    assert len(seen) == calls
    # AUTOMATIC1111: 0-based steps 0, 1 and 2 read the entry ending at step 2 ("a cat"), step 3
    # the next; the step advances after each step's calls (a second-order sampler's second call,
    # PLMS's warm-up call belong to their step), and the last step makes one call here
    entries = encoded[:1], encoded[1:]

    def entry(c):  # which text it is: equal to one to float32 rounding (the text encoder's
        # products may round differently in a batch of another size)
        gaps = [(c - e).abs().max().item() for e in entries]
        assert min(gaps) <= 1e-5 * entries[0].abs().max().item() < max(gaps)
        return gaps.index(min(gaps))

    assert [entry(c) for c in seen] == [0] * (calls - 1) + [1]


def test_and_parts_combine_with_their_weights(tiny_pipe):
    base = tiny_pipe.txt2img("a cat", steps=2, guidance_scale=3.0, sampler="euler", **FAST)
    zero = tiny_pipe.txt2img("a cat AND a dog:0", steps=2, guidance_scale=3.0, sampler="euler",
                             **FAST)  # fmt: skip
    # the parts run as their own rows, not the shared-latents batch: equal to float rounding
    # (amplified by random weights), relative to the latents' scale
    assert _relative(zero, base) < 1e-2
    doubled = tiny_pipe.txt2img("a cat:2", steps=2, guidance_scale=3.0, sampler="euler", **FAST)
    six = tiny_pipe.txt2img("a cat", steps=2, guidance_scale=6.0, sampler="euler", **FAST)
    assert _relative(doubled, six) < 1e-2
    both = tiny_pipe.txt2img("a cat AND a dog", steps=2, guidance_scale=3.0, sampler="euler",
                             **FAST)  # fmt: skip
    assert _relative(both, base) > 0.05


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_long_prompts_are_not_cut_and_run_apart_from_a_short_negative(tiny_pipe, monkeypatch):
    long = ", ".join(f"tag{i}" for i in range(60))  # well over 75 tokens
    seen = _contexts_seen(tiny_pipe, monkeypatch, prompt=long, steps=1, sampler="euler",
                          negative_prompt="blurry")  # fmt: skip
    lengths = sorted(c.shape[1] for c in seen)
    # the negative prompt (one chunk) and the prompt (several) in passes of their own
    assert lengths[0] == 77 and lengths[1] > 77 and lengths[1] % 77 == 0
    cut = tiny_pipe.txt2img(", ".join(f"tag{i}" for i in range(20)), steps=1, **FAST)
    assert not torch.allclose(tiny_pipe.txt2img(long, steps=1, **FAST), cut)


def test_embeddings_in_prompt_and_negative_prompt(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    width = tiny_pipe.text_encoder.config.width
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(1))},
              str(folder / "shinystyle.safetensors"))  # fmt: skip
    added = tiny_pipe.load_embeddings(folder)
    try:
        assert set(added) == {"shinystyle"}
        plain = tiny_pipe.txt2img("a cat shinystyle", steps=2, **FAST)
        tiny_pipe.embeddings.clear()
        assert not torch.equal(tiny_pipe.txt2img("a cat shinystyle", steps=2, **FAST), plain)
        tiny_pipe.load_embeddings(folder)
        picture = tiny_pipe.txt2img("a cat", negative_prompt="shinystyle", steps=2,
                                    progress=False, seed=0)[0]  # fmt: skip
        params = GenerationParameters.from_text(picture.info["parameters"])
        assert params.extra["TI hashes"].startswith("shinystyle: ")
    finally:
        tiny_pipe.embeddings.clear()


def test_wrong_width_embedding_names_the_file(tiny_pipe):
    wrong = Embedding("badwidth", torch.zeros(1, tiny_pipe.text_encoder.config.width + 1))
    tiny_pipe.load_embeddings({"badwidth": wrong})
    try:
        with pytest.raises(ValueError, match="badwidth"):
            tiny_pipe.txt2img("badwidth", steps=1, **FAST)
    finally:
        tiny_pipe.embeddings.clear()
