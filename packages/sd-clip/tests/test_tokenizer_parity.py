"""Same ids as transformers' slow (Python) CLIPTokenizer, given the same vocabulary files.

transformers 4.x is the reference (a test-only dependency, see the [test] extra); 5.x dropped the
slow class, and these tests skip there. The reference reads vocab.json and merges.txt that the
test writes from the bundled vocabulary, so nothing is downloaded.
"""

from __future__ import annotations

import html
import random

import ftfy
import pytest

from sd_clip.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5 or not hasattr(
    transformers.CLIPTokenizer, "bpe"
):
    pytest.skip(
        f"transformers {transformers.__version__} has no slow CLIPTokenizer (needs transformers<5)",
        allow_module_level=True,
    )

PLAIN = [
    "a photo of a cat",
    "A Photo Of A Cat",
    "a painting of a fox sitting in a field at sunrise in the style of Claude Monet",
    "portrait of a woman, highly detailed, digital painting, artstation, concept art, sharp focus",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile",
    "a red circle",
    "an astronaut riding a horse on mars",
    "photorealistic render of a cyberpunk city at night, neon lights, rain, 8k, octane render",
    "the quick brown fox jumps over the lazy dog",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "hyperrealistic ultradetailed unrealengine5 trending_on_artstation",
    "snake_case_words and camelCaseWords and kebab-case-words",
    "a",
    "I",
    "x y z",
]
WEIGHTS_AND_BRACKETS = [
    "(masterpiece:1.2), (best quality:1.1), [blurry], ((sharp)), {{cinematic}}",
    "a cat (wearing a hat:1.35) and [a dog:0.8]",
    "[cat|dog] in a [field:forest:0.5]",
    "((((extremely detailed)))), (((beautiful))), ((nice)), (ok)",
    "(worst quality, low quality:1.4), lowres, bad anatomy, bad hands, text, error",
    "<lora:detail_tweaker:0.7> a castle, <hypernet:anime:1>",
    "a BREAK b AND c",
    "embedding:EasyNegative, (embedding:bad_prompt_version2:0.8)",
    "(a:1.)(b:.5)(c:-1)(d:1e-3)",
    "[[[[]]]]((((()))))",
]
ACCENTS_AND_SCRIPTS = [
    "café crème brûlée à la française, naïve façade, jalapeño piñata",
    "Ærøskøbing Ålesund Straße Œuvre ÉCOLE",
    "São Paulo, Kraków, Zürich, İstanbul, Reykjavík",
    "cafe\u0301 with a combining accent",
    "ǅemal Ǆ ǆ ﬁne ﬂower ﬀ",
    "東京の夜景、ネオン、雨",
    "一只猫坐在窗台上",
    "고양이가 창가에 앉아 있다",
    "猫 cat 猫 cat 猫",
    "Привет мир, кошка на окне",
    "Γειά σου Κόσμε, ΟΔΥΣΣΕΥΣ",
    "मेरा नाम बिल्ली है",
    "แมวนั่งบนหน้าต่าง",
    "ქართული ენა",
    "𝔣𝔯𝔞𝔨𝔱𝔲𝔯 𝓼𝓬𝓻𝓲𝓹𝓽 𝟙𝟚𝟛",
    "ｆｕｌｌ　ｗｉｄｔｈ　ｔｅｘｔ　１２３",
    "ΩΣΠ ∑∏∫ ℃ ℉ № ™ ©",
]
EMOJI = [
    "a cat 🐱 and a dog 🐶",
    "🔥🔥🔥 fire 🔥🔥🔥",
    "family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and skin tones 👍🏽👋🏿",
    "❤️ ♥ ❤ ☀️ ⭐ ✨",
    "🙂🙃😀😃😄😁😆😅🤣😂",
    "emoji🎨without💡spaces",
]
RIGHT_TO_LEFT = [
    "مرحبا بالعالم، قطة على النافذة",
    "שלום עולם, חתול על החלון",
    "mixed English و العربية and עברית text",
    "\u202eright-to-left override\u202c and \u200fRLM\u200e marks",
    "فارسی: گربه روی پنجره",
]
WHITESPACE = [
    "",
    " ",
    "   \t\n  ",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand\r carriage returns",
    "many     spaces      between",
    "no-break\xa0space and\u2009thin space and\u3000ideographic space",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "line\u2028separator\u2029paragraph",
    "\x00null\x07bell\x1bescape\x7fdel",
    "vertical\x0btab\x0cform feed",
]
HTML = [
    "fish &amp; chips",
    "a &lt;3 cat",
    "caf&eacute; &copy; 2024 &mdash; &hellip;",
    "&quot;quoted&quot; &#39;single&#39; &#x27;hex&#x27;",
    "a&nbsp;b",
    "&amp;amp; double",
    "AT&T and R&D",
    "5 &gt; 3 &amp;&amp; 2 &lt; 4",
    "&unknownentity; &; &#; &#xZZ;",
    "Tom &amp Jerry",
    "<b>fish &amp; chips</b>",
    "x < y &amp; z",
    "a <3 &lt;3",
    '<div class="a">caf&eacute;</div>',
    "&lt;b&gt;bold&lt;/b&gt;",
    "&amp;lt;escaped twice&amp;gt;",
    "1 &lt 2 &copy2024",
]
CONTRACTIONS = [
    "don't can't won't it's I'm you're we've they'll he'd",
    "DON'T CAN'T IT'S I'M YOU'RE WE'VE THEY'LL HE'D",
    "it’s the cat’s toy",
    "rock 'n' roll, 'quoted', ''double''",
    "o'clock o'neill y'all ma'am",
    "'s 't 're 've 'm 'll 'd",
    "the dogs' bone",
    "doesnâ€™t mojibake",
]
NUMBERS_URLS = [
    "1girl 2boys 3d render 4k 8k 16k",
    "3.14159 2,718 1e10 -42 +7 1/2 50% $100 €20 £5 ¥1000",
    "1234567890",
    "v1.5 sd2.1 sdxl-1.0 gpt-4",
    "٠١٢٣٤٥٦٧٨٩ ०१२३ 一二三 ①②③ Ⅻ ½ ¾ ²³",
    "https://example.com/path?query=1&x=y#frag",
    "http://www.example.org/a_b-c.d~e",
    "user@example.com",
    "C:\\Users\\me\\image.png and /usr/local/bin",
    "#hashtag @mention $variable %percent ^caret *star",
    "2024-01-31T12:34:56Z",
    "0x1F 0b1010 0o777",
]
PUNCTUATION = [
    ".",
    ",",
    "!!!",
    "???",
    "...",
    "…",
    "---",
    "—–-",
    ",,,,,,,,",
    "()",
    "[]",
    "{}",
    "<>",
    "|",
    "\\",
    "'",
    '"',
    "''",
    "@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "¡¿«»‹›“”‘’„",
    "·•●○◆◇■□★☆",
    "→←↑↓⇒⇔",
]
SPECIAL_TOKENS = [
    "<|startoftext|>",
    "<|endoftext|>",
    "a cat <|endoftext|> a dog",
    "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|> upper case",
    "<|endoftext",
    "<|notatoken|>",
    "a cat.<|endoftext|>",
]
LONG = [
    ", ".join(["a very detailed painting of a beautiful landscape"] * 12),
    " ".join(f"word{i}" for i in range(200)),
    "masterpiece, " * 80,
    "(" * 100 + "cat" + ")" * 100,
    "a" * 500,
    "🐱" * 100,
    "東京" * 120,
    "a cat " * 37 + "with a hat",  # near the 75-token boundary
    "a cat " * 38,
    "a cat " * 37 + "a",
]

