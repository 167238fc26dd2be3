"""Small module trees with the names of the real models (no sibling package is imported): a
UNet with the CompVis names of sd-unet, a text encoder with the transformers names of sd-clip,
and helpers that write LoRA files for them with random tensors."""

from __future__ import annotations

import torch
from torch import nn

torch.set_num_threads(1)


def _seq(*layers):
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, ch, out, emb=16):
        super().__init__()
        self.in_layers = _seq(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.emb_layers = _seq(nn.SiLU(), nn.Linear(emb, out))
        self.out_layers = _seq(
            nn.GroupNorm(4, out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if ch == out else nn.Conv2d(ch, out, 1)


class Attention(nn.Module):
    def __init__(self, dim, context):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context, dim, bias=False)
        self.to_v = nn.Linear(context, dim, bias=False)
        self.to_out = _seq(nn.Linear(dim, dim), nn.Dropout(0.0))


class GEGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim * 8)


class Block(nn.Module):
    def __init__(self, dim, context=12):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.ff = nn.Module()
        self.ff.net = _seq(GEGLU(dim), nn.Dropout(0.0), nn.Linear(dim * 4, dim))
        self.attn2 = Attention(dim, context)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))


class SpatialTransformer(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([Block(ch)])
        self.proj_out = nn.Conv2d(ch, ch, 1)


class Down(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)


class Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)


class TinyUNet(nn.Module):
    """sd-unet's layout at two levels, one ResBlock each, attention on the first level."""

    def __init__(self):
        super().__init__()
        self.time_embed = _seq(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 16))
        self.input_blocks = nn.ModuleList(
            [
                _seq(nn.Conv2d(4, 8, 3, padding=1)),
                _seq(ResBlock(8, 8), SpatialTransformer(8)),
                _seq(Down(8)),
                _seq(ResBlock(8, 16)),
            ]
        )
        self.middle_block = _seq(ResBlock(16, 16), SpatialTransformer(16), ResBlock(16, 16))
        self.output_blocks = nn.ModuleList(
            [
                _seq(ResBlock(32, 16)),
                _seq(ResBlock(24, 16), Up(16)),
                _seq(ResBlock(24, 8), SpatialTransformer(8)),
                _seq(ResBlock(16, 8), SpatialTransformer(8)),
            ]
        )
        self.out = _seq(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))


class TinyTextEncoder(nn.Module):
    """sd-clip's (and transformers 4's) layout: text_model.encoder.layers.N...."""

    def __init__(self, width=12, layers=2):
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(layer.self_attn, name, nn.Linear(width, width))
            layer.mlp = nn.Module()
            layer.mlp.fc1, layer.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            self.text_model.encoder.layers.append(layer)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def kohya_lora(modules: dict[str, nn.Module], prefix: str, rank: int = 4, alpha: float = 2.0,
               seed: int = 1, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """kohya tensors for the given modules (conv: LoCon with the kernel's size in lora_down),
    named ``prefix + names[path]`` flattened (the path itself without ``names``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, m in modules.items():
        key = prefix + (names or {}).get(path, path).replace(".", "_")
        w = m.weight
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, w.shape[1], generator=g)
            up = torch.randn(w.shape[0], rank, generator=g)
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """The model's linear and conv layers by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
