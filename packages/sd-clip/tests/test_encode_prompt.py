"""CLIPTextModel.encode_prompt against the same computation written plainly on transformers.

The reference is transformers' CLIPTextModel with random weights (test_parity.reference), loaded
into ours through the SD checkpoint layout. The plain computation follows AUTOMATIC1111's
``FrozenCLIPEmbedderWithCustomWords``: chunks of 77 built here from hand-written (text, weight)
runs, an embedding's vectors put in by a hook on the token embedding (as AUTOMATIC1111's
``EmbeddingsWithFixes`` does), each output times its weight, scaled back to the unweighted
mean, chunks concatenated.
"""

import pytest
import torch
from safetensors.torch import save_file
from test_parity import reference, sd_layout

from sd_clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Embedding, pad_to_same_length

CONFIG = CLIPTextConfig(width=128, layers=3, heads=2, mlp_width=256)
START, END = 49406, 49407


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = reference(CONFIG, seed=3)
    path = tmp_path_factory.mktemp("clip") / "sd.safetensors"
    save_file(sd_layout(ref), str(path))
    return ref, CLIPTextModel.from_checkpoint(path, config=CONFIG)


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def tokens(tok, text):
    return tok.encode(text)[1:-1]


def plain_chunks(tok, runs):
    """(ids, weights, fixes) rows from (text or Embedding, weight) runs that need no comma rule."""
    ids, weights, fixes = [], [], []
    for what, weight in runs:
        if isinstance(what, Embedding):
            if len(ids) % 75 + what.num_vectors > 75:  # never split: pad to the next chunk
                pad = 75 - len(ids) % 75
                ids, weights = ids + [END] * pad, weights + [1.0] * pad
            fixes.append((len(ids), what))
            ids, weights = ids + [0] * what.num_vectors, weights + [weight] * what.num_vectors
        else:
            t = tokens(tok, what)
            ids, weights = ids + t, weights + [weight] * len(t)
    count = max(1, -(-len(ids) // 75))
    ids += [END] * (75 * count - len(ids))
    weights += [1.0] * (75 * count - len(weights))
    rows = []
    for c in range(count):
        body = slice(75 * c, 75 * (c + 1))
        chunk_fixes = [(p - 75 * c + 1, e) for p, e in fixes if body.start <= p < body.stop]
        rows.append(([START, *ids[body], END], [1.0, *weights[body], 1.0], chunk_fixes))
    return rows


def plain_encode(ref, rows, clip_skip=1, normalize=True):
    """AUTOMATIC1111's computation on transformers' model, one chunk at a time."""
    inner = getattr(ref, "text_model", ref)
    outputs = []
    for ids, weights, fixes in rows:

        def put_vectors(module, args, out, fixes=fixes):
            out = out.clone()
            for position, e in fixes:
                out[0, position : position + e.num_vectors] = e.vectors_for(out.shape[-1])
            return out

        hook = inner.embeddings.token_embedding.register_forward_hook(put_vectors)
        try:
            with torch.no_grad():
                out = ref(input_ids=torch.tensor([ids]), output_hidden_states=True)
        finally:
            hook.remove()
        z = out.last_hidden_state
        if clip_skip > 1:
            z = inner.final_layer_norm(out.hidden_states[-clip_skip])
        mean = z.mean()
        z = z * torch.tensor(weights)[None, :, None]
        if normalize:
            z = z * (mean / z.mean())
        outputs.append(z)
    return torch.cat(outputs, dim=1)


def check(got, want, tol=2e-5):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err
    return err


RUNS = [("a photograph of an ", 1.0), ("astronaut", 1.5730000000000004), (" riding a ", 1.0)]
RUNS += [("horse", 1.1), (" on ", 1.0), ("mars", 0.9090909090909091)]
TEXT = "a photograph of an (((astronaut:1.3))) riding a (horse) on [mars]"


@pytest.mark.parametrize("clip_skip", [None, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_prompt(models, tok, clip_skip, normalize):
    ref, ours = models
    want = plain_encode(ref, plain_chunks(tok, RUNS), clip_skip or 1, normalize)
    with torch.no_grad():
        got = ours.encode_prompt(TEXT, tok, clip_skip=clip_skip, normalize=normalize)
    check(got, want)
    assert not torch.allclose(got, plain_encode(ref, plain_chunks(tok, [(TEXT, 1.0)])), atol=1e-3)


def test_long_prompt_in_chunks(models, tok):
    # 4 weighted runs of 45 tokens: 180 tokens, 3 chunks, cut at 75 and 150 (no commas).
    words = [
        "red",
        "green",
        "blue",
        "yellow",
        "orange",
        "purple",
        "black",
        "white",
        "pink",
        "brown",
        "gray",
    ]
    runs = [
        (" ".join(words[(i + k) % len(words)] for k in range(45)), w)
        for i, w in enumerate([1.0, 1.1, 1.2, 1.3])
    ]
    assert sum(len(tokens(tok, t)) for t, _ in runs) == 180
    text = " ".join(f"({t}:{w})" for t, w in runs)
    ref, ours = models
    with torch.no_grad():
        got = ours.encode_prompt(text, tok)
    assert got.shape == (1, 3 * 77, CONFIG.width)
    check(got, plain_encode(ref, plain_chunks(tok, runs)))


def test_embeddings_across_a_chunk_boundary(models, tok):
    g = torch.Generator().manual_seed(0)
    easy = Embedding("easyneg", torch.randn(4, CONFIG.width, generator=g))
    style = Embedding("mystyle", torch.randn(2, CONFIG.width, generator=g))
    filler = " ".join(["cat"] * 72)  # 72 + 4 > 75: easyneg opens the second chunk
    runs = [(filler + " ", 1.0), (easy, 1.0), (" and ", 1.0), (style, 1.2), (" dog", 1.0)]
    text = f"{filler} easyneg and (mystyle:1.2) dog"
    ref, ours = models
    with torch.no_grad():
        got = ours.encode_prompt(text, tok, {"easyneg": easy, "mystyle": style})
    assert got.shape == (1, 154, CONFIG.width)
    check(got, plain_encode(ref, plain_chunks(tok, runs)))


def test_negative_embedding_in_its_own_prompt(models, tok):
    neg = Embedding("badhands", torch.randn(3, CONFIG.width))
    ref, ours = models
    with torch.no_grad():
        got = ours.encode_prompt("(badhands:0.8), blurry", tok, [neg])
    check(got, plain_encode(ref, plain_chunks(tok, [(neg, 0.8), (", blurry", 1.0)])))


def test_one_forward_pass_for_all_chunks(models, tok):
    # 300 token positions with 3 embeddings: 4 chunks, encoded as 4 rows of one forward pass.
    ref, ours = models
    embeddings = {n: Embedding(n, torch.randn(4, CONFIG.width)) for n in ("ea", "eb", "ec")}
    text = (
        " ".join(" ".join(["cat"] * 71) + " " + n for n in embeddings)
        + " "
        + " ".join(["cat"] * 75)
    )
    calls = []
    hook = ours.text_model.embeddings.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    try:
        with torch.no_grad():
            got = ours.encode_prompt(text, tok, embeddings)
    finally:
        hook.remove()
    assert [shape[0] for shape in calls] == [4]
    assert got.shape == (1, 4 * 77, CONFIG.width)
    runs = [(" ".join(["cat"] * 71) + " ", 1.0), (embeddings["ea"], 1.0), (" ", 1.0)]
    runs += [(" ".join(["cat"] * 71) + " ", 1.0), (embeddings["eb"], 1.0), (" ", 1.0)]
    runs += [(" ".join(["cat"] * 71) + " ", 1.0), (embeddings["ec"], 1.0), (" ", 1.0)]
    check(got, plain_encode(ref, plain_chunks(tok, [*runs, (" ".join(["cat"] * 75), 1.0)])))


def test_a_list_of_texts_is_normalised_together(models, tok):
    # AUTOMATIC1111 encodes one prompt's schedule texts in one batch: a short text is padded with
    # the empty prompt's chunk, and chunk i is scaled by the mean over the batch's chunk i.
    ref, ours = models
    dogs = " ".join(["dog"] * 80)
    with torch.no_grad():
        got = ours.encode_prompt(["(cat:1.4)", dogs], tok)
    weighted = plain_encode(ref, plain_chunks(tok, [("cat", 1.4)]), normalize=False)
    unweighted = plain_encode(ref, plain_chunks(tok, [("cat", 1.0)]), normalize=False)
    long = plain_encode(ref, plain_chunks(tok, [(dogs, 1.0)]), normalize=False)
    empty = plain_encode(ref, plain_chunks(tok, [("", 1.0)]), normalize=False)
    first = torch.cat([weighted, long[:, :77]])
    scale = torch.cat([unweighted, long[:, :77]]).mean() / first.mean()
    assert got.shape == (2, 154, CONFIG.width)
    check(got[:, :77], first * scale)
    check(got[:, 77:], torch.cat([empty, long[:, 77:]]))


def test_wrong_width_names_the_file_and_widths(models, tok, tmp_path):
    e = Embedding(
        "sdxl",
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
        path=tmp_path / "sdxl.safetensors",
    )
    _, ours = models
    with pytest.raises(ValueError, match=r"sdxl\.safetensors.*768 or 1280 wide.*128 wide"):
        ours.encode_prompt("a sdxl", tok, [e])
    ours.encode_prompt("a cat", tok, [e])  # not used: no error


def test_sdxl_embedding_picks_its_encoders_vectors(models, tok):
    ref, ours = models
    clip_l = torch.randn(2, CONFIG.width)
    e = Embedding("both", {"clip_l": clip_l, "clip_g": torch.randn(2, 1280)})
    with torch.no_grad():
        got = ours.encode_prompt("both", tok, [e])
    check(got, plain_encode(ref, plain_chunks(tok, [(Embedding("l", clip_l), 1.0)])))


def test_empty_and_bad_inputs(models, tok):
    _, ours = models
    with torch.no_grad():
        assert ours.encode_prompt("", tok).shape == (1, 77, CONFIG.width)
    with pytest.raises(TypeError, match="str or a non-empty list"):
        ours.encode_prompt([], tok)
    with pytest.raises(TypeError, match="CLIPTokenizer"):
        ours.encode_prompt("a", tokenizer="tok")
    with pytest.raises(ValueError, match="clip_skip"):
        ours.encode_prompt("a", tok, clip_skip=9)


def test_inputs_embeds_match_ids(models):
    _, ours = models
    ids = torch.randint(0, 49408, (2, 77))
    with torch.no_grad():
        embeds = ours.text_model.embeddings.token_embedding(ids)
        assert torch.equal(ours(None, inputs_embeds=embeds), ours(ids))
        assert torch.equal(ours(ids, 2, inputs_embeds=embeds), ours(ids, 2))
    with pytest.raises(ValueError, match="inputs_embeds must be a tensor"):
        ours(None, inputs_embeds=torch.zeros(1, 77, 3))
    with pytest.raises(ValueError, match="same batch and token count"):
        ours(ids[:1], inputs_embeds=embeds)


def test_pad_to_same_length():
    a, b = torch.randn(1, 77, 4), torch.randn(1, 231, 4)
    empty = torch.randn(1, 77, 4)
    pa, pb = pad_to_same_length(a, b, empty=empty)
    assert pb is b and torch.equal(pa, torch.cat([a, empty, empty], dim=1))
    la, _ = pad_to_same_length(a, b)  # the AND parts' rule: repeat the last vector
    assert torch.equal(la[:, 77:], a[:, -1:].expand(1, 154, 4))
    with pytest.raises(ValueError, match="divides"):
        pad_to_same_length(a, b, empty=torch.randn(1, 50, 4))


def test_gradients_reach_an_embedding_in_memory(models, tok):
    # Textual-inversion training: an Embedding built on a trainable tensor gets its gradient.
    _, ours = models
    vectors = torch.randn(2, CONFIG.width, requires_grad=True)
    ours.encode_prompt("a (trained:1.2) cat", tok, [Embedding("trained", vectors)]).sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    ours.zero_grad()


def test_repeated_texts_are_encoded_once(models, tok):
    # A schedule such as [a|b] repeats its texts; the mean still counts every repeat.
    _, ours = models
    dogs = " ".join(["dog"] * 80)
    texts = ["(cat:1.4)", "(cat:1.4)", dogs]
    calls = []
    hook = ours.text_model.embeddings.register_forward_hook(lambda m, a, o: calls.append(o.shape))
    try:
        with torch.no_grad():
            got = ours.encode_prompt(texts, tok)
    finally:
        hook.remove()
    assert [shape[0] for shape in calls] == [4]  # cat, dogs x2, the empty padding chunk
    ref, _ = models
    weighted = plain_encode(ref, plain_chunks(tok, [("cat", 1.4)]), normalize=False)
    unweighted = plain_encode(ref, plain_chunks(tok, [("cat", 1.0)]), normalize=False)
    long = plain_encode(ref, plain_chunks(tok, [(dogs, 1.0)]), normalize=False)
    first = torch.cat([weighted, weighted, long[:, :77]])
    scale = torch.cat([unweighted, unweighted, long[:, :77]]).mean() / first.mean()
    check(got[:, :77], first * scale)
