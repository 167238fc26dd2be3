"""ControlNet (Zhang, Rao & Agrawala, 2023): a trainable copy of the UNet's encoder half that
turns a control image (edges, depth, pose, ...) into residuals for the UNet's skip connections.

Module and parameter names are those of the original ControlNet code (``cldm.py``), so a
published file's ``control_model.*`` tensors load with a prefix strip (see ``weights.py``):

    time_embed, label_emb (SDXL), input_hint_block, input_blocks, zero_convs, middle_block,
    middle_block_out

    down, mid = controlnet(latents, timesteps, context, hint)
    eps = unet(latents, timesteps, context, down_residuals=down, mid_residual=mid)

The blocks below are this package's own (it imports no sibling); their maths is the UNet's,
block for block, since the ControlNet starts as a copy of the UNet's weights.

Shared latents, as sd-unet: ``context`` may have k times the latents' batch (classifier-free
guidance, [unconditional; conditional]); then the latents and the hint stand for k copies, and
the residuals have k·B rows. What the context cannot reach yet (the hint encoder, the input
convolution, the first ResBlock) runs once per image; the batch grows at the first
cross-attention.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd_controlnet import _onednn
from sd_controlnet import _winograd as winograd


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim): cos, then sin."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _repeat_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` stacked on itself to ``batch`` rows: ``[t; t; ...]`` (see "Shared latents")."""
    if t.shape[0] == batch:
        return t
    return torch.cat([t] * (batch // t.shape[0]))


class SiLU(nn.Module):
    """SiLU in place: it only ever follows a GroupNorm, whose output nothing else reads."""

    def forward(self, x):
        return F.silu(x, inplace=True)


class Conv3x3(nn.Conv2d):
    """The ResBlocks' 3x3, stride-1 convolutions (an ``nn.Conv2d``, same parameters), as
    sd-unet's: in float32 on the CPU without autograd, over at least ``winograd_min_pixels``
    output pixels (batch x height x width), Winograd's F(4x4, 3x3) (``_winograd``, a checked
    copy of sd-unet's): 4 times fewer multiply-adds, equal to float32 rounding (1e-5 of the
    largest value); it pays at SD's two largest levels. Over at most
    ``product_pixels_per_channel`` output pixels per input channel (the 1280-channel levels),
    one matrix product (``_winograd.conv3x3_product``), where the direct convolution runs at
    half the product's rate or less. ``None`` turns either off."""

    winograd_min_pixels: int | None = 2048
    product_pixels_per_channel: float | None = 0.5

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.workspace: winograd.Workspace | None = None  # the ControlNet gives its convs one

    def forward(self, x):
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x, weight, bias):
        """The forward with another weight and bias (what sd-lora folds a LoRA into)."""
        if _onednn.cpu_float32_inference(x, weight):
            out = winograd.fast_conv3x3(x, weight, bias, self.workspace, self.winograd_min_pixels,
                                        self.product_pixels_per_channel, _onednn.linear)  # fmt: skip
            if out is not None:
                return out
        return self._conv_forward(x, weight, bias)


Linear = _onednn.Linear  # the linear layers: oneDNN's kernel for float32 CPU inference


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, then GroupNorm-SiLU-conv, plus x."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels, eps=1e-5),
            SiLU(),
            Conv3x3(channels, out_channels),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels, eps=1e-5),
            SiLU(),
            nn.Dropout(0.0),
            Conv3x3(out_channels, out_channels),
        )
        if channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h += self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        h = self.out_layers(h)
        return h.add_(self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, T, C) over context (B, S, D), or over itself."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q = _repeat_rows(q, k.shape[0])  # one query per image, k contexts: the batch grows here
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, T, C)


