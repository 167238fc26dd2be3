"""What a user adds to a model: textual-inversion embeddings and LoRAs.

:class:`Adapters` is the part of ``StableDiffusion`` that loads them and, for AUTOMATIC1111's
``<lora:name:te:unet>`` prompt tags, merges the named LoRAs for one run and takes them out
again (``sd_pipeline.lora`` does the work, on sd-lora).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sd_pipeline import lora as lora_glue
from sd_pipeline.request import GenerationRequest

__all__ = ["Adapters", "without_lora_tags"]


class Adapters:
    """Embeddings and LoRAs of a pipeline (``unet``, ``text_encoder``, ``tokenizer``,
    ``embeddings``, ``lora_dir`` come from ``StableDiffusion``)."""

    def load_embeddings(self, source: Mapping[str, Any] | str | os.PathLike) -> dict:
        """Add textual-inversion embeddings: a folder of AUTOMATIC1111 / diffusers embedding
        files (each file's name is its trigger word in a prompt), one such file, or a dict of
        trigger word -> ``sd_clip.Embedding``. Returns the embeddings added."""
        import sd_clip

        if isinstance(source, Mapping):
            found = dict(source)
        elif Path(source).is_dir():
            found = sd_clip.load_embeddings(source)
        else:
            embedding = sd_clip.load_embedding(source)
            found = {embedding.name: embedding}
        self.embeddings.update(found)
        return found

    def load_lora(
        self,
        path: str | os.PathLike,
        weight: float = 1.0,
        text_encoder_weight: float | None = None,
        *,
        in_place: bool = False,
    ):
        """Merge a LoRA / LyCORIS file (kohya, AUTOMATIC1111, diffusers/PEFT layouts) into the
        UNet (at ``weight``) and the text encoder (at ``text_encoder_weight``, default
        ``weight``) until :meth:`unload_loras`; returns the ``sd_lora.LoRA``. Several stack.
        ``in_place=True`` (float32 models): added into the weights' memory and subtracted
        again on unload, as diffusers' ``fuse_lora``: no second copy of the adapted weights,
        the originals back to float32 rounding instead of bit for bit."""
        from sd_lora import LoRA

        lora = LoRA.from_file(path)
        lora_glue.apply_loras(
            self.unet, self._encoders, [(lora, weight, text_encoder_weight)], in_place=in_place
        )
        self._loras.append((Path(path).stem, lora_glue.lora_hash(path)))
        return lora

    def unload_loras(self) -> None:
        """Take every LoRA out again: the original weights, bit for bit (to float32 rounding
        for those loaded ``in_place``)."""
        lora_glue.remove_loras(self.unet, self._encoders)
        self._loras.clear()

    @property
    def _encoders(self) -> list:
        """The text encoders a LoRA's text layers go to (SDXL: CLIP-L and bigG)."""
        return list(self.conditioner.encoders)

    @contextlib.contextmanager
    def _loras_of_prompts(self, request: GenerationRequest):
        """The ``<lora:name:te:unet>`` tags of the prompts (AUTOMATIC1111's syntax), found in
        ``lora_dir`` and merged for the run, then taken out again."""
        tagged = [p for p in dict.fromkeys(request.prompts) if "<" in p]
        found: dict[str, Any] = {}
        for prompt in tagged:
            _, tags = lora_glue.parse_prompt(prompt)
            if tags and self.lora_dir is None:
                raise ValueError(
                    f"the prompt names <lora:{tags[0].name}> but no LoRA folder is set: pass "
                    "lora_dir= (sd-generate --lora-dir DIR)"
                )
            if tags:
                for r in lora_glue.resolve_prompt(prompt, self.lora_dir, self.recorded_lora_hashes)[
                    1
                ]:
                    found.setdefault(r.name, r)
        if not found:
            yield
            return
        from sd_lora import LoRA

        loras = [(LoRA.from_file(r.path), r.unet_weight, r.te_weight) for r in found.values()]
        lora_glue.apply_loras(self.unet, self._encoders, loras)
        self._prompt_loras = [(r.name, r.hash) for r in found.values()]
        try:
            yield
        finally:
            lora_glue.remove_loras(self.unet, self._encoders, [lora for lora, _, _ in loras])
            self._prompt_loras = []

    def _ti_hashes(self, request: GenerationRequest) -> dict[str, str]:
        """AUTOMATIC1111's ``TI hashes`` field: the embeddings the prompts use, then the
        negative prompts'."""
        if not self.embeddings:
            return {}
        import sd_clip

        texts = list(dict.fromkeys(request.prompts + request.negative_prompts))
        used = [slot.embedding for text in texts
                for chunk in self.tokenizer.chunks(text, self.embeddings)
                for slot in chunk.embedding_slots]  # fmt: skip
        value = sd_clip.ti_hashes(used)
        return {"TI hashes": value} if value else {}


def without_lora_tags(prompt: str) -> str:
    return lora_glue.parse_prompt(prompt)[0] if "<" in prompt else prompt