_WORDS = [
    "cat", "dog", "house", "tree", "river", "mountain", "portrait", "landscape", "cyberpunk",
    "steampunk", "castle", "dragon", "sunset", "forest", "ocean", "city", "night", "neon",
    "rain", "fog", "light", "shadow", "golden", "hour", "bokeh", "cinematic", "detailed",
    "intricate", "elegant", "ornate", "surreal", "abstract", "minimalist", "vibrant", "pastel",
    "moody", "photograph", "illustration", "watercolor", "oil", "painting", "sketch", "render",
    "unreal", "engine", "octane", "artstation", "deviantart", "pixiv", "behance", "greg",
    "rutkowski", "alphonse", "mucha", "studio", "ghibli"
]  # fmt: skip
_PIECES = [
    "café", "naïve", "東京", "猫", "고양이", "привет", "مرحبا", "שלום", "🐱", "🔥", "👨‍👩‍👧",
    "🇯🇵", "&amp;", "&lt;3", "&eacute;", "&#39;", "don't", "it's", "WE'LL", "’s", "42", "3.5",
    "1e-3", "8k", "https://a.b/c?d=e", "(", ")", "[", "]", "{", "}", ":", "|", "...", "—",
    "\u200b", "\xa0", "ﬁ", "Ｗｉｄｅ", "İ", "ß", "Σ", "\u0301", "<|endoftext|>",
]  # fmt: skip
_SEPARATORS = [" ", ", ", "  ", "\t", "\n", ",", " | ", "", ". "]


