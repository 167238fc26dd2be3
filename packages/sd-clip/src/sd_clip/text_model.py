"""The CLIP text transformer that turns token ids into Stable Diffusion's conditioning.

A pre-LayerNorm transformer with causal self-attention, read top to bottom: the MLP, the
attention, the block, then the config and the model. Module names are those of transformers'
``CLIPTextModel``, which is how Stable Diffusion 1.x checkpoints store the text encoder under
``cond_stage_model.transformer.``, so loading one is a prefix strip (see ``sd_clip.weights``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sd_clip._onednn import Linear

if TYPE_CHECKING:
    from sd_clip.embeddings import Embedding
    from sd_clip.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (what the ViT-L/14 text encoder was trained with)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def rotary_tables(
    length: int, head_dim: int, base: float, device=None, dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (length, head_dim): position t, pair i turns by t / base^(2i/d)."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs): the two halves of a head share angles
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of each head by the position's angle (RoFormer, Su et al. 2021)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.fc1 = Linear(width, mlp_width)
        self.fc2 = Linear(mlp_width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, rotary_base: float | None = None):
        super().__init__()
        self.heads = heads
        self.rotary_base = rotary_base  # None: positions come from the learned table instead
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.rotary_base is not None:
            cos, sin = rotary_tables(T, C // self.heads, self.rotary_base, x.device, x.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        rotary = config.rope_base if config.position_embedding == "rotary" else None
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = CausalSelfAttention(config.width, config.heads, rotary)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config.width, config.mlp_width, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer. Defaults are SD 1.x's: OpenAI CLIP ViT-L/14's text half."""

    vocab_size: int = (
        49408  # CLIP's byte-level BPE vocabulary: 256 bytes x2, 48894 merges, 2 specials
    )
    max_positions: int = 77  # CLIP's context length: start token, 75 tokens, end token
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"  # OpenCLIP models use exact gelu
    layer_norm_eps: float = 1e-5
    position_embedding: Literal["learned", "rotary"] = "learned"
    rope_base: float = 10000.0  # rotary only: the RoFormer frequency base
    # Width of the pooled output's projection (CLIPTextModelWithProjection's text_projection;
    # SDXL's second encoder feeds it to the UNet); None: no projection (SD 1.x and 2.x need none)
    projection_dim: int | None = None

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose from: {', '.join(ACTIVATIONS)}"
            )
        if self.position_embedding not in ("learned", "rotary"):
            raise ValueError(
                f"unknown position_embedding {self.position_embedding!r}; "
                "choose from: learned, rotary"
            )
        if self.position_embedding == "rotary" and (self.width // self.heads) % 2:
            raise ValueError(f"rotary needs an even head size, got {self.width // self.heads}")
        for name in ("vocab_size", "max_positions", "width", "layers", "heads", "mlp_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.projection_dim is not None and (
            not isinstance(self.projection_dim, int) or self.projection_dim < 1
        ):
            raise ValueError(
                f"projection_dim must be a positive integer or None, got {self.projection_dim!r}"
            )

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """SD 1.x (and SDXL's first text encoder): CLIP ViT-L/14, 123M parameters."""
        return cls()

    @classmethod
    def sd2(cls) -> CLIPTextConfig:
        """SD 2.x: OpenCLIP ViT-H/14's text tower, of which SD uses 23 of the 24 layers."""
        return cls(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")

    @classmethod
    def sdxl_l(cls) -> CLIPTextConfig:
        """SDXL's first text encoder: the same CLIP ViT-L/14 as SD 1.x (diffusers' text_encoder)."""
        return cls()

    @classmethod
    def sdxl_g(cls) -> CLIPTextConfig:
        """SDXL's second text encoder (the refiner's only one): OpenCLIP ViT-bigG/14's text tower,
        all 32 layers, with the projection of its pooled output (diffusers' text_encoder_2)."""
        return cls(
            width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280
        )

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A small model for tests, with the real vocabulary so the real tokenizer feeds it."""
        return cls(width=128, layers=2, heads=2, mlp_width=512)


def _embedding(count: int, width: int) -> nn.Embedding:
    """An ``nn.Embedding`` without its own initialisation (``CLIPTextModel`` initialises it):
    on the meta device, where the loaders build the model, the first ``normal_`` imports
    torch's compiler stack, seconds of a cold start."""
    return nn.Embedding(count, width, _weight=torch.empty(count, width))


class Embeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        if config.position_embedding == "learned":
            self.position_embedding = _embedding(config.max_positions, config.width)

    def forward(self, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids) if inputs_embeds is None else inputs_embeds
        if hasattr(self, "position_embedding"):
            x = x + self.position_embedding.weight[: x.shape[1]]
        return x


class Encoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))


class TextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """The CLIP text encoder: ``model(ids)`` -> (B, T, width) hidden states after the final LayerNorm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config)
        if config.projection_dim is not None:  # transformers' CLIPTextModelWithProjection's name
            self.text_projection = Linear(config.width, config.projection_dim, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # CLIP's scheme, simplified: small normal weights, zero biases (real use loads a checkpoint).
        # Not on the meta device, where the loaders build the model: there normal_ holds no
        # values, and runs through torch's Python reference, which imports its compiler stack.
        weight = getattr(module, "weight", None)
        if weight is not None and weight.is_meta:
            return
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(
        self,
        ids: torch.Tensor | None,
        clip_skip: int = 1,
        *,
        inputs_embeds: torch.Tensor | None = None,
        final_norm: bool = True,
        pooled: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T, width) for token ids (B, T), T <= max_positions.

        ``clip_skip=1`` is the last layer's output; ``clip_skip=2`` the penultimate layer's (as
        AUTOMATIC1111's "Clip skip: 2" and diffusers' ``clip_skip=1``), and so on. With
        ``final_norm`` (the default) the final LayerNorm is applied to it, as SD 1.x and 2.x do;
        SDXL conditions on the penultimate layer without it: ``clip_skip=2, final_norm=False``
        is transformers' ``hidden_states[-2]``.

        ``pooled=True`` returns ``(hidden, pooled)``: pooled (B, projection_dim, or width without
        a projection) is the end token's state after the last layer and the final LayerNorm,
        through ``text_projection``: transformers' ``text_embeds`` (``pooler_output`` for a model
        without projection), SDXL's pooled conditioning. The end token is found as the largest
        id (where the OpenAI and OpenCLIP vocabularies put it), so ``ids`` must be given.

        ``inputs_embeds`` (B, T, width), as in transformers: token embeddings to use in place of
        looking ``ids`` up (textual inversion puts its vectors there); the position embedding
        is added to them all the same. ``ids`` may then be ``None``.
        """
        if inputs_embeds is None or ids is not None:
            self._check_ids(ids)
        if inputs_embeds is not None:
            self._check_inputs_embeds(inputs_embeds, ids)
        n = self.config.layers
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= n:
            raise ValueError(
                f"clip_skip must be an integer from 1 (last layer) to {n}, got {clip_skip!r}"
            )
        for name, value in (("final_norm", final_norm), ("pooled", pooled)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if pooled and ids is None:
            raise ValueError("pooled=True needs ids: the pooled output is at the end token's place")
        tm = self.text_model
        x = tm.embeddings(ids, inputs_embeds)
        stop = n - clip_skip + 1  # layers that the hidden states go through
        for layer in tm.encoder.layers[:stop]:
            x = layer(x)
        hidden = tm.final_layer_norm(x) if final_norm else x
        if not pooled:
            return hidden
        last = hidden if final_norm and stop == n else tm.final_layer_norm(self._rest(x, stop))
        return hidden, self._pool(last, ids)

    def _rest(self, x: torch.Tensor, start: int) -> torch.Tensor:
        for layer in self.text_model.encoder.layers[start:]:
            x = layer(x)
        return x

    def _pool(self, last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # The first end token: argmax takes the first of equal maxima, so end-token padding is
        # skipped as OpenCLIP's text.argmax(-1) and transformers' first-eos rule skip it.
        end = ids.to(last.device).argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), end]  # (B, width)
        projection = getattr(self, "text_projection", None)
        return pooled if projection is None else projection(pooled)

    def _check_ids(self, ids: torch.Tensor) -> None:
        c = self.config
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int32):
            what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"ids must be an integer tensor (B, T) of token ids, got {what}")
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must have shape (batch, tokens), got {tuple(ids.shape)}")
        if c.position_embedding == "learned" and ids.shape[1] > c.max_positions:
            raise ValueError(
                f"{ids.shape[1]} tokens do not fit the {c.max_positions} positions of this model; "
                "truncate the prompt (the tokenizer's __call__ does)"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {c.vocab_size}), got values from {int(ids.min())} "
                f"to {int(ids.max())}"
            )

    def _check_inputs_embeds(self, embeds: torch.Tensor, ids: torch.Tensor | None) -> None:
        c = self.config
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[2] != c.width:
            what = (
                tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            )
            raise ValueError(
                f"inputs_embeds must be a tensor (batch, tokens, {c.width}), got {what}"
            )
        if ids is not None and tuple(ids.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                f"ids {tuple(ids.shape)} and inputs_embeds {tuple(embeds.shape)} must have the "
                "same batch and token count"
            )
        if c.position_embedding == "learned" and embeds.shape[1] > c.max_positions:
            raise ValueError(
                f"{embeds.shape[1]} tokens do not fit the {c.max_positions} positions of this model"
            )

    def encode_prompt(
        self,
        text: str | Sequence[str],
        tokenizer: CLIPTokenizer | None = None,
        embeddings: Mapping[str, Embedding] | Iterable[Embedding] | None = None,
        clip_skip: int | None = None,
        normalize: bool = True,
        comma_padding_backtrack: int = 20,
        *,
        final_norm: bool = True,
        pooled: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """A prompt in AUTOMATIC1111's language -> its conditioning (1, 77 * chunks, width).

        As AUTOMATIC1111's ``FrozenCLIPEmbedderWithCustomWords``: the prompt is cut into chunks
        (:meth:`CLIPTokenizer.chunks`: emphasis, ``BREAK``, 75 tokens each, the comma rule,
        embeddings), every chunk goes through the encoder in one batched forward pass, with the
        embeddings' vectors in place of their token embeddings, and each token's output is
        multiplied by its weight. With ``normalize`` (AUTOMATIC1111's default) each chunk is
        then scaled back to its unweighted mean; ``normalize=False`` is ComfyUI's and
        AUTOMATIC1111's "No norm". The chunks' outputs are concatenated.

        A list of texts gives (B, 77 * most chunks, width), encoded as AUTOMATIC1111 encodes
        the texts of one prompt's schedule together: a text with fewer chunks is padded with
        the empty prompt's chunk, and the mean of chunk i is taken over all the texts' chunk i
        (repeats included). Each distinct text goes through the encoder once.

        ``tokenizer``: the bundled CLIP tokenizer by default (SD 2.x pads with ``pad_id=0``:
        pass ``CLIPTokenizer(pad_id=0)``, or ``CLIPTokenizer.from_folder`` of the model's
        ``tokenizer/``). ``clip_skip`` and ``final_norm``: as in ``forward`` (``None``: 1).
        ``pooled=True`` returns ``(context, pooled)``, pooled (B, projection_dim) the pooled
        output of each text's first chunk, unweighted (as AUTOMATIC1111 takes SDXL's); for
        SDXL's two encoders together see :func:`encode_prompt_sdxl`.
        """
        from sd_clip.tokenizer import CLIPTokenizer

        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a non-empty list of str")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        tokenizer = _default_tokenizer() if tokenizer is None else tokenizer
        if not isinstance(tokenizer, CLIPTokenizer):
            raise TypeError(f"tokenizer must be a CLIPTokenizer, got {type(tokenizer).__name__}")
        # Each distinct text's chunks are encoded once, with one empty chunk if a text needs
        # padding; then gathered into rows chunk-major: row i * B + b is chunk i of text b.
        distinct = {t: tokenizer.chunks(t, embeddings, comma_padding_backtrack) for t in texts}
        count = max(len(chunks) for chunks in distinct.values())
        rows, first_row = [], {}
        for t, chunks in distinct.items():
            first_row[t] = len(rows)
            rows += chunks
        if any(len(chunks) < count for chunks in distinct.values()):
            rows.append(tokenizer.chunks("")[0])
        index = [
            first_row[t] + i if i < len(distinct[t]) else len(rows) - 1
            for i in range(count)
            for t in texts
        ]
        encoded = self._encode_chunks(
            rows, 1 if clip_skip is None else clip_skip, final_norm=final_norm, pooled=pooled
        )
        if pooled:
            encoded, pools = encoded
            pools = pools[torch.tensor([first_row[t] for t in texts], device=pools.device)]
        weights = torch.tensor([row.weights for row in rows], dtype=encoded.dtype)
        index = torch.tensor(index, device=encoded.device)
        z, weights = encoded[index], weights.to(encoded.device)[index]
        weighted = z * weights[..., None]
        if normalize:
            B = len(texts)
            z, weighted = z.view(count, B, *z.shape[1:]), weighted.view(count, B, *z.shape[1:])
            before = z.mean(dim=(1, 2, 3), keepdim=True)
            after = weighted.mean(dim=(1, 2, 3), keepdim=True)
            weighted = weighted * _safe_ratio(before, after)
        width = z.shape[-1]
        out = weighted.reshape(count, len(texts), -1, width).transpose(0, 1)  # (B, k, 77, C)
        out = out.reshape(len(texts), -1, width)
        return (out, pools) if pooled else out

    def _encode_chunks(self, rows: list, clip_skip: int, **options) -> torch.Tensor:
        """Chunks through the encoder in one forward pass, embeddings in their slots."""
        ids = torch.tensor([row.ids for row in rows], dtype=torch.long, device=self.device)
        self._check_ids(ids)
        embeds = None
        if any(row.embedding_slots for row in rows):
            embeds = self.text_model.embeddings.token_embedding(ids)
            width = self.config.width
            for r, row in enumerate(rows):
                for position, embedding in row.embedding_slots:
                    vectors = embedding.vectors_for(width).to(embeds.device, embeds.dtype)
                    embeds[r, position : position + len(vectors)] = vectors
        return self(ids, clip_skip, inputs_embeds=embeds, **options)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        config: CLIPTextConfig | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        which: int | None = None,
    ) -> CLIPTextModel:
        """Load from an SD single file, a transformers/diffusers folder, a bare file, or the
        tensors of such a file already read (``sd_clip.load_state_dict(path)``, or any mapping of
        names to tensors), so that one pickle is read once for several models.

        See :func:`sd_clip.weights.load_text_model` for the layouts. The config comes from
        ``config``, else the file (its safetensors metadata, or ``config.json``), else the tensor
        shapes. ``dtype`` defaults to float32 (every floating tensor, whatever the file stores),
        ``device`` to the CPU. Bad files raise ``CheckpointError``.

        ``which`` picks the encoder of an SDXL file or root: ``0`` the first (CLIP ViT-L,
        ``conditioner.embedders.0.transformer.``, ``text_encoder/``), ``1`` the second (OpenCLIP
        ViT-bigG with its projection, ``conditioner.embedders.1.model.``, ``text_encoder_2/``;
        the refiner's only encoder); ``None`` the first there is (any file's only one).
        """
        from sd_clip.weights import load_text_model

        return load_text_model(path, config=config, dtype=dtype, device=device, which=which)

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights (transformers layout) and the config to a ``.safetensors`` file."""
        from sd_clip.weights import save_text_model

        save_text_model(self, path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def encode_prompt_sdxl(
    text: str | Sequence[str],
    encoders: Sequence[CLIPTextModel],
    tokenizers: Sequence[CLIPTokenizer | None] | None = None,
    embeddings: Mapping[str, Embedding] | Iterable[Embedding] | None = None,
    clip_skip: int | None = None,
    normalize: bool = True,
    comma_padding_backtrack: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning: ``(context (B, 77 k, sum of widths), pooled (B, projection))``.

    ``encoders``: ``(clip_l, clip_g)`` for SDXL base (diffusers' ``text_encoder`` and
    ``text_encoder_2``), ``(clip_g,)`` for the refiner. Each encodes the prompt as
    :meth:`CLIPTextModel.encode_prompt` does (chunks, emphasis, embeddings: an SDXL embedding's
    ``clip_l`` and ``clip_g`` vectors go to the encoder of their width), taking the penultimate
    layer without the final LayerNorm, as SDXL was trained and as diffusers'
    ``StableDiffusionXLPipeline`` and AUTOMATIC1111 do; the contexts are concatenated along the
    width, and ``pooled`` is the last encoder's pooled output of each text's first chunk.

    ``tokenizers``: one per encoder; by default the bundled vocabulary, padded as SDXL's
    tokenizers pad: with the end token for CLIP-L, with ``"!"`` (id 0) for the last (OpenCLIP
    bigG) encoder. ``clip_skip``: as in ``forward`` for every encoder; ``None`` is SDXL's 2.
    """
    from sd_clip.tokenizer import CLIPTokenizer

    encoders = list(encoders) if isinstance(encoders, Sequence) else [encoders]
    if not encoders or not all(isinstance(e, CLIPTextModel) for e in encoders):
        raise TypeError("encoders must be a non-empty sequence of CLIPTextModel: (clip_l, clip_g)")
    if encoders[-1].config.projection_dim is None:
        raise ValueError(
            "the last encoder must have a text_projection (SDXL's OpenCLIP ViT-bigG, "
            "CLIPTextConfig.sdxl_g()): its pooled output conditions the UNet"
        )
    if tokenizers is None:
        tokenizers = [None] * len(encoders)
    if len(tokenizers) != len(encoders):
        raise ValueError(f"give one tokenizer per encoder: {len(encoders)}, got {len(tokenizers)}")
    tokenizers = [
        tok if tok is not None else _default_tokenizer() if i < len(encoders) - 1
        else CLIPTokenizer(pad_id=0)
        for i, tok in enumerate(tokenizers)
    ]  # fmt: skip
    contexts, pooled = [], None
    for i, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
        out = encoder.encode_prompt(
            text, tokenizer, embeddings, 2 if clip_skip is None else clip_skip, normalize,
            comma_padding_backtrack, final_norm=False, pooled=i == len(encoders) - 1,
        )  # fmt: skip
        if i == len(encoders) - 1:
            out, pooled = out
        contexts.append(out)
    if len({c.shape[1] for c in contexts}) > 1:
        raise ValueError(
            "the tokenizers cut the prompt into different numbers of tokens "
            f"({', '.join(str(c.shape[1]) for c in contexts)}); give tokenizers of one vocabulary"
        )
    device = contexts[-1].device
    return torch.cat([c.to(device) for c in contexts], dim=-1), pooled


