"""transformers' ``tokenizer.json`` (its "fast" tokenizer file, which transformers 5 saves alone,
without ``vocab.json`` and ``merges.txt``): the BPE vocabulary and merges of a CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_tokenizer_json"]


def read_tokenizer_json(
    path: str | Path, limit: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and the first ``limit`` merges of a ``tokenizer.json``
    whose model is BPE; ValueError naming what is wrong otherwise. Merges are written as
    ``"a b"`` strings (tokenizers < 0.20) or ``["a", "b"]`` pairs (newer)."""
    path = Path(path)
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path} is not a tokenizer.json object: {error}") from None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path}: expected a BPE tokenizer model (CLIP's), got {model!r:.80}")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError(f"{path}: model.vocab must be one object of token -> integer id")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: model.merges must be a list")
    pairs = []
    for number, merge in enumerate(merges[:limit]):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(p, str) for p in pair)
        ):
            raise ValueError(f"{path}: merge {number} is not two symbols: {merge!r:.80}")
        pairs.append((pair[0], pair[1]))
    return vocab, pairs
