"""CLIPTokenizer.chunks: 75-token chunks, BREAK, the comma rule, weights, embedding slots.

Every expectation is written out by hand from AUTOMATIC1111's rules (``tokenize_line`` in its
``modules/sd_hijack_clip.py``), with words that are one token each: "cat" is 2368, "," 267.
"""

import pytest
import torch

from sd_clip import Chunk, CLIPTokenizer, Embedding, EmbeddingSlot

START, END, CAT, COMMA, DOG = 49406, 49407, 2368, 267, 1929


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def cats(n):
    return " ".join(["cat"] * n)


def row(tokens, pad=END):
    """A chunk's ids as AUTOMATIC1111 writes them: start, tokens, end, padding to 77."""
    return [START, *tokens, END] + [pad] * (75 - len(tokens))


def test_empty_prompt_is_one_chunk(tok):
    (chunk,) = tok.chunks("")
    assert chunk == Chunk(row([]), [1.0] * 77, [])


def test_padding_follows_the_tokenizer(tok):
    (chunk,) = CLIPTokenizer(pad_id=0).chunks("cat")  # SD 2.x pads with "!"
    assert chunk.ids == row([CAT], pad=0)


def test_75_tokens_fit_one_chunk_76_need_two(tok):
    assert [c.ids for c in tok.chunks(cats(75))] == [row([CAT] * 75)]
    assert [c.ids for c in tok.chunks(cats(76))] == [row([CAT] * 75), row([CAT])]
    assert len(tok.chunks(cats(300))) == 4


def test_weights_per_token(tok):
    (chunk,) = tok.chunks("(cat:1.5) dog [cat]")
    assert chunk.ids[:5] == [START, CAT, DOG, CAT, END]
    assert chunk.weights[:5] == [1.0, 1.5, 1.0, 1 / 1.1, 1.0]
    assert chunk.weights[5:] == [1.0] * 72


def test_break(tok):
    assert [c.ids for c in tok.chunks("cat BREAK dog")] == [row([CAT]), row([DOG])]
    assert [c.ids for c in tok.chunks("BREAK cat")] == [row([]), row([CAT])]
    assert [c.ids for c in tok.chunks("cat BREAK")] == [row([CAT])]
    assert [c.ids for c in tok.chunks("cat BREAK BREAK dog")] == [row([CAT]), row([]), row([DOG])]
    # In brackets BREAK is no break: the word "break" at weight -1.1.
    (chunk,) = tok.chunks("(cat BREAK dog)")
    assert chunk.ids[:4] == [START, CAT, 2568, DOG] and chunk.weights[2] == pytest.approx(-1.1)


def test_break_at_a_chunk_edge(tok):
    # A full chunk is closed by the next token; BREAK closes it without opening an empty one.
    assert [c.ids for c in tok.chunks(cats(75) + " BREAK dog")] == [row([CAT] * 75), row([DOG])]
    assert [c.ids for c in tok.chunks(cats(74) + " BREAK dog")] == [row([CAT] * 74), row([DOG])]


def test_comma_backtrack(tok):
    text = cats(70) + ", " + cats(10)  # comma at position 70 (0-based, without the start)
    first, second = tok.chunks(text)
    assert first.ids == row([CAT] * 70 + [COMMA])  # cut after the comma: 5 <= 20 back
    assert second.ids == row([CAT] * 10)
    off = tok.chunks(text, comma_padding_backtrack=0)
    assert [c.ids for c in off] == [row([CAT] * 70 + [COMMA] + [CAT] * 4), row([CAT] * 6)]
    short = tok.chunks(text, comma_padding_backtrack=4)  # the comma is 5 back: too far
    assert [c.ids for c in short] == [c.ids for c in off]
    edge = tok.chunks(text, comma_padding_backtrack=5)
    assert [c.ids for c in edge] == [first.ids, second.ids]