class GEGLU(nn.Module):
    """A linear layer to twice the width; one half gated by the GELU of the other."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(h)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, feed-forward; each pre-norm, residual."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)).add_(x)
        h = self.attn2(self.norm2(x), context)
        x = h.add_(_repeat_rows(x, h.shape[0]))
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, plus x.

    The projections are 1x1 convolutions in SD 1.x and linear layers in SD 2.x and SDXL.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 groups: int, linear: bool):  # fmt: skip
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear:
            self.proj_in = Linear(channels, inner)
            self.proj_out = Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, context_dim, heads, head_dim) for _ in range(depth)
        )

    def forward(self, x, context):
        H, W = x.shape[-2:]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return h.add_(_repeat_rows(x, h.shape[0]))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks, each given what it takes: the time embedding, the context, or neither."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):  # (where a transformer here grew the batch)
                x = layer(x, _repeat_rows(emb, x.shape[0]))
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


@dataclass(frozen=True)
class ControlNetConfig:
    """The ControlNet's architecture, in the original config's terms (``control_stage_config``):
    the base UNet's encoder settings, plus the hint encoder's."""

    in_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with attention
    num_heads: int = 8  # SD 1.x: a fixed number of heads per level ...
    num_head_channels: int = -1  # ... SD 2.x and SDXL: a fixed head width (64)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level, 0 without attention
    transformer_depth_middle: int = 1
    context_dim: int = 768  # the base model's text width: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL
    use_linear_in_transformer: bool = False
    norm_groups: int = 32
    adm_in_channels: int | None = None  # SDXL: 2816, the pooled text and size embeddings
    hint_channels: int = 3  # the control image: RGB in [0, 1]
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)  # the hint encoder's widths
    # The shuffle ControlNet's option (its yaml's ``global_average_pooling``): each residual is
    # averaged over the image, and given to the conditional rows only. Not in the weights.
    global_average_pooling: bool = False

    def __post_init__(self):
        # the levels with attention as a set, written in one order so that equal configs compare
        # equal whichever order a file gave them in
        object.__setattr__(self, "attention_resolutions", tuple(sorted(self.attention_resolutions)))
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError(
                "set exactly one of num_heads (SD 1.x: 8) and num_head_channels (SD 2.x: 64), "
                f"the other to -1; got num_heads={self.num_heads}, "
                f"num_head_channels={self.num_head_channels}"
            )
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth needs one entry per level ({len(self.channel_mult)}), got "
                f"{self.transformer_depth}"
            )
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"model_channels * channel_mult = {self.model_channels * mult} is not a "
                    f"multiple of norm_groups={self.norm_groups}"
                )

    @classmethod
    def sd15(cls) -> ControlNetConfig:
        """For Stable Diffusion 1.x (``control_v11p_sd15_*``)."""
        return cls()

    @classmethod
    def sd2(cls) -> ControlNetConfig:
        """For Stable Diffusion 2.x: 64-wide heads, linear projections, 1024-wide context."""
        return cls(num_heads=-1, num_head_channels=64, context_dim=1024,
                   use_linear_in_transformer=True)  # fmt: skip

    @classmethod
    def sdxl(cls) -> ControlNetConfig:
        """For SDXL: three levels, attention (2 and 10 blocks deep) on the lower two."""
        return cls(channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_heads=-1,
                   num_head_channels=64, transformer_depth=(0, 2, 10),
                   transformer_depth_middle=10, context_dim=2048,
                   use_linear_in_transformer=True, adm_in_channels=2816)  # fmt: skip

    @classmethod
    def tiny(cls) -> ControlNetConfig:
        """The encoder of sd-unet's ``UNetConfig.tiny()``, for tests."""
        return cls(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                   attention_resolutions=(1, 2), transformer_depth=(1, 1, 0),
                   context_dim=32)  # fmt: skip

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def hint_downscale(self) -> int:
        """How many pixels of control image per latent pixel: its encoder halves the size
        once per step between widths."""
        return 2 ** (len(self.hint_block_channels) - 1)

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer over ``channels`` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    def skip_channels(self) -> list[int]:
        """The channels of each residual for the UNet's skip connections, in order."""
        mc = self.model_channels
        channels = [mc]
        for level, mult in enumerate(self.channel_mult):
            channels += [mc * mult] * self.num_res_blocks
            if level != len(self.channel_mult) - 1:
                channels.append(mc * mult)
        return channels