@lru_cache(maxsize=1)
def _default_tokenizer() -> CLIPTokenizer:
    from sd_clip.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def _safe_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """before / after, or 1 where the weighted mean is 0: weights that cancel out (such as
    negative ones) would otherwise scale the chunk by infinity, into NaN."""
    ratio = before / after
    bad = ~torch.isfinite(ratio)
    if bool((bad & (before != 0)).any()):
        logger.warning(
            "a prompt chunk's weighted mean is 0 (its weights cancel out); it is left unnormalised"
        )
    return torch.where(bad, torch.ones_like(ratio), ratio)


def pad_to_same_length(
    *contexts: torch.Tensor, empty: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Contexts (B, T_i, width) padded along T to the longest one, as AUTOMATIC1111 pads.

    With ``empty`` (the empty prompt's encoding, (1, 77, width): ``encode_prompt("")``), each
    shorter context is extended with copies of it: AUTOMATIC1111's "Pad prompt/negative prompt"
    (``pad_cond_uncond``), which lets the conditional and unconditional passes share a batch.
    Without it, with copies of the context's last token vector: what AUTOMATIC1111 does to stack
    the ``AND`` parts of a prompt (``reconstruct_multicond_batch``). AUTOMATIC1111's default for
    a prompt and negative prompt of different lengths is neither: two UNet passes, one per
    length.
    """
    if not contexts or not all(isinstance(c, torch.Tensor) and c.ndim == 3 for c in contexts):
        raise ValueError("give one or more contexts, each a tensor (batch, tokens, width)")
    longest = max(c.shape[1] for c in contexts)
    padded = []
    for c in contexts:
        missing = longest - c.shape[1]
        if missing == 0:
            padded.append(c)
        elif empty is None:
            padded.append(torch.cat([c, c[:, -1:].expand(-1, missing, -1)], dim=1))
        else:
            if empty.ndim != 3 or empty.shape[0] != 1 or missing % empty.shape[1]:
                raise ValueError(
                    f"empty must be one encoded chunk (1, tokens, width) whose length divides "
                    f"the difference in lengths ({missing}); got {tuple(empty.shape)}"
                )
            repeats = empty.to(c.device, c.dtype).expand(c.shape[0], -1, -1)
            padded.append(torch.cat([c, *[repeats] * (missing // empty.shape[1])], dim=1))
    return tuple(padded)
