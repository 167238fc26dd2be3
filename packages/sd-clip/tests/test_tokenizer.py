"""CLIPTokenizer on its own: the bundled vocabulary, padding, truncation, decode, files, errors.

Parity with transformers over a corpus is in test_tokenizer_parity.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from importlib import resources

import pytest
import torch

from sd_clip import tokenizer as tokenizer_module
from sd_clip.tokenizer import CLIPTokenizer

START, END = 49406, 49407
DATA = resources.files("sd_clip").joinpath("data")


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def tokenizer_files(tok, tmp_path_factory):
    """vocab.json and merges.txt as in an SD model's tokenizer/ folder (transformers' layout)."""
    return tok.save(tmp_path_factory.mktemp("tokenizer"))


# --- the bundled vocabulary -------------------------------------------------------------------


def test_known_clip_ids(tok):
    # Ids published with CLIP and SD (e.g. diffusers' docs and countless notebooks).
    assert tok.encode("a photo of a cat") == [START, 320, 1125, 539, 320, 2368, END]
    assert tok.encode("a dog, on a beach.") == [START, 320, 1929, 267, 525, 320, 2117, 269, END]
    assert (tok.start_id, tok.end_id, tok.pad_id, tok.vocab_size) == (START, END, END, 49408)


def test_vocabulary_layout(tok):
    assert tok.tokens[0] == "!" and tok.tokens[93] == "~"  # printable ASCII first
    assert tok.tokens[256] == "!</w>" and tok.tokens[320] == "a</w>"
    assert tok.tokens[511] == chr(256 + 67) + "</w>"  # the last byte moved out of the way
    assert tok.tokens[START] == "<|startoftext|>" and tok.tokens[END] == "<|endoftext|>"
    assert len(tok.ranks) == 48894 == 49408 - 512 - 2
    assert sorted(tok.vocab.values()) == list(range(49408))  # no gaps, no duplicate ids


def test_bundled_file_is_the_credited_one():
    data = DATA.joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    notice = DATA.joinpath("LICENSE").read_text("utf-8")
    assert digest in notice and "MIT License" in notice and "OpenAI" in notice
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    assert lines[0].endswith("#version: 0.2") and lines[1] == "i n" and len(lines) == 262145


def test_merges_are_the_files_first_lines(tok):
    lines = gzip.decompress(DATA.joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes())
    lines = lines.decode("utf-8").splitlines()[1 : 48894 + 1]
    assert [f"{a} {b}" for a, b in tok.merges] == lines
    assert [tok.tokens[512 + i] for i in (0, 1, 48893)] == [
        "".join(lines[i].split()) for i in (0, 1, 48893)
    ]


# --- encode and clean-up ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "\n\t  \u3000"])
def test_empty_texts_are_start_and_end(tok, text):
    assert tok.encode(text) == [START, END]


def test_clean_up(tok):
    assert tok.clean("  A   Cat\n\tON a MAT  ") == "a cat on a mat"
    assert tok.clean("fish &amp;amp; chips") == "fish & chips"  # unescaped twice, as CLIP
    assert tok.clean("<b>fish &amp; chips</b>") == "<b>fish & chips</b>"  # even next to "<"
    assert tok.clean("doesnâ€™t") == "doesn't"  # ftfy repairs mojibake and curly quotes
    assert tok.clean("ｆｕｌｌ　ｗｉｄｔｈ") == "full width"
    assert tok.encode("A CAT") == tok.encode("a cat") == tok.encode(" a\n\ncat ")


def test_pieces_follow_clip_pattern(tok):
    # contractions are their own pieces, digits are one piece each, punctuation runs one piece
    assert [tok.tokens[i] for i in tok.encode("it's 42!!")[1:-1]] == [
        "it</w>", "'s</w>", "4</w>", "2</w>", "!!</w>",
    ]  # fmt: skip
    assert tok.encode("<|endoftext|>") == [START, END, END]  # special tokens in the text


def test_unknown_scripts_fall_back_to_bytes(tok):
    ids = tok.encode("\U00013000")  # a hieroglyph: no merge for it, its four UTF-8 bytes
    assert [tok.tokens[i] for i in ids[1:-1]] == ["ð", "ĵ", "Ģ", "Ģ</w>"]  # F0 93 80 80
    assert tok.decode(ids) == "\U00013000"


def test_encode_does_not_truncate(tok):
    ids = tok.encode("cat " * 100)
    assert ids == [START] + [2368] * 100 + [END]


def test_bpe_cache_gives_the_same_ids_when_full(monkeypatch):
    texts = ["antidisestablishmentarianism", "hippopotamus", "a cat", "日本語", "🐱🐱"] * 3
    expected = [CLIPTokenizer().encode(t) for t in texts]
    monkeypatch.setattr(tokenizer_module, "_CACHE_LIMIT", 3)
    small = CLIPTokenizer()
    assert [small.encode(t) for t in texts] == expected
    assert len(small._cache) <= 3 + 2  # emptied again and again, the special tokens kept


# --- batches: padding and truncation ----------------------------------------------------------


def test_batch_is_padded_with_the_end_token(tok):
    ids = tok(["a photo of a cat", "a dog"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [START, 320, 1125, 539, 320, 2368, END]
    assert ids[1, :4].tolist() == [START, 320, 1929, END]
    assert (ids[0, 7:] == END).all() and (ids[1, 4:] == END).all()
    assert torch.equal(tok("a dog"), ids[1:])  # a str is a batch of one
    assert torch.equal(tok(("a photo of a cat", "a dog")), ids)  # tuples too
    assert tok([]).shape == (0, 77)


def test_pad_id_and_max_length_are_configurable():
    tok = CLIPTokenizer(pad_id=0, max_length=10)  # SD 2.x pads with "!" (id 0)
    assert tok("a cat")[0].tolist() == [START, 320, 2368, END, 0, 0, 0, 0, 0, 0]
    assert tok("cat " * 20)[0].tolist() == [START] + [2368] * 8 + [END]


def test_truncation_keeps_the_end_token_and_names_the_cut_words(tok, caplog):
    fits = "cat " * 75  # 75 tokens + start + end = 77
    with caplog.at_level(logging.WARNING, logger="sd_clip.tokenizer"):
        row = tok(fits)[0]
    assert row.tolist() == [START] + [2368] * 75 + [END] and not caplog.records

    long = "cat " * 74 + "wearing a tiny blue hat"
    with caplog.at_level(logging.WARNING, logger="sd_clip.tokenizer"):
        rows = tok(["a dog", long])
    assert rows[1].tolist() == [START] + [2368] * 74 + [tok.encode("wearing")[1], END]
    (record,) = caplog.records
    message = record.getMessage()
    assert "prompt 1" in message and "77 tokens" in message
    assert "'a tiny blue hat'" in message and "wearing" not in message


# --- decode -----------------------------------------------------------------------------------

ROUND_TRIP = [
    "a photo of a cat",
    "Café crème, naïve façade!",
    "東京の夜景 🐱 👨‍👩‍👧 🇯🇵",
    "مرحبا بالعالم שלום",
    "(masterpiece:1.2), [blurry], ((sharp))",
    "don't it's 3.14 https://example.com/a?b=c",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_round_trip(tok, text):
    decoded = tok.decode(tok.encode(text))
    assert decoded.replace(" ", "") == tok.clean(text).replace(" ", "")
    assert tok.encode(decoded) == tok.encode(text)  # spaces only where CLIP splits anyway


def test_decode_options_and_inputs(tok):
    ids = tok("a cat")[0]  # a tensor row, padded with end tokens
    assert tok.decode(ids) == "a cat"
    assert tok.decode(ids[:4], skip_special_tokens=False) == "<|startoftext|> a cat <|endoftext|>"
    assert tok.decode([]) == ""


# --- from_files -------------------------------------------------------------------------------


def test_from_files_reads_a_tokenizer_folder(tok, tokenizer_files):
    loaded = CLIPTokenizer.from_files(*tokenizer_files, max_length=20, pad_id=0)
    for text in [*ROUND_TRIP, "supercalifragilisticexpialidocious", "cat " * 30]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded("a cat").shape == (1, 20) and loaded("a cat")[0, -1] == 0
    as_str = CLIPTokenizer.from_files(*map(str, tokenizer_files))
    assert as_str.vocab == tok.vocab and as_str.ranks == tok.ranks


def test_saved_files_have_transformers_layout(tok, tokenizer_files):
    vocab, merges = tokenizer_files
    assert json.loads(vocab.read_text("utf-8")) == tok.vocab
    lines = merges.read_text("utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and len(lines) == 1 + 48894


def test_from_files_without_a_header_line(tok, tokenizer_files, tmp_path):
    vocab, merges = tokenizer_files
    headerless = tmp_path / "merges.txt"
    headerless.write_text(merges.read_text("utf-8").split("\n", 1)[1], "utf-8")
    assert CLIPTokenizer.from_files(vocab, headerless).ranks == tok.ranks


def test_from_files_uses_clip_s_number_of_merges(tok, tokenizer_files, tmp_path):
    vocab, merges = tokenizer_files
    longer = tmp_path / "merges.txt"  # lines past the 48,894th are ignored, as CLIP does
    longer.write_text(merges.read_text("utf-8") + "x y\nnot in vocab\n", "utf-8")
    assert CLIPTokenizer.from_files(vocab, longer).ranks == tok.ranks


# --- errors -----------------------------------------------------------------------------------


def test_bad_texts_are_refused(tok):
    with pytest.raises(TypeError, match="encode takes one str, got int"):
        tok.encode(3)
    with pytest.raises(TypeError, match="encode takes one str, got list"):
        tok.encode(["a cat"])
    with pytest.raises(TypeError, match="texts must be a str or a list of str, got int"):
        tok(42)
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        tok(["a cat", None])
    with pytest.raises(TypeError, match="got bytes"):
        tok(b"a cat")


def test_bad_ids_are_refused(tok):
    with pytest.raises(ValueError, match=r"ids\[1\] = 49408 is not a token id.*\[0, 49408\)"):
        tok.decode([START, 49408])
    with pytest.raises(ValueError, match=r"ids\[0\] = -1 is not a token id"):
        tok.decode([-1])
    with pytest.raises(ValueError, match=r"ids\[0\] = 'a' is not a token id"):
        tok.decode(["a"])
    with pytest.raises(ValueError, match=r"1-D tensor\), got shape \(2, 77\)"):
        tok.decode(tok(["a", "b"]))


@pytest.mark.parametrize("max_length", [1, 0, -5, 77.0, True, "77"])
def test_bad_max_length(max_length):
    with pytest.raises(ValueError, match=r"max_length must be an int >= 2 .* uses 77"):
        CLIPTokenizer(max_length=max_length)


@pytest.mark.parametrize("pad_id", [-1, 49408, 1.5, "!"])
def test_bad_pad_id(pad_id):
    with pytest.raises(ValueError, match=r"pad_id must be a token id in \[0, 49408\).*49407"):
        CLIPTokenizer(pad_id=pad_id)


def test_vocab_and_merges_come_together(tok):
    with pytest.raises(ValueError, match="give both vocab and merges, or neither"):
        CLIPTokenizer(vocab=tok.vocab)


def test_from_files_errors(tokenizer_files, tmp_path):
    vocab, merges = tokenizer_files
    with pytest.raises(FileNotFoundError, match=r"no vocab\.json file at .*missing\.json"):
        CLIPTokenizer.from_files(tmp_path / "missing.json", merges)
    with pytest.raises(FileNotFoundError, match=r"no merges\.txt file at"):
        CLIPTokenizer.from_files(vocab, tmp_path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", "utf-8")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        CLIPTokenizer.from_files(bad_json, merges)
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]", "utf-8")
    with pytest.raises(
        ValueError, match=r"list\.json must hold one JSON object of token -> integer"
    ):
        CLIPTokenizer.from_files(a_list, merges)
    three = tmp_path / "three.txt"
    three.write_text("#version: 0.2\ni n\na b c\n", "utf-8")
    with pytest.raises(ValueError, match=r"three.txt, line 3: a merge is two symbols.*'a b c'"):
        CLIPTokenizer.from_files(vocab, three)


def test_mismatched_vocabulary_is_refused(tok):
    merges = tok.merges
    no_end = {t: i for t, i in tok.vocab.items() if t != "<|endoftext|>"}
    with pytest.raises(ValueError, match=r"no <\|endoftext\|> token; is it a CLIP vocabulary"):
        CLIPTokenizer(no_end, merges)
    no_byte = {t: i for t, i in tok.vocab.items() if t != "a</w>"}
    with pytest.raises(ValueError, match="no id for the byte symbol 'a</w>'"):
        CLIPTokenizer(no_byte, merges)
    with pytest.raises(
        ValueError, match=r"merge 48894 \('xzq' \+ 'jjv'\) makes 'xzqjjv'.*do not belong"
    ):
        CLIPTokenizer(tok.vocab, [*merges, ("xzq", "jjv")])