def _hint_block(c: ControlNetConfig) -> TimestepEmbedSequential:
    """The hint encoder: 3x3 convs with SiLU between, halving the size at each new width, so the
    control image arrives at latent size with ``model_channels`` channels (the last conv starts
    at zero)."""
    widths = c.hint_block_channels
    layers = [nn.Conv2d(c.hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for before, after in itertools.pairwise(widths):
        layers += [nn.Conv2d(before, before, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(before, after, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], c.model_channels, 3, padding=1))
    return TimestepEmbedSequential(*layers)


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


class ControlNet(nn.Module):
    """(noisy latents, timesteps, text context, control image) -> residuals for the UNet's skip
    connections (one per input block) and for its middle block."""

    def __init__(self, config: ControlNetConfig | None = None):
        super().__init__()
        self.config = c = config or ControlNetConfig.sd15()
        mc, ted = c.model_channels, c.time_embed_dim
        self.time_embed = nn.Sequential(Linear(mc, ted), nn.SiLU(), Linear(ted, ted))
        if c.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(Linear(c.adm_in_channels, ted), nn.SiLU(), Linear(ted, ted))
            )
        self.input_hint_block = _hint_block(c)

        def transformer(ch, depth):
            heads, head_dim = c.heads(ch)
            return SpatialTransformer(ch, heads, head_dim, depth, c.context_dim,
                                      c.norm_groups, c.use_linear_in_transformer)  # fmt: skip

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))]
        )
        self.zero_convs = nn.ModuleList([_zero_conv(mc)])
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, ted, mc * mult, c.norm_groups)]
                ch = mc * mult
                if ds in c.attention_resolutions and c.transformer_depth[level]:
                    layers.append(transformer(ch, c.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.zero_convs.append(_zero_conv(ch))
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.zero_convs.append(_zero_conv(ch))
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch, c.norm_groups),
            transformer(ch, c.transformer_depth_middle),
            ResBlock(ch, ted, ch, c.norm_groups),
        )
        self.middle_block_out = _zero_conv(ch)
        # One scratch space for all the Winograd convolutions: they run one after the other.
        self.workspace = winograd.Workspace()
        for module in self.modules():
            if isinstance(module, Conv3x3):
                module.workspace = self.workspace

    def forward(
        self,
        x: torch.Tensor,
        timesteps,
        context: torch.Tensor,
        hint: torch.Tensor,
        *,
        y: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, in_channels, h, w), timesteps (B,) or a number, context (k·B, S, context_dim),
        hint (B or 1, hint_channels, 8h, 8w) in [0, 1], y (k·B, adm_in_channels) for SDXL ->
        (the residuals for the UNet's skip connections, the residual for its middle block),
        each with k·B rows."""
        self._check_inputs(x, context, hint, y)
        rows = context.shape[0]
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:  # SDXL: each context row has an embedding of its own from here
            emb = _repeat_rows(emb, rows) + self.label_emb(y.to(emb.dtype))
            x = _repeat_rows(x, rows)
        guided_hint = self.input_hint_block(hint.to(x.dtype), None, None)  # once per image

        h = self.input_blocks[0](x, emb, context)
        h += _repeat_rows(guided_hint, h.shape[0])
        down = [self.zero_convs[0](h, emb, context)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            emb = _repeat_rows(emb, h.shape[0])  # once, where the batch grows (shared latents)
            down.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        mid = self.middle_block_out(h, emb, context)
        return [_repeat_rows(d, rows) for d in down], _repeat_rows(mid, rows)

    def _check_inputs(self, x, context, hint, y) -> None:
        c = self.config
        B, _, h, w = x.shape
        if x.shape[1] != c.in_channels:
            raise ValueError(
                f"the latents have {x.shape[1]} channels; this ControlNet takes {c.in_channels}"
            )
        if context.dim() != 3 or context.shape[0] % B or context.shape[2] != c.context_dim:
            raise ValueError(
                f"context must be (k·B, tokens, {c.context_dim}) for latents of batch {B}, got "
                f"{tuple(context.shape)}; a context of another width means a ControlNet for "
                "another base model"
            )
        size = (h * c.hint_downscale, w * c.hint_downscale)
        if hint.dim() != 4 or hint.shape[1] != c.hint_channels or hint.shape[0] not in (1, B):
            raise ValueError(
                f"the control image must be a (1 or {B}, {c.hint_channels}, H, W) tensor, got "
                f"{tuple(hint.shape)}"
            )
        if tuple(hint.shape[-2:]) != size:
            raise ValueError(
                f"the control image is {hint.shape[-1]}x{hint.shape[-2]} pixels; latents of "
                f"{w}x{h} need {size[1]}x{size[0]} (resize it first: resize_control_image)"
            )
        if y is not None and y.shape[0] != context.shape[0]:
            raise ValueError(
                f"y needs one row per context row ({context.shape[0]}), got {y.shape[0]}"
            )
        if (y is None) != (c.adm_in_channels is None):
            need = f"y of width {c.adm_in_channels} (SDXL)" if y is None else "no y (SD 1.x/2.x)"
            raise ValueError(f"this ControlNet needs {need}")

    # Loading and saving live in weights.py; these are the entry points.

    @classmethod
    def from_checkpoint(cls, path, *, config=None, dtype=None, device=None, base_unet=None):
        """Load a published ControlNet file (``.pth``/``.safetensors``, ``control_model.*`` or
        bare keys; pickles opened with ``weights_only=True``) or a diffusers ``controlnet/``
        folder. A ``diff_control_*`` file holds differences to its base UNet: pass that UNet's
        weights as ``base_unet`` (a module, a state dict in CompVis names, or an SD checkpoint
        path). ``config`` overrides the architecture inferred from the weights."""
        from sd_controlnet.weights import from_checkpoint

        return from_checkpoint(path, config=config, dtype=dtype, device=device, base_unet=base_unet)

    def save(self, path) -> None:
        """Write a ``.safetensors`` file in the original names, the config in its metadata."""
        from sd_controlnet.weights import save

        save(self, path)

    def save_diffusers(self, folder) -> None:
        """Write a diffusers ``controlnet/`` folder (config.json and weights)."""
        from sd_controlnet.weights import save_diffusers

        save_diffusers(self, folder)
