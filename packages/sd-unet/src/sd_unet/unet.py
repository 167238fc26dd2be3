"""The conditional denoising UNet of Stable Diffusion, in one file that reads top to bottom.

Module and parameter names are those of the original CompVis/LDM code, so a checkpoint's
``model.diffusion_model.*`` tensors load with a prefix strip (see ``weights.py``).

    eps = unet(latents, timesteps, context)   # (B, 4, h, w), (B,) or a number, (B, 77, 768)
    y = sdxl_conditioning(pooled, (1024, 1024), (0, 0), (1024, 1024))  # sizes, crop, target
    eps = sdxl_unet(latents, timesteps, context, y=y)   # context (B, 77, 2048)

SDXL (SGM's ``openaimodel.UNetModel``) is the same UNet with a transformer depth per level, no
attention at the first level, and ``label_emb``: the "added conditioning" ``y`` (the pooled text
embedding and Fourier features of the image sizes and crop, see ``sdxl_conditioning``) mapped
to the time embedding's width and added to it.

Speed notes (CPU): every activation-sized op that can work in place does (SiLU, residual adds,
the time embedding add, GEGLU's product), and the model runs in ``channels_last`` when its
weights are (``unet.to(memory_format=torch.channels_last)``, which ``from_checkpoint`` does on
the CPU): then the 1x1 projections around the transformers are free views rather than copies.
The 3x3 convolutions of the large levels run Winograd's algorithm and the linear layers
oneDNN's kernel (``Conv3x3`` and ``Linear`` in cpu.py), each only for float32 CPU inference.
The architecture's settings are ``UNetConfig`` (config.py).

Shared latents: ``context`` may have k times the latents' batch, as in classifier-free guidance
(k = 2: the unconditional and conditional rows of one image see the same latents and timestep).
Then ``x`` stands for ``torch.cat([x] * k)``, and everything the context cannot reach yet (the
input convolution, the first ResBlock, the first self-attention: up to the first
cross-attention) runs once per image instead of k times; the batch grows to k·B there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd_unet import winograd
from sd_unet.config import UNetConfig
from sd_unet.cpu import Conv3x3, Linear


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps (B,) -> (B, dim): cos, then sin."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _grow(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with its rows repeated to ``batch`` rows, ``[t; t; ...]`` (see "Shared latents");
    ``t`` itself where it has that many rows already (or more: SDXL's time embedding has one
    row per context row, so it is ahead of the latents until the first ResBlock)."""
    if t.shape[0] >= batch:
        return t
    return torch.cat([t] * (batch // t.shape[0]))


def _plus(t: torch.Tensor, residual: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """``t + residual``, each with its rows repeated to the other's (B or k·B: shared latents)."""
    if residual.shape[1:] != t.shape[1:] or residual.shape[0] not in (t.shape[0], rows, 1):
        raise ValueError(
            f"{name} is {tuple(residual.shape)}; the UNet's tensor there is "
            f"{(rows, *t.shape[1:])} (a ControlNet for another base model, or a control image "
            "of another size?)"
        )
    n = max(t.shape[0], residual.shape[0])
    return _grow(t, n) + _grow(residual.to(t.dtype), n)


def sdxl_conditioning(
    pooled: torch.Tensor,
    original_size,
    crop_top_left=(0, 0),
    target_size=None,
    *,
    aesthetic_score=None,
    embed_dim: int = 256,
) -> torch.Tensor:
    """SDXL's added conditioning ``y`` (B, pooled width + n * embed_dim): the pooled text
    embedding, then each number's sinusoidal embedding (as the timesteps', cos then sin) in the
    order (original h, w, crop top, left, target h, w) for the base model or (original h, w,
    crop top, left, aesthetic score) for the refiner: SGM's ``ConcatTimestepEmbedderND``s, and
    diffusers' ``time_ids`` order.

    ``original_size``, ``crop_top_left`` and ``target_size`` are (h, w) pairs of numbers or
    (B, 2) tensors; ``aesthetic_score`` a number or a (B,) tensor (6.0 in SGM's and diffusers'
    refiner defaults; 2.5 for the negative prompt). Give exactly one of ``target_size`` (base)
    and ``aesthetic_score`` (refiner).
    """
    if (target_size is None) == (aesthetic_score is None):
        raise ValueError(
            "give target_size (the SDXL base model) or aesthetic_score (the refiner), not "
            f"{'both' if target_size is not None else 'neither'}"
        )
    if pooled.dim() != 2:
        raise ValueError(f"pooled must be (B, width), got shape {tuple(pooled.shape)}")
    B, device = pooled.shape[0], pooled.device

    def column(value, width, name):
        v = torch.as_tensor(value, dtype=torch.float32, device=device)
        if v.dim() <= 1:  # one row for all (a pair; a score), or a score per row
            v = v.reshape(-1, 1) if width == 1 else v[None]
        if v.dim() != 2 or v.shape[0] not in (1, B) or v.shape[1] != width:
            raise ValueError(
                f"{name} must be {width} number(s) or a (B={B}, {width}) tensor, got "
                f"{tuple(torch.as_tensor(value).shape)}"
            )
        return v.expand(B, width)

    last = (target_size, 2, "target_size") if aesthetic_score is None else (
        aesthetic_score, 1, "aesthetic_score")  # fmt: skip
    numbers = torch.cat(
        [column(original_size, 2, "original_size"), column(crop_top_left, 2, "crop_top_left"),
         column(*last)], dim=1)  # fmt: skip
    fourier = timestep_embedding(numbers.flatten(), embed_dim).reshape(B, -1)
    return torch.cat([pooled.float(), fourier], dim=1)


def group_norm(groups: int, channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)  # always applied to a fresh tensor, never to a block's input


class SiLU(nn.Module):
    """SiLU in place: it only ever follows a GroupNorm, whose output nothing else reads."""

    def forward(self, x):
        return _silu(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, then GroupNorm-SiLU-conv, plus x."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(groups, channels, 1e-5),
            SiLU(),
            Conv3x3(channels, out_channels),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(groups, out_channels, 1e-5),
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


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


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
        q = _grow(q, k.shape[0])  # one query per image, k contexts: the batch grows here
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
    """GEGLU to 4x the width, back to the width; over at most ``chunk`` tokens at a time."""

    chunk = 2048  # GEGLU's temporaries are 12x its input's size: bound them to 2048 tokens

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])  # (B * T, C), a view
        if tokens.shape[0] <= self.chunk:
            return self.net(x)
        return torch.cat([self.net(part) for part in tokens.split(self.chunk)]).view_as(x)


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

    tome = None  # token merging's shared state, where sd_unet.tome.apply put it

    def forward(self, x, context):
        if self.tome is not None:
            from sd_unet.tome import block_forward

            return block_forward(self, self.tome, x, context)
        x = self.attn1(self.norm1(x)).add_(x)
        h = self.attn2(self.norm2(x), context)
        x = h.add_(_grow(x, h.shape[0]))
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, plus x.

    The projections are 1x1 convolutions in SD 1.x and linear layers in SD 2.x.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 groups: int, linear: bool):  # fmt: skip
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = group_norm(groups, channels, 1e-6)
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
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C): a view when x is channels_last
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return h.add_(_grow(x, h.shape[0]))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks, each given what it takes: the time embedding, the context, or neither."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):  # (_grow: where a transformer or y grew the batch)
                rows = max(x.shape[0], emb.shape[0])
                x = layer(_grow(x, rows), _grow(emb, rows))
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """The denoising UNet: (noisy latents, timesteps, text context) -> predicted noise (or v)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = c = config or UNetConfig.sd15()
        self.gradient_checkpointing = False
        mc, ted = c.model_channels, c.time_embed_dim
        self.time_embed = nn.Sequential(Linear(mc, ted), nn.SiLU(), Linear(ted, ted))
        if c.adm_in_channels:  # SGM's num_classes="sequential": a Sequential in a Sequential
            self.label_emb = nn.Sequential(
                nn.Sequential(Linear(c.adm_in_channels, ted), nn.SiLU(), Linear(ted, ted))
            )

        def transformer(ch, depth):
            heads, head_dim = c.heads(ch)
            return SpatialTransformer(ch, heads, head_dim, depth, c.context_dim, c.norm_groups,
                                      c.use_linear_in_transformer)  # fmt: skip

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]  # the channels of each input block's output, for the skips
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, ted, mc * mult, c.norm_groups)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, c.depth(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch, c.norm_groups),
            transformer(ch, c.transformer_depth_middle),
            ResBlock(ch, ted, ch, c.norm_groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mc * mult, c.norm_groups)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch, c.depth(level)))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            group_norm(c.norm_groups, ch, 1e-5),
            SiLU(),
            nn.Conv2d(mc, c.out_channels, 3, padding=1),
        )
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
        y: torch.Tensor | None = None,
        *,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, h, w), timesteps (B,) or a number, context (B, S, context_dim),
        or (k·B, S, context_dim) for latents shared by k rows (module docstring) -> (k·B, ...).

        ``y``: SDXL's added conditioning (B or k·B, adm_in_channels), ``sdxl_conditioning``'s
        result; required by an SDXL UNet (``config.adm_in_channels``), refused by the others.
        ``down_residuals`` (one per input block, shaped like its output, with B or k·B rows)
        are added to the skip connections and ``mid_residual`` to the middle block's output:
        a ControlNet's guidance (diffusers' ``down_block_additional_residuals`` and
        ``mid_block_additional_residual``)."""
        x, emb = self._embed(x, timesteps, context, y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            emb = _grow(emb, h.shape[0])  # once, where the batch grows (shared latents)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if down_residuals is not None or mid_residual is not None:
            skips, h = self._add_residuals(skips, h, down_residuals, mid_residual, context)
        emb = _grow(emb, h.shape[0])
        for block in self.output_blocks:
            h = torch.cat([h, _grow(skips.pop(), h.shape[0])], dim=1)
            h = self._run(block, h, emb, context)
        return _grow(self.out(h), context.shape[0])  # grown already, unless no attention

    def _embed(self, x, timesteps, context, y):
        """The inputs checked, x in the model's layout, and the time (+ label) embedding."""
        B = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if t.shape[0] not in (1, B):
            raise ValueError(
                f"timesteps must be one number or one per latent row ({B}), got {t.shape[0]}"
            )
        if context.dim() != 3 or context.shape[0] % B:
            raise ValueError(
                f"context must be (B, tokens, {self.config.context_dim}) with B a multiple of "
                f"the latents' batch {B} (k rows share one latent), got {tuple(context.shape)}"
            )
        t = t.expand(B)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if self.config.adm_in_channels or y is not None:
            emb = self._add_label(emb, y, B, context.shape[0])
        if self._channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        return x, emb

    def _add_residuals(self, skips, h, down, mid, context):
        """The skips and the middle block's output plus a ControlNet's residuals (new tensors:
        the blocks' outputs are left as they are)."""
        rows = context.shape[0]
        if down is not None:
            if len(down) != len(skips):
                raise ValueError(
                    f"down_residuals has {len(down)} tensors; this UNet has {len(skips)} skip "
                    "connections (a ControlNet for another base model?)"
                )
            skips = [_plus(s, r, rows, f"down_residuals[{i}]") for i, (s, r) in
                     enumerate(zip(skips, down))]  # fmt: skip
        if mid is not None:
            h = _plus(h, mid, rows, "mid_residual")
        return skips, h

    def _add_label(self, emb, y, B, rows):
        """The time embedding plus the embedded added conditioning: (B or rows, ted)."""
        adm = self.config.adm_in_channels
        if not adm:
            raise ValueError(
                "y (added conditioning) given, but this UNet has none (adm_in_channels=0: an "
                "SD 1.x/2.x UNet); call it without y"
            )
        if y is None or y.dim() != 2 or y.shape[0] not in (B, rows) or y.shape[1] != adm:
            got = "none" if y is None else f"shape {tuple(y.shape)}"
            raise ValueError(
                f"this SDXL UNet needs y, the added conditioning, of shape ({B} or {rows}, "
                f"{adm}) (sd_unet.sdxl_conditioning builds it); got {got}"
            )
        label = self.label_emb(y.to(emb.dtype))
        return label.add_(_grow(emb, label.shape[0]))

    def _run(self, block, h, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def _channels_last(self) -> bool:
        w = self.input_blocks[0][0].weight
        return w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last)

    # Loading and saving live in weights.py; these are the entry points.

    @classmethod
    def from_checkpoint(cls, path, *, config=None, dtype=None, device=None, ema=False) -> UNet:
        """Load from an SD single file (``.safetensors``, or a ``.ckpt``/``.pt``/``.bin`` pickle,
        read without running code), a bare UNet file, a diffusers ``unet/`` folder or model
        root, or the tensors of such a file already read (``sd_unet.load_state_dict(path)``, or
        any mapping of names to tensors), so that one pickle is read once for several models.

        The config comes from ``config``, else the file (its safetensors metadata, or a
        diffusers ``config.json``), else the tensor shapes. ``ema=True`` takes the EMA weights of
        a full (non-pruned) checkpoint. ``dtype`` defaults to float32 (every floating tensor,
        whatever the file stores). On the CPU the model is put in ``channels_last``, its fast
        layout there. Bad files raise ``CheckpointError``."""
        from sd_unet.weights import from_checkpoint

        return from_checkpoint(path, config=config, dtype=dtype, device=device, ema=ema)

    def save(self, path) -> None:
        """Write a ``.safetensors`` UNet file in the original (CompVis) names, the config in its
        metadata."""
        from sd_unet.weights import save

        save(self, path)

    def save_diffusers(self, folder) -> None:
        """Write a diffusers ``unet/`` folder: config.json and diffusion_pytorch_model.safetensors."""
        from sd_unet.weights import save_diffusers

        save_diffusers(self, folder)


def compile_frozen(unet: nn.Module, mode: str | None = None):
    """``torch.compile`` the UNet for inference with inductor's *freezing*; returns the function
    to call in its place (the module itself is left as it is).

    Freezing makes the weights constants of the compiled graph, so their layouts are prepared
    once (oneDNN's blocked convolution weights on the CPU, where a plain call reorders them every
    time) and the element-wise work around them is fused. It applies to calls made without
    autograd (``torch.inference_mode()`` or ``no_grad()``), and holds a prepared copy of the
    weights beside the module's own. ``mode`` is ``torch.compile``'s (e.g. ``"max-autotune"``,
    or ``"reduce-overhead"`` for CUDA graphs on a GPU).

    The option is set by patching inductor's global config around each call (it compiles in
    the first call, and again for each new input shape): passed as
    ``torch.compile(options={"freezing": True})`` the graph is frozen but runs no faster than
    eager (as measured with torch 2.13); with the patched config it does.
    """
    from torch._inductor import config as inductor_config

    compiled = torch.compile(unet, mode=mode)

    def frozen(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return frozen
