"""The CLIP text transformer that turns token ids into Stable Diffusion's conditioning.

A pre-LayerNorm transformer with causal self-attention, read top to bottom: the MLP, the
attention, the block, then the config and the model. Module names are those of transformers'
``CLIPTextModel``, which is how Stable Diffusion 1.x checkpoints store the text encoder under
``cond_stage_model.transformer.``, so loading one is a prefix strip (see ``sd_clip.weights``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


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
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, rotary_base: float | None = None):
        super().__init__()
        self.heads = heads
        self.rotary_base = rotary_base  # None: positions come from the learned table instead
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

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

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """SD 1.x (and SDXL's first text encoder): CLIP ViT-L/14, 123M parameters."""
        return cls()

    @classmethod
    def sd2(cls) -> CLIPTextConfig:
        """SD 2.x: OpenCLIP ViT-H/14's text tower, of which SD uses 23 of the 24 layers."""
        return cls(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A small model for tests, with the real vocabulary so the real tokenizer feeds it."""
        return cls(width=128, layers=2, heads=2, mlp_width=512)


class Embeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        if config.position_embedding == "learned":
            self.position_embedding = nn.Embedding(config.max_positions, config.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids)
        if hasattr(self, "position_embedding"):
            x = x + self.position_embedding.weight[: ids.shape[1]]
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
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # CLIP's scheme, simplified: small normal weights, zero biases (real use loads a checkpoint).
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Hidden states (B, T, width) for token ids (B, T), T <= max_positions.

        ``clip_skip=1`` is the last layer's output; ``clip_skip=2`` the penultimate layer's (as
        AUTOMATIC1111's "Clip skip: 2" and diffusers' ``clip_skip=1``), and so on. Either way the
        final LayerNorm is applied, as Stable Diffusion does.
        """
        self._check_ids(ids)
        n = self.config.layers
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= n:
            raise ValueError(
                f"clip_skip must be an integer from 1 (last layer) to {n}, got {clip_skip!r}"
            )
        tm = self.text_model
        x = tm.embeddings(ids)
        for layer in tm.encoder.layers[: n - clip_skip + 1]:
            x = layer(x)
        return tm.final_layer_norm(x)

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

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        config: CLIPTextConfig | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> CLIPTextModel:
        """Load from an SD single file, a transformers/diffusers folder, a bare file, or the
        tensors of such a file already read (``sd_clip.load_state_dict(path)``, or any mapping of
        names to tensors), so that one pickle is read once for several models.

        See :func:`sd_clip.weights.load_text_model` for the layouts. The config comes from
        ``config``, else the file (its safetensors metadata, or ``config.json``), else the tensor
        shapes. ``dtype`` defaults to float32 (every floating tensor, whatever the file stores),
        ``device`` to the CPU. Bad files raise ``CheckpointError``.
        """
        from sd_clip.weights import load_text_model

        return load_text_model(path, config=config, dtype=dtype, device=device)

    def save(self, path: str | os.PathLike) -> None:
        """Write the weights (transformers layout) and the config to a ``.safetensors`` file."""
        from sd_clip.weights import save_text_model

        save_text_model(self, path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
