"""CLIP's vocabulary: the byte symbols BPE works on, the token -> id table, and its files.

The vocabulary is derived from OpenAI's merges file, shipped in ``sd_clip/data`` (MIT licence,
see ``data/LICENSE``): the 256 byte symbols, the same with ``</w>``, the concatenation of each
of the first 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
A model's own vocabulary (``vocab.json`` and ``merges.txt``, read by
:meth:`sd_clip.CLIPTokenizer.from_files`) is checked here before the tokenizer uses it, and the
pad token its folder names is looked up here.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

__all__ = ["BYTE_ALPHABET", "END_TOKEN", "NUM_MERGES", "START_TOKEN", "WORD_END", "clip_vocabulary"]

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
# CLIP keeps the first 49152 - 256 - 2 merges of its merges file (so that, with the 512 byte
# symbols and the two special tokens, the vocabulary has 49,408 entries); transformers too.
NUM_MERGES = 49152 - 256 - 2
BUNDLED_MERGES = "bpe_simple_vocab_16e6.txt.gz"


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    A byte that is a printable Latin-1 character stands for itself; the 68 others (controls,
    space, no-break space, soft hyphen) take chr(256), chr(257), ... in byte order, so that no
    BPE symbol is whitespace. The dict's order is CLIP's order of the first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + k) for k, b in enumerate(others)})
    return alphabet


BYTE_ALPHABET = _byte_alphabet()
# As a str.translate table, it turns a text decoded as Latin-1 (one char per byte) into symbols.
_TO_SYMBOLS = BYTE_ALPHABET
_FROM_SYMBOLS = {c: b for b, c in BYTE_ALPHABET.items()}


@lru_cache(maxsize=1)
def _bundled_merges() -> tuple[tuple[str, str], ...]:
    """The first 48,894 merges of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (header skipped)."""
    source = resources.files("sd_clip").joinpath("data", BUNDLED_MERGES)
    with source.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        next(lines)  # the header: '"bpe_simple_vocab_16e6.txt#version: 0.2'
        merges = []
        for line in lines:
            if len(merges) == NUM_MERGES:
                break
            first, second = line.split()
            merges.append((first, second))
    return tuple(merges)


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table, built from its merges as OpenAI's tokenizer builds it."""
    symbols = list(BYTE_ALPHABET.values())
    tokens = symbols + [s + WORD_END for s in symbols] + [a + b for a, b in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _check_vocabulary(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> None:
    """Refuse a vocabulary that BPE could leave without an id for a symbol it produces."""
    for special in (START_TOKEN, END_TOKEN):
        if special not in vocab:
            raise ValueError(f"the vocabulary has no {special} token; is it a CLIP vocabulary?")
    for symbol in BYTE_ALPHABET.values():
        for token in (symbol, symbol + WORD_END):
            if token not in vocab:
                raise ValueError(
                    f"the vocabulary has no id for the byte symbol {token!r}: a CLIP vocabulary "
                    f"holds all 256 byte symbols, with and without {WORD_END}"
                )
    for rank, (first, second) in enumerate(merges):
        if first + second not in vocab:
            raise ValueError(
                f"merge {rank} ({first!r} + {second!r}) makes {first + second!r}, which is not in "
                f"the vocabulary: the merges and the vocabulary do not belong together"
            )


def _symbols_to_text(symbols: list[str]) -> str:
    """Byte symbols back to text: bytes decoded as UTF-8 (bad bytes as U+FFFD), </w> a space."""
    text = "".join(symbols).replace(WORD_END, " ")
    data = bytes(_FROM_SYMBOLS[c] if c != " " else 32 for c in text)
    return data.decode("utf-8", errors="replace")


def _has_tokenizer_files(folder: Path) -> bool:
    """Whether ``folder`` holds a tokenizer :meth:`CLIPTokenizer.from_folder` reads."""
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def _pad_id_beside(folder: Path, vocab: dict[str, int]) -> int | None:
    """The id of the pad token that a transformers tokenizer folder names, or None (no file says:
    pad with the end token). transformers writes it as a string or as an AddedToken object."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        token = settings.get("pad_token") if isinstance(settings, dict) else None
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            continue
        if not isinstance(token, str) or token not in vocab:
            raise ValueError(
                f"{path}: pad_token {token!r} is not a token of the vocabulary; SD 1.x pads "
                f"with {END_TOKEN!r}, SD 2.x with '!'"
            )
        return vocab[token]
    return None
