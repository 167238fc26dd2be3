"""The text encoder on its own: shapes, causality, clip skip, the rotary option, bad input."""

import dataclasses

import pytest
import torch

import sd_clip.text_model as text_model
from sd_clip import CLIPTextConfig, CLIPTextModel

ROTARY = dataclasses.replace(CLIPTextConfig.tiny(), position_embedding="rotary")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig.tiny()).eval()


@pytest.fixture(scope="module")
def rotary():
    torch.manual_seed(1)
    return CLIPTextModel(ROTARY).eval()


def ids(batch=2, length=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49408, (batch, length), generator=g)


def test_presets():
    sd15 = CLIPTextConfig.sd15()
    assert (sd15.width, sd15.layers, sd15.heads, sd15.mlp_width) == (768, 12, 12, 3072)
    assert (sd15.max_positions, sd15.vocab_size, sd15.activation) == (77, 49408, "quick_gelu")
    sd2 = CLIPTextConfig.sd2()
    assert (sd2.width, sd2.layers, sd2.heads, sd2.mlp_width, sd2.activation) == (
        1024,
        23,
        16,
        4096,
        "gelu",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        sd15.width = 1  # type: ignore[misc]


def test_sd15_parameter_count():
    with torch.device("meta"):
        m = CLIPTextModel(CLIPTextConfig.sd15())
    assert (
        m.num_parameters() == 123_060_480
    )  # CLIP ViT-L/14's text tower, as transformers counts it


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=100, heads=3), "not divisible"),
        (dict(activation="relu"), "quick_gelu, gelu"),
        (dict(position_embedding="sinusoid"), "learned, rotary"),
        (dict(layers=0), "layers must be a positive"),
        (dict(width=12, heads=4, position_embedding="rotary"), "even head size"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig(**kwargs)


@pytest.mark.parametrize("shape", [(2, 77), (1, 5)])
def test_shapes(model, shape):
    x = ids(*shape)
    with torch.no_grad():
        assert model(x).shape == (*shape, 128)
        assert model(x, clip_skip=2).shape == (*shape, 128)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32


def test_output_is_layer_normed(model):
    # The final LayerNorm is applied after the last and after the penultimate layer alike.
    ln = model.text_model.final_layer_norm
    with torch.no_grad():
        for skip in (1, 2):
            out = model(ids(1, 9), clip_skip=skip)
            normed = (out - ln.bias) / ln.weight
            torch.testing.assert_close(normed.mean(-1), torch.zeros(1, 9), atol=1e-4, rtol=0)
            torch.testing.assert_close(
                normed.std(-1, unbiased=False), torch.ones(1, 9), atol=1e-3, rtol=0
            )


def test_clip_skip_is_a_layer_earlier(model):
    # clip_skip=2 is what the model gives when its last layer is removed.
    x = ids(1, 12)
    shorter = CLIPTextModel(CLIPTextConfig.tiny()).eval()
    state = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    shorter.text_model.encoder.layers = shorter.text_model.encoder.layers[:1]
    shorter.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(x, clip_skip=2), shorter(x), rtol=0, atol=0)
        assert not torch.allclose(model(x), model(x, clip_skip=2))


@pytest.mark.parametrize("fixture", ["model", "rotary"])
def test_causal(fixture, request):
    # Changing token t leaves every output before t untouched, and changes those from t on.
    m = request.getfixturevalue(fixture)
    a = ids(1, 20)
    b = a.clone()
    b[0, 12] = (a[0, 12] + 1) % 49408
    with torch.no_grad():
        ya, yb = m(a), m(b)
    torch.testing.assert_close(ya[:, :12], yb[:, :12], rtol=0, atol=0)
    assert (ya[:, 12:] - yb[:, 12:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("clip_skip", [0, 3, 1.0, True])
def test_clip_skip_out_of_range(model, clip_skip):
    with pytest.raises(ValueError, match=r"clip_skip must be an integer from 1 .* to 2"):
        model(ids(1, 4), clip_skip=clip_skip)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.zeros(2, 78, dtype=torch.long), ValueError, "78 tokens do not fit the 77 positions"),
        (torch.full((1, 3), 49408), ValueError, r"in \[0, 49408\), got values from 49408"),
        (torch.full((1, 3), -1), ValueError, "got values from -1"),
        (torch.zeros(1, 3), TypeError, "integer tensor .* got torch.float32"),
        ([[49406, 49407]], TypeError, "got list"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"shape \(batch, tokens\), got \(3,\)"),
    ],
)
def test_bad_ids(model, bad, error, match):
    with pytest.raises(error, match=match):
        model(bad)


# -- rotary position encodings ---------------------------------------------------------------


def test_rotary_shapes_and_parameters(rotary):
    names = dict(rotary.named_parameters())
    assert "text_model.embeddings.position_embedding.weight" not in names
    assert (
        rotary.num_parameters() == CLIPTextModel(CLIPTextConfig.tiny()).num_parameters() - 77 * 128
    )
    with torch.no_grad():
        assert rotary(ids(2, 77)).shape == (2, 77, 128)
        assert rotary(ids(1, 100)).shape == (1, 100, 128)  # no table, so no length limit


def test_rotary_dot_products_depend_on_offset_only():
    # <R(m) q, R(n) k> is a function of m - n: shifting both positions leaves it unchanged.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g).unbind(0)
    cos, sin = text_model.rotary_tables(40, 16, 10000.0)

    def score(m, n):
        return text_model.apply_rotary(q, cos[m], sin[m]) @ text_model.apply_rotary(
            k, cos[n], sin[n]
        )

    for m, n in [(5, 2), (9, 9), (3, 0)]:
        for shift in (1, 7, 30):
            torch.testing.assert_close(
                score(m + shift, n + shift), score(m, n), atol=1e-5, rtol=1e-5
            )
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # while the offset itself matters
    torch.testing.assert_close(  # and a rotation keeps each vector's length
        text_model.apply_rotary(q, cos[17], sin[17]).norm(), q.norm(), atol=1e-5, rtol=1e-5
    )


def test_rotary_attention_is_invariant_to_a_position_shift(rotary, monkeypatch):
    # Numbering the tokens from 11 instead of 0 gives the same attention output: only relative
    # positions reach the scores.
    attn = rotary.text_model.encoder.layers[0].self_attn
    x = torch.randn(2, 30, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = attn(x)
        original = text_model.rotary_tables

        def shifted(length, *args):
            cos, sin = original(length + 11, *args)
            return cos[11:], sin[11:]

        monkeypatch.setattr(text_model, "rotary_tables", shifted)
        moved = attn(x)
    torch.testing.assert_close(moved, reference, atol=1e-5, rtol=1e-5)
    assert not torch.equal(moved, reference)  # the tables were really shifted


def test_rotary_model_sees_order(rotary):
    # Without position information, causal attention would make the last output blind to the order
    # of the earlier tokens; with rotary encodings, swapping two of them changes it.
    a = ids(1, 10, seed=4)
    b = a.clone()
    b[0, [2, 6]] = a[0, [6, 2]]
    with torch.no_grad():
        assert (rotary(a)[0, -1] - rotary(b)[0, -1]).abs().max() > 1e-4


def test_building_on_the_meta_device_initialises_nothing():
    """The loaders build the model on the meta device: no weight initialisation runs there (the
    first normal_ on a meta tensor imports torch's compiler stack, seconds of a cold start)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from sd_clip import CLIPTextModel, CLIPTextConfig\n"
        "with torch.device('meta'):\n"
        "    CLIPTextModel(CLIPTextConfig.sd15())\n"
        "assert 'torch._dynamo' not in sys.modules, 'the compiler stack was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
