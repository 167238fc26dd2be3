"""CLIP's byte-level BPE tokenizer: a prompt in, Stable Diffusion's 77 token ids out.

The pipeline, as in OpenAI's CLIP (``clip/simple_tokenizer.py``):

1. clean the text: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace runs to one space,
   strip, lower-case;
2. split it into pieces with CLIP's pattern (the two special tokens, English contractions,
   runs of letters, single digits, runs of other non-space characters);
3. write each piece's UTF-8 bytes with the printable byte alphabet of GPT-2, mark the end of the
   word with ``</w>`` and apply the BPE merges, lowest rank first (cached per piece);
4. look the symbols up in the vocabulary, add ``<|startoftext|>`` and ``<|endoftext|>``.

HTML entities next to ``<``: OpenAI's tokenizer runs ``html.unescape`` twice after ftfy; the slow
``CLIPTokenizer`` of transformers does not, and ftfy on its own leaves entities alone in any line
that contains a ``<`` (it takes such text for HTML). So ``"<b>fish &amp; chips</b>"`` is read as
``"fish & chips"`` here and by OpenAI, but keeps a literal ``&amp;`` in transformers. This
tokenizer follows OpenAI's original, the tokenizer CLIP was trained with. The same rule makes
the two differ on doubly escaped entities and on the legacy entities that ``html.unescape``
accepts without a semicolon (``&amp``, ``&lt``, ``&copy``...). One more difference, for the
same reason (OpenAI's pipeline applied to the whole text): transformers cuts a literal
``<|startoftext|>`` or ``<|endoftext|>`` out of the text before anything else, where OpenAI's
pattern finds it only where no other punctuation is glued before it (``"a cat.<|endoftext|>"``
ends in ``. < | endoftext | >`` here and in OpenAI's tokenizer, in an end token in transformers).
Everywhere else the ids are those of transformers' slow ``CLIPTokenizer`` (checked on a corpus
in the tests).

The vocabulary, its byte symbols and its files are in :mod:`sd_clip.vocabulary`; a prompt cut
into 77-token chunks (:meth:`CLIPTokenizer.chunks`) in :mod:`sd_clip.chunks`.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import ftfy
import regex
import torch

# The names imported from sd_clip.chunks and sd_clip.vocabulary were defined in this module
# before those had modules of their own, and stay importable from here; those this module does
# not use are imported ``as`` themselves, as re-exports.
from sd_clip.chunks import EMBEDDING_PLACEHOLDER as EMBEDDING_PLACEHOLDER
from sd_clip.chunks import Chunk, EmbeddingSlot, _Chunker
from sd_clip.embeddings import Embedding
from sd_clip.prompt import parse_attention
from sd_clip.vocabulary import (
    _TO_SYMBOLS,
    END_TOKEN,
    NUM_MERGES,
    START_TOKEN,
    WORD_END,
    _bundled_merges,
    _check_vocabulary,
    _has_tokenizer_files,
    _pad_id_beside,
    _symbols_to_text,
    clip_vocabulary,
)
from sd_clip.vocabulary import BUNDLED_MERGES as BUNDLED_MERGES
from sd_clip.vocabulary import BYTE_ALPHABET as BYTE_ALPHABET

__all__ = ["CLIPTokenizer", "Chunk", "EmbeddingSlot"]

logger = logging.getLogger(__name__)

# The text encoder of SD 1.x and 2.x has 77 positions: start token, 75 tokens, end token.
MAX_LENGTH = 77
_CACHE_LIMIT = 100_000  # pieces remembered before the BPE cache is emptied and starts again

# CLIP's pre-tokenisation pattern: special tokens, contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_PIECE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def clean_text(text: str) -> str:
    """CLIP's text clean-up: ftfy, HTML unescape (twice), one space between words, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's BPE tokenizer, as Stable Diffusion 1.x uses it.

    ``CLIPTokenizer()`` uses the bundled CLIP vocabulary; ``CLIPTokenizer.from_files(...)`` reads
    a model's ``tokenizer/vocab.json`` and ``tokenizer/merges.txt``. ``max_length`` is the
    length of the rows ``__call__`` returns (77 for SD); ``pad_id`` the id that fills them after
    the end token: the end token by default (SD 1.x), ``0`` (``"!"``) for SD 2.x.

    >>> tok = CLIPTokenizer()
    >>> tok.encode("a photo of a cat")
    [49406, 320, 1125, 539, 320, 2368, 49407]
    """

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        *,
        max_length: int = MAX_LENGTH,
        pad_id: int | None = None,
    ) -> None:
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither (the bundled CLIP vocabulary)")
        if merges is None:
            merges = _bundled_merges()
            vocab = clip_vocabulary(merges)
        _check_vocabulary(vocab, merges)
        self.vocab: dict[str, int] = dict(vocab)
        self.tokens: dict[int, str] = {i: t for t, i in self.vocab.items()}
        self.merges: tuple[tuple[str, str], ...] = tuple((a, b) for a, b in merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.start_id = self.vocab[START_TOKEN]
        self.end_id = self.vocab[END_TOKEN]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (room for the start and end tokens), "
                f"got {max_length!r}; Stable Diffusion uses {MAX_LENGTH}"
            )
        self.max_length = max_length
        self.pad_id = self.end_id if pad_id is None else pad_id
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id must be a token id in [0, {self.vocab_size}), got {pad_id!r}; "
                f"SD 1.x pads with the end token ({self.end_id}), SD 2.x with 0 ('!')"
            )
        self._specials = {START_TOKEN: (self.start_id,), END_TOKEN: (self.end_id,)}
        self._cache: dict[str, tuple[int, ...]] = dict(self._specials)

    @classmethod
    def from_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        *,
        max_length: int = MAX_LENGTH,
        pad_id: int | None = None,
    ) -> CLIPTokenizer:
        """Load the ``vocab.json`` and ``merges.txt`` of a CLIP tokenizer (an SD model's
        ``tokenizer/`` folder). As CLIP and transformers do, only the first 48,894 merges are used.

        ``pad_id=None``: the pad token that ``special_tokens_map.json`` (else
        ``tokenizer_config.json``) beside ``vocab.json`` names (``"!"`` for SD 2.x and SDXL's
        second tokenizer), else the end token.
        """
        vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
        for path, what in ((vocab_json, "vocab.json"), (merges_txt, "merges.txt")):
            if not path.is_file():
                raise FileNotFoundError(f"no {what} file at {path}")
        try:
            vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{vocab_json} is not valid JSON: {error}") from None
        if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
        ):
            raise ValueError(f"{vocab_json} must hold one JSON object of token -> integer id")
        lines = merges_txt.read_text(encoding="utf-8").splitlines()
        first = 1 if lines and lines[0].startswith("#version") else 0
        merges = []
        for number, line in enumerate(lines[first:], start=first + 1):
            if len(merges) == NUM_MERGES:
                break
            pair = line.split()
            if not pair:
                continue
            if len(pair) != 2:
                raise ValueError(
                    f"{merges_txt}, line {number}: a merge is two symbols separated by a space, "
                    f"got {line!r}"
                )
            merges.append((pair[0], pair[1]))
        if pad_id is None:
            pad_id = _pad_id_beside(vocab_json.parent, vocab)
        return cls(vocab, merges, max_length=max_length, pad_id=pad_id)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        subfolder: str = "tokenizer",
        max_length: int = MAX_LENGTH,
        pad_id: int | None = None,
    ) -> CLIPTokenizer:
        """Load a transformers/diffusers tokenizer folder (``vocab.json``, ``merges.txt``, and
        ``special_tokens_map.json`` or ``tokenizer_config.json`` naming the pad token), or a
        diffusers model root holding one in ``subfolder`` (SDXL's second: ``"tokenizer_2"``);
        transformers' ``tokenizer.json`` where there is no ``vocab.json`` (transformers 5
        saves it alone)."""
        folder = Path(folder)
        if not _has_tokenizer_files(folder) and _has_tokenizer_files(folder / subfolder):
            folder = folder / subfolder
        if (folder / "vocab.json").is_file():
            return cls.from_files(
                folder / "vocab.json", folder / "merges.txt", max_length=max_length, pad_id=pad_id
            )
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer at {folder}: expected vocab.json and merges.txt (or "
                f"tokenizer.json) in it or in its {subfolder}/ subfolder"
            )
        from sd_clip.tokenizer_json import read_tokenizer_json

        vocab, merges = read_tokenizer_json(folder / "tokenizer.json", NUM_MERGES)
        if pad_id is None:
            pad_id = _pad_id_beside(folder, vocab)
        return cls(vocab, merges, max_length=max_length, pad_id=pad_id)

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (created if needed), in the
        layout of an SD model's ``tokenizer/`` folder; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
        vocab_json.write_text(json.dumps(self.vocab, ensure_ascii=False) + "\n", "utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        merges_txt.write_text("\n".join(lines) + "\n", "utf-8")
        return vocab_json, merges_txt

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def clean(text: str) -> str:
        """The text as CLIP sees it before splitting it: see :func:`clean_text`."""
        return clean_text(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text: start token, the text's tokens, end token. No truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}")
        return [self.start_id, *self._text_ids(text), self.end_id]

    def _text_ids(self, text: str) -> list[int]:
        """The text's token ids, without the start and end tokens."""
        ids: list[int] = []
        cache = self._cache
        for piece in _PIECE.findall(clean_text(text)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
            ids += piece_ids
        return ids

    def chunks(
        self,
        text: str,
        embeddings: Mapping[str, Embedding] | Iterable[Embedding] | None = None,
        comma_padding_backtrack: int = 20,
    ) -> list[Chunk]:
        """A prompt in AUTOMATIC1111's language as chunks of ``max_length`` (77) token ids.

        As AUTOMATIC1111's ``tokenize_line``: the prompt's weighted runs
        (:func:`sd_clip.parse_attention`) are tokenized one by one and their tokens go into
        chunks of 75 (``max_length - 2``), each written ``[start] tokens [end] padding``; a
        ``BREAK`` closes the chunk it is in. When a chunk is full and the last comma in it is
        at most ``comma_padding_backtrack`` tokens back, the tokens after that comma move to the
        next chunk (0 turns this off). An embedding's trigger word (matched as tokens, longest
        name first) takes ``num_vectors`` positions, all in one chunk; a name not in
        ``embeddings`` is ordinary text. An empty prompt is one chunk.

        ``embeddings``: a dict of trigger word -> :class:`~sd_clip.Embedding` (as
        :func:`~sd_clip.load_embeddings` returns), or embeddings named by their ``name``.
        """
        if not isinstance(text, str):
            raise TypeError(f"the prompt must be a str, got {type(text).__name__}")
        if (
            not isinstance(comma_padding_backtrack, int)
            or isinstance(comma_padding_backtrack, bool)
            or comma_padding_backtrack < 0
        ):
            raise ValueError(
                "comma_padding_backtrack must be an integer >= 0 (0: off; AUTOMATIC1111's "
                f"default is 20), got {comma_padding_backtrack!r}"
            )
        return _Chunker(self, self._embedding_lookup(embeddings), comma_padding_backtrack).run(
            parse_attention(text)
        )

    def _embedding_lookup(self, embeddings) -> dict[int, list[tuple[list[int], Embedding]]]:
        """First token id -> (the name's token ids, embedding), longest name first."""
        if embeddings is None:
            return {}
        if isinstance(embeddings, Mapping):
            named = list(embeddings.items())
        else:
            named = [(e.name, e) for e in embeddings]
        lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        for name, embedding in named:
            if not isinstance(embedding, Embedding):
                raise TypeError(
                    f"embeddings[{name!r}] is {type(embedding).__name__}, not an Embedding "
                    "(load them with sd_clip.load_embeddings)"
                )
            ids = self._text_ids(name)
            if not ids:
                logger.warning("embedding %r has no tokens in its name; it cannot be used", name)
                continue
            lookup.setdefault(ids[0], []).append((ids, embedding))
        for candidates in lookup.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)
        return lookup

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids of a batch of texts as a LongTensor (B, max_length), a str counting as B = 1.

        A row is the start token, the text's tokens, the end token, then ``pad_id`` up to
        ``max_length``; a text with more than ``max_length - 2`` tokens is cut to fit, keeping
        the end token, and a warning says which words were cut.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        rows = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(
                    f"texts must be a str or a list of str, but texts[{index}] is "
                    f"{type(text).__name__}"
                )
            ids = self.encode(text)
            if len(ids) > self.max_length:
                cut = self.decode(ids[self.max_length - 1 : -1])
                logger.warning(
                    "prompt %d is longer than the %d tokens CLIP can take; this end of it was "
                    "cut: %r",
                    index,
                    self.max_length,
                    cut,
                )
                ids = [*ids[: self.max_length - 1], self.end_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        if not rows:
            return torch.empty(0, self.max_length, dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """The text of some token ids: words joined by single spaces, lower case, as cleaned.

        The start and end tokens (and so SD 1.x padding) are left out unless
        ``skip_special_tokens=False``, which writes them as ``<|startoftext|>`` and
        ``<|endoftext|>``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one sequence of ids (a 1-D tensor), got shape "
                    f"{tuple(ids.shape)}; decode each row of a batch on its own"
                )
            ids = ids.tolist()
        parts, symbols = [], []
        for position, i in enumerate(ids):
            token = self.tokens.get(i) if isinstance(i, int) else None
            if token is None:
                raise ValueError(
                    f"ids[{position}] = {i!r} is not a token id: ids are ints in "
                    f"[0, {self.vocab_size})"
                )
            if token in self._specials:
                parts.append(_symbols_to_text(symbols))
                symbols = []
                if not skip_special_tokens:
                    parts.append(" " + token + " ")
            else:
                symbols.append(token)
        parts.append(_symbols_to_text(symbols))
        return _WHITESPACE.sub(" ", "".join(parts)).strip()

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """The ids of one piece of the split text, through BPE, remembered in the cache."""
        symbols = piece.encode("utf-8").decode("latin-1").translate(_TO_SYMBOLS)
        ids = tuple(self.vocab[s] for s in self._bpe(symbols))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = dict(self._specials)
        self._cache[piece] = ids
        return ids

    def _bpe(self, symbols: str) -> list[str]:
        """Merge a word's byte symbols, the lowest-ranked adjacent pair first, until none merges.

        Each step merges every occurrence of the best pair, left to right and without overlap.
        """
        word = [*symbols[:-1], symbols[-1] + WORD_END]
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in pairwise(word):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"pad_id={self.pad_id})"
        )