def test_comma_backtrack_keeps_weights(tok):
    first, second = tok.chunks(cats(70) + ", (" + cats(10) + ":1.3)")
    assert first.weights[1:73] == [1.0] * 72 and second.weights[1:11] == [1.3] * 10


def test_comma_on_a_full_chunk_goes_to_the_next(tok):
    first, second = tok.chunks(cats(75) + ", dog")
    assert first.ids == row([CAT] * 75) and second.ids == row([COMMA, DOG])


def test_long_tag_list(tok):
    tags = ", ".join(f"cat dog cat{'' if i % 2 else ' dog'}" for i in range(30))
    chunks = tok.chunks(tags)
    tokens = [t for c in chunks for t in c.ids if t not in (START, END)]
    assert tokens == tok.encode(tags)[1:-1]  # nothing lost, nothing repeated, order kept
    for chunk in chunks[:-1]:
        body = [t for t in chunk.ids[1:] if t != END]
        assert body[-1] == COMMA  # every full chunk was cut after a comma (tags are < 20 long)


def emb(name, n=3, width=128):
    return Embedding(name, torch.randn(n, width))


def test_embedding_slots(tok):
    e = emb("emb")
    (chunk,) = tok.chunks("cat (emb:1.2) dog", {"emb": e})
    assert chunk.ids[:7] == [START, CAT, 0, 0, 0, DOG, END]
    assert chunk.weights[:7] == [1.0, 1.0, 1.2, 1.2, 1.2, 1.0, 1.0]
    assert chunk.embedding_slots == [EmbeddingSlot(2, e)]
    assert tok.chunks("EMB", [e])[0].embedding_slots == [(1, e)]  # by name; case as the tokenizer


def test_unknown_name_stays_text(tok):
    (chunk,) = tok.chunks("cat other", {"emb": emb("emb")})
    assert chunk.ids[:5] == [*tok.encode("cat other")[:4], END] and chunk.embedding_slots == []


def test_longest_name_first(tok):
    short, long = emb("bad", 1), emb("bad hands", 2)
    (chunk,) = tok.chunks("bad hands, bad", {"bad": short, "bad hands": long})
    assert chunk.embedding_slots == [(1, long), (4, short)]
    assert chunk.ids[:6] == [START, 0, 0, COMMA, 0, END]


def test_embedding_never_splits_across_chunks(tok):
    e = emb("emb", 3)
    first, second = tok.chunks(cats(73) + " emb dog", {"emb": e}, comma_padding_backtrack=0)
    assert first.ids == row([CAT] * 73) and first.embedding_slots == []
    assert second.ids == row([0, 0, 0, DOG]) and second.embedding_slots == [(1, e)]
    exactly = tok.chunks(cats(72) + " emb", {"emb": e})
    assert len(exactly) == 1 and exactly[0].embedding_slots == [(73, e)]


def test_comma_backtrack_moves_an_embedding_with_its_tokens(tok):
    e = emb("emb", 2)
    first, second = tok.chunks(cats(70) + ", cat emb " + cats(4), {"emb": e})
    assert first.ids == row([CAT] * 70 + [COMMA]) and first.embedding_slots == []
    assert second.ids == row([CAT, 0, 0] + [CAT] * 4) and second.embedding_slots == [(2, e)]


def test_embedding_longer_than_a_chunk(tok):
    with pytest.raises(ValueError, match="76 vectors, more than the 75"):
        tok.chunks("emb", {"emb": emb("emb", 76)})


@pytest.mark.parametrize("bad", [-1, 2.5, True, "20"])
def test_bad_backtrack(tok, bad):
    with pytest.raises(ValueError, match="comma_padding_backtrack"):
        tok.chunks("cat", comma_padding_backtrack=bad)


def test_not_an_embedding(tok):
    with pytest.raises(TypeError, match="not an Embedding"):
        tok.chunks("cat", {"cat": torch.zeros(1, 128)})
