"""A prompt as windows of 77 token ids, as AUTOMATIC1111's ``tokenize_line`` cuts it.

:meth:`sd_clip.CLIPTokenizer.chunks` tokenizes a prompt's weighted runs; here their tokens fill
the chunks: 75 tokens each between the start and end tokens, a ``BREAK`` closing one early,
the comma backtrack, and the positions a textual-inversion embedding's vectors take
(:class:`EmbeddingSlot`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from sd_clip.embeddings import Embedding
from sd_clip.vocabulary import WORD_END

if TYPE_CHECKING:
    from sd_clip.tokenizer import CLIPTokenizer

__all__ = ["EMBEDDING_PLACEHOLDER", "Chunk", "EmbeddingSlot"]


@dataclass
class Chunk:
    """One ``max_length`` (77) window of a prompt: what the text encoder runs on at once.

    ``ids``: start token, up to 75 tokens, end token, then padding as the tokenizer pads (at an
    embedding's positions a placeholder, 0). ``weights``: each position's emphasis, 1.0 at
    the start, end and padding. ``embedding_slots``: where each embedding's vectors go.
    """

    ids: list[int]
    weights: list[float]
    embedding_slots: list[EmbeddingSlot] = field(default_factory=list)


class EmbeddingSlot(NamedTuple):
    """Positions ``position`` to ``position + embedding.num_vectors - 1`` of a chunk take the
    embedding's vectors in place of token embeddings."""

    position: int
    embedding: Embedding


EMBEDDING_PLACEHOLDER = 0  # the id at an embedding's positions (AUTOMATIC1111's choice)


class _Chunker:
    """AUTOMATIC1111's ``tokenize_line``: fills chunks token by token, closing them as it goes."""

    def __init__(self, tokenizer: CLIPTokenizer, lookup: dict, backtrack: int):
        self.tokenizer, self.lookup, self.backtrack = tokenizer, lookup, backtrack
        self.size = tokenizer.max_length - 2
        self.comma = tokenizer.vocab.get("," + WORD_END)
        self.done: list[Chunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.slots: list[EmbeddingSlot] = []  # positions counted without the start token
        self.last_comma = -1

    def run(self, runs: list[tuple[str, float]]) -> list[Chunk]:
        for text, weight in runs:
            if text == "BREAK" and weight == -1:
                self.close()
            else:
                self.add(self.tokenizer._text_ids(text), weight)
        if self.ids or not self.done:
            self.close()
        return self.done

    def add(self, tokens: list[int], weight: float) -> None:
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == self.comma:
                self.last_comma = len(self.ids)
            elif (
                self.backtrack
                and len(self.ids) == self.size
                and self.last_comma != -1
                and self.size - self.last_comma <= self.backtrack
            ):
                self.move_after_comma()
            if len(self.ids) == self.size:
                self.close()
            embedding, length = self.find_embedding(tokens, position)
            if embedding is None:
                self.ids.append(token)
                self.weights.append(weight)
                position += 1
                continue
            n = embedding.num_vectors
            if n > self.size:
                raise ValueError(
                    f"embedding {embedding.name!r} has {n} vectors, more than the {self.size} "
                    "tokens of a chunk"
                )
            if len(self.ids) + n > self.size:
                self.close()
            self.slots.append(EmbeddingSlot(len(self.ids), embedding))
            self.ids += [EMBEDDING_PLACEHOLDER] * n
            self.weights += [weight] * n
            position += length

    def find_embedding(self, tokens: list[int], position: int) -> tuple[Embedding | None, int]:
        for ids, embedding in self.lookup.get(tokens[position], ()):
            if tokens[position : position + len(ids)] == ids:
                return embedding, len(ids)
        return None, 0

    def move_after_comma(self) -> None:
        """Close the chunk after its last comma; what followed the comma starts the next one.

        An embedding after the comma moves with its positions (AUTOMATIC1111 leaves its vectors
        behind in the closed chunk, on padding, and the moved positions as the token "!").
        """
        cut = self.last_comma + 1
        ids, weights = self.ids[cut:], self.weights[cut:]
        moved = [
            EmbeddingSlot(s.position - cut, s.embedding) for s in self.slots if s.position >= cut
        ]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.slots = [s for s in self.slots if s.position < cut]
        self.close()
        self.ids, self.weights, self.slots = ids, weights, moved

    def close(self) -> None:
        tok = self.tokenizer
        padding = self.size - len(self.ids)
        ids = [tok.start_id, *self.ids, tok.end_id] + [tok.pad_id] * padding
        weights = [1.0, *self.weights] + [1.0] * (padding + 1)
        slots = [EmbeddingSlot(s.position + 1, s.embedding) for s in self.slots]
        self.done.append(Chunk(ids, weights, slots))
        self.ids, self.weights, self.slots = [], [], []
        self.last_comma = -1
