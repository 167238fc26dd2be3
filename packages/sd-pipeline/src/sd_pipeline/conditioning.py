"""Text conditioning over the sampling steps, in AUTOMATIC1111's prompt language.

Each image's prompt is split at ``AND`` into weighted parts (composable diffusion), each part
and the negative prompt into a schedule of texts per step (prompt editing ``[a:b:when]``,
alternation ``[a|b]``), and each distinct text is encoded once by sd-clip's
``CLIPTextModel.encode_prompt`` (emphasis, ``BREAK``, chunks of 75 tokens, embeddings).
:class:`Conditioning` then answers "which contexts at step i", and :func:`guide` turns the UNet's
predictions for them into one per image, as AUTOMATIC1111's CFG denoiser does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sd_clip import prompt_schedule, split_and

__all__ = ["Conditioning", "encode_conditioning", "guide"]

# (last step, context (1, 77 k, width), pooled (1, width) or None), in order; pooled is SDXL's
# pooled text embedding, which goes to the UNet in its added conditioning
Schedule = list[tuple[int, torch.Tensor, torch.Tensor | None]]


def entry_at(schedule: Schedule, step: int) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """The entry used at 0-based sampling step ``step`` (AUTOMATIC1111's
    ``reconstruct_cond_batch``: the first entry whose last step is at or after it)."""
    for entry in schedule:
        if step <= entry[0]:
            return entry
    return schedule[-1]


def context_at(schedule: Schedule, step: int) -> torch.Tensor:
    """The context used at 0-based sampling step ``step``."""
    return entry_at(schedule, step)[1]


@dataclass
class Conditioning:
    """Per image: its negative prompt's schedule (``None`` without guidance) and its prompt's
    ``AND`` parts, each a weight and a schedule."""

    uncond: list[Schedule] | None
    cond: list[list[tuple[float, Schedule]]]

    @property
    def count(self) -> int:
        return len(self.cond)

    @property
    def simple(self) -> bool:
        """One part of weight 1 per image and no schedule: one context for every step."""
        schedules = [s for parts in self.cond for _, s in parts] + (self.uncond or [])
        return all(len(parts) == 1 and parts[0][0] == 1.0 for parts in self.cond) and all(
            len(s) == 1 for s in schedules
        )

    def rows(self, step: int, images: slice) -> tuple[list[torch.Tensor], list[int]]:
        """The contexts to run at ``step`` for some images and, for each, which image's latents
        it goes with: the images' unconditional rows first (with guidance), then each image's
        parts in order."""
        indices = range(*images.indices(self.count))
        contexts, owners = [], []
        if self.uncond is not None:
            for i in indices:
                contexts.append(context_at(self.uncond[i], step))
                owners.append(i - indices.start)
        for i in indices:
            for _, schedule in self.cond[i]:
                contexts.append(context_at(schedule, step))
                owners.append(i - indices.start)
        return contexts, owners

    def pooled_rows(self, step: int, images: slice) -> tuple[list[torch.Tensor | None], list[bool]]:
        """The pooled outputs that go with :meth:`rows`' contexts, and which rows are negative
        prompts' (for the refiner's aesthetic scores)."""
        indices = range(*images.indices(self.count))
        pooled, negative = [], []
        if self.uncond is not None:
            pooled += [entry_at(self.uncond[i], step)[2] for i in indices]
            negative += [True] * len(indices)
        for i in indices:
            for _, schedule in self.cond[i]:
                pooled.append(entry_at(schedule, step)[2])
                negative.append(False)
        return pooled, negative

    def weights(self, images: slice) -> list[list[float]]:
        return [[w for w, _ in self.cond[i]] for i in range(*images.indices(self.count))]

    def fixed_context(self, images: slice) -> torch.Tensor:
        """For a :attr:`simple` conditioning of equal lengths: the one context of the images,
        [unconditional rows; conditional rows], as the UNet's shared-latents batch takes it."""
        contexts, _ = self.rows(0, images)
        return torch.cat(contexts)


def encode_conditioning(
    encode: Callable[[list[str]], torch.Tensor],
    image_prompts: Sequence[tuple[str, str]],
    steps: int,
    guided: bool,
) -> Conditioning:
    """The conditioning of each (prompt, negative prompt) pair over ``steps`` steps. ``encode``
    maps a list of texts to their contexts (n, 77 k, width), or to (contexts, pooled (n,
    width)) for SDXL; as AUTOMATIC1111 does, it gets
    one prompt's schedule texts together (emphasis is normalised over them), once per distinct
    prompt."""
    cache: dict[str, Schedule] = {}

    def schedule(text: str) -> Schedule:
        if text not in cache:
            entries = prompt_schedule(text, steps)
            encoded = encode([part for _, part in entries])
            contexts, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
            cache[text] = [
                (last, contexts[i : i + 1], None if pooled is None else pooled[i : i + 1])
                for i, (last, _) in enumerate(entries)
            ]
        return cache[text]

    cond = [[(w, schedule(part)) for part, w in split_and(prompt)] for prompt, _ in image_prompts]
    uncond = None
    if guided or any(len(parts) > 1 for parts in cond):
        uncond = [schedule(negative) for _, negative in image_prompts]
    return Conditioning(uncond=uncond, cond=cond)


def guide(
    outputs: torch.Tensor,
    weights: list[list[float]],
    scale: float,
    guided: bool,
) -> torch.Tensor:
    """One prediction per image from the predictions for :meth:`Conditioning.rows`:
    ``uncond + scale * sum_k w_k (cond_k - uncond)`` (AUTOMATIC1111's composable diffusion;
    classifier-free guidance when there is one part), or the conditional prediction alone
    without guidance."""
    n = len(weights)
    if not guided and all(w == [1.0] for w in weights):
        return outputs
    uncond, cond = outputs[:n], outputs[n:]
    if all(w == [1.0] for w in weights):  # plain classifier-free guidance
        return uncond + scale * (cond - uncond)
    result = uncond.clone()
    row = 0
    for i, parts in enumerate(weights):
        for w in parts:
            result[i] += scale * w * (cond[row] - uncond[i])
            row += 1
    return result