def _generated(count: int, seed: int = 0) -> list[str]:
    """Random prompts mixing words, weights, brackets, unicode pieces and odd separators."""
    rng = random.Random(seed)
    prompts = []
    for n in range(count):
        parts = []
        for _ in range(rng.choice([1, 3, 8, 20, 40, 90])):
            roll = rng.random()
            if roll < 0.5:
                part = rng.choice(_WORDS)
            elif roll < 0.65:
                part = f"({rng.choice(_WORDS)} {rng.choice(_WORDS)}:{rng.uniform(0, 2):.{rng.randint(0, 3)}f})"
            elif roll < 0.72:
                part = f"[{rng.choice(_WORDS)}]"
            elif roll < 0.92:
                part = rng.choice(_PIECES)
            else:  # a few random code points from anywhere below the surrogates
                part = "".join(chr(rng.randint(0x21, 0xD7FF)) for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.2:
                part = part.upper() if rng.random() < 0.5 else part.title()
            parts.append(part)
        prompts.append(rng.choice(_SEPARATORS).join(parts))
        if n % 10 == 0:  # some with stray whitespace at the ends
            prompts[-1] = rng.choice([" ", "\n", "\t "]) + prompts[-1] + rng.choice([" ", "  \n"])
    return prompts


CORPUS = (
    PLAIN
    + WEIGHTS_AND_BRACKETS
    + ACCENTS_AND_SCRIPTS
    + EMOJI
    + RIGHT_TO_LEFT
    + WHITESPACE
    + HTML
    + CONTRACTIONS
    + NUMBERS_URLS
    + PUNCTUATION
    + SPECIAL_TOKENS
    + LONG
    + _generated(250)
)


def openai_reading(text: str) -> str:
    """The text as OpenAI's tokenizer reads it: ftfy over the whole text, then html.unescape
    twice. Given to a reference with ftfy turned off, this is OpenAI's tokenization."""
    return html.unescape(html.unescape(ftfy.fix_text(text)))


def _transformers_tokenizer(folder, fix_text=True):
    tok = transformers.CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=1_000_000,  # no "sequence too long" warning: we truncate explicitly
    )
    assert tok.fix_text is not None, "the reference must use ftfy, as CLIP does"
    if not fix_text:
        tok.fix_text = str  # the text is given already cleaned by openai_reading
    return tok


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def vocab_folder(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    ours.save(folder)  # vocab.json and merges.txt, as in an SD model's tokenizer/ folder
    return folder


@pytest.fixture(scope="module")
def reference(vocab_folder):
    tok = _transformers_tokenizer(vocab_folder)
    assert len(tok) == 49408
    return tok


@pytest.fixture(scope="module")
def openai_reference(vocab_folder):
    """OpenAI's reading built from the reference's parts: openai_reading for the clean-up, then
    transformers' own pattern split and BPE (its `_tokenize`, with ftfy off) over the whole
    text, as OpenAI does, rather than around the special tokens first, as transformers does."""
    tok = _transformers_tokenizer(vocab_folder, fix_text=False)

    def encode(text: str) -> list[int]:
        tokens = tok._tokenize(openai_reading(text))
        return [tok.bos_token_id, *tok.convert_tokens_to_ids(tokens), tok.eos_token_id]

    return encode


def test_corpus_is_varied_and_large():
    assert len(CORPUS) >= 300
    assert len(set(CORPUS)) >= 0.95 * len(CORPUS)
    assert sum(len(t) > 400 for t in CORPUS) >= 10  # enough prompts past 77 tokens


@pytest.fixture(scope="module")
def transformers_ids(reference) -> dict[str, list[int]]:
    return {text: reference(text)["input_ids"] for text in CORPUS}


@pytest.fixture(scope="module")
def openai_ids(openai_reference) -> dict[str, list[int]]:
    return {text: openai_reference(text) for text in CORPUS}


@pytest.fixture(scope="module")
def differing(transformers_ids, openai_ids) -> list[str]:
    """The corpus texts that transformers reads unlike OpenAI."""
    return [text for text in CORPUS if transformers_ids[text] != openai_ids[text]]


def _mismatches(ours, expected: dict[str, list[int]], texts) -> str:
    bad = [(t, ours.encode(t), expected[t]) for t in texts if ours.encode(t) != expected[t]]
    return f"{len(bad)} of {len(texts)} differ; first: {bad[0]}" if bad else ""


def test_corpus_ids_match_openai_reading(ours, openai_ids):
    assert not _mismatches(ours, openai_ids, CORPUS)


def test_corpus_ids_match_transformers_but_where_documented(ours, transformers_ids, differing):
    """Identical ids to transformers, except where it reads the text unlike OpenAI: HTML
    entities that ftfy leaves (a "<" in the line, a double escape, a legacy entity without ";")
    and a literal special token glued to punctuation (transformers cuts it out first)."""
    same = [text for text in CORPUS if text not in differing]
    assert not _mismatches(ours, transformers_ids, same)
    assert "<b>fish &amp; chips</b>" in differing
    assert "x < y &amp; z" in differing
    assert "fish &amp; chips" not in differing  # without "<" ftfy unescapes them as well
    assert "a cat.<|endoftext|>" in differing
    assert "a cat <|endoftext|> a dog" not in differing
    unexplained = [t for t in differing if "&" not in t and "<|" not in t]
    assert not unexplained
    assert len(differing) < 0.05 * len(CORPUS)
    assert ours.encode("<b>fish &amp; chips</b>") == ours.encode("<b>fish & chips</b>")


def test_batch_matches_transformers_padding_and_truncation(ours, reference, differing):
    texts = [t for t in CORPUS if t not in differing]
    expected = reference(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )["input_ids"]
    found = ours(texts)
    assert found.shape == expected.shape == (len(texts), 77)
    assert found.dtype == expected.dtype
    rows = (found != expected).any(dim=1).nonzero().flatten().tolist()
    assert not rows, f"rows {rows[:5]} differ, first text: {texts[rows[0]]!r}"
    assert sum(len(ours.encode(t)) > 77 for t in texts) >= 20  # truncation was exercised


def test_decode_matches_transformers(ours, reference):
    for text in CORPUS[::3]:
        ids = ours.encode(text)
        expected = reference.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert ours.decode(ids) == expected, text
