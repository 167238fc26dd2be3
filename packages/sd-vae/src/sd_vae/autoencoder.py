"""The KL autoencoder of Stable Diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models"), written so that its module names are the CompVis checkpoint's
``first_stage_model.`` names: loading a checkpoint is a prefix strip.

Reads top to bottom: the small blocks first, then the encoder and decoder, the posterior, the
config, and the model joining them last.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from sd_vae import _winograd, banded
from sd_vae.banded import layout as _layout

logger = logging.getLogger(__name__)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) steps and a residual; a 1x1 conv where channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norms' outputs and conv2's are fresh tensors: SiLU and the residual add work in
        # place on them, so that no step allocates a second full-size activation.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x)


class Downsample(nn.Module):
    """A 3x3 stride-2 conv after padding right and bottom only (the CompVis asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv.

    Computed without the upsampled tensor, as one transposed convolution (stride 2, 4x4 kernel)
    of the low-resolution input: each output pixel of the four phases (even/odd row, even/odd
    column) sees a 2x2 window of input pixels, whose taps are the 3x3 kernel's taps summed
    where they land on the same input pixel. 4 multiply-adds per output instead of 9, and no
    4x-sized intermediate; the result equals conv(upsample(x)) up to rounding.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self._transposed_kernel(), self.conv.bias, 2, padding=1)

    def _transposed_kernel(self) -> torch.Tensor:
        """The (in, out, 4, 4) kernel: output row 2i + a takes input row i - 1 + a + d through
        the folded tap d of phase a, which sits at kernel row 3 - a - 2d (columns alike), so
        phase a's taps fill rows 1 - a and 3 - a in reverse order."""
        w = self.conv.weight
        kernel = w.new_zeros(w.shape[1], w.shape[0], 4, 4)
        for a, rows in enumerate(_phase_taps(w, dim=2)):
            for c, taps in enumerate(_phase_taps(rows, dim=3)):
                kernel[:, :, 1 - a :: 2, 1 - c :: 2] = taps.flip(2, 3).transpose(0, 1)
        return kernel.contiguous(memory_format=_run_layout(w))


def _run_layout(weight: torch.Tensor) -> torch.memory_format:
    """The layout activations run in: channels_last on the CPU, where oneDNN's convolutions are
    fastest in it whatever the weights' layout (they stay as loaded, e.g. memory-mapped from the
    file; reordering a weight costs little next to a convolution over an image); on other
    devices the weights' own layout, which the user chooses with ``model.to(memory_format=...)``.
    """
    return torch.channels_last if weight.device.type == "cpu" else _layout(weight)


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps of a 3x3 kernel along ``dim``, folded to 2 for each output phase of a nearest
    2x upsampling: the even phase sees input offsets (-1, 0) as taps (0, 1 + 2), the odd phase
    offsets (0, +1) as taps (0 + 1, 2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections (as CompVis)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): views when x is channels_last
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h[:, 0].transpose(1, 2).unflatten(2, (H, W))
        return self.proj_out(h).add_(x)


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block: the only attention in the SD autoencoder."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResNet blocks, then a Downsample (encoder) or an Upsample (decoder),
    except at the coarsest encoder level and the finest decoder level."""

    def __init__(
        self, in_channels: int, out_channels: int, blocks: int, groups: int, resample=None
    ):
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in pairwise(widths))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        if resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f).

    ``winograd``: ``forward_banded`` computes the wide 3x3 convolutions by Winograd's
    F(4x4, 3x3) in float32 on the CPU (banded.py); ``Encoder.winograd = False`` turns it off.
    """

    winograd: bool = True

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(w_in, w, c.num_res_blocks, c.norm_groups, "down" if i != last else None)
            for i, (w_in, w) in enumerate(zip([widths[0], *widths], widths))
        )
        self.mid = MidBlock(widths[-1], c.norm_groups)
        self.norm_out = group_norm(widths[-1], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))

    @torch.no_grad()
    def forward_banded(self, x: torch.Tensor, band_bytes: int = 8 << 20) -> torch.Tensor:
        """``forward`` with less memory, for inference: the same numbers up to rounding. The
        ResNet blocks and the downsampling run a band of rows at a time, as in
        ``Decoder.forward_banded``."""
        workspace = _winograd.Workspace() if self.winograd else None
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = banded.resnet_block(block, x, band_bytes, workspace)
            if hasattr(level, "downsample"):
                x = banded.downsample(level.downsample, x, band_bytes)
        x = _banded_mid(self.mid, x, band_bytes, workspace)
        return banded.norm_silu_conv(self.norm_out, self.conv_out, x, band_bytes)


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, 3, h * f, w * f).

    ``up`` is indexed by resolution as in CompVis: ``up[0]`` is the full-resolution level and
    runs last. ``winograd``: as the encoder's, for ``forward_banded``.
    """

    winograd: bool = True

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        c = config
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], c.norm_groups)
        self.up = nn.ModuleList(
            Level(w_in, w, c.num_res_blocks + 1, c.norm_groups, "up" if i != 0 else None)
            for i, (w_in, w) in enumerate(zip([*widths[1:], widths[-1]], widths))
        )
        self.norm_out = group_norm(widths[0], c.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True))

    @torch.no_grad()
    def forward_banded(self, z: torch.Tensor, band_bytes: int = 8 << 20) -> torch.Tensor:
        """``forward`` with less memory, for inference: the same numbers up to rounding.

        At 512x512 the last levels hold 128-256 channels of 512x512 pixels: 128-256 MB per
        float32 activation, and a ResNet block makes several. Here each (GroupNorm, SiLU, 3x3
        conv) runs ``band_bytes`` of input rows at a time: the norm's statistics are taken over
        the whole input first, then each band is normalised into a small buffer (with one row
        of context above and below) and convolved, and the band's output is written into a
        full-size result, or added into the block's input for the residual. A ResNet block
        then holds its input and one other full-size tensor, not four.
        """
        workspace = _winograd.Workspace() if self.winograd else None
        x = _banded_mid(self.mid, self.conv_in(z), band_bytes, workspace)
        for level in reversed(self.up):
            for block in level.block:
                x = banded.resnet_block(block, x, band_bytes, workspace)
            if hasattr(level, "upsample"):
                x = level.upsample(x)  # holds its input and output only
        return banded.norm_silu_conv(self.norm_out, self.conv_out, x, band_bytes)


def _banded_mid(mid: MidBlock, x: torch.Tensor, band_bytes: int, workspace) -> torch.Tensor:
    """``mid(x)`` with its ResNet blocks banded (``x`` may be overwritten)."""
    x = banded.resnet_block(mid.block_1, x, band_bytes, workspace)
    return banded.resnet_block(mid.block_2, mid.attn_1(x), band_bytes, workspace)


class DiagonalGaussianDistribution:
    """The encoder's posterior: a Gaussian with diagonal covariance per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # the original's clamp, keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn on the generator's device, then moved."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(
            self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile`` x ``tile`` windows of ``x`` and blend the results.

    ``fn`` maps a window of side s to one of side ``s * scale``. In the overlaps each window's
    weight ramps linearly from its inner edges, so the seams fade into each other.
    """
    H, W = x.shape[-2:]
    rows, cols = _tile_starts(H, tile, overlap), _tile_starts(W, tile, overlap)
    out = weight = None
    for top in rows:
        for left in cols:
            y = fn(x[..., top : top + tile, left : left + tile])
            if out is None:
                size = (round(H * scale), round(W * scale))
                out = y.new_zeros((*y.shape[:-2], *size), dtype=torch.float32)
                weight = y.new_zeros(size, dtype=torch.float32)
            y0, x0 = round(top * scale), round(left * scale)
            h, w = y.shape[-2:]
            ramp = round(overlap * scale)
            wy = _ramp(h, ramp, top > 0, top + tile < H, y)
            wx = _ramp(w, ramp, left > 0, left + tile < W, y)
            window = wy[:, None] * wx[None, :]
            out[..., y0 : y0 + h, x0 : x0 + w] += y * window
            weight[y0 : y0 + h, x0 : x0 + w] += window
    return (out / weight).to(y.dtype)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Window starts every ``tile - overlap``; the last window ends at the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(n: int, ramp: int, fade_in: bool, fade_out: bool, like: torch.Tensor) -> torch.Tensor:
    """Blend weights along one side: 1, fading linearly over ``ramp`` at inner edges."""
    w = torch.ones(n, device=like.device)
    edge = (torch.arange(ramp, device=like.device) + 0.5) / ramp
    if fade_in:
        w[:ramp] = edge
    if fade_out:
        w[n - ramp :] = edge.flip(0)
    return w


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """The autoencoder's shape. Widths are ``base_channels * m`` for ``m`` in ``channel_mult``;
    each level but the last halves the resolution, so images shrink by ``2 ** (levels - 1)``."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    # Latents are multiplied by this before diffusion. 0.18215 is the value CompVis set for the
    # SD 1.x autoencoder (kl-f8), chosen so that the scaled latents have about unit variance
    # (`scale_factor` in v1-inference.yaml); SD 2.x reuses the same autoencoder and value.
    # SDXL's autoencoder has the same shapes, other weights and 0.13025 (`scale_factor` in SGM's
    # sd_xl_base.yaml): the weights cannot tell which, so it comes from the caller or a config.
    scaling_factor: float = 0.18215

    @classmethod
    def sd15(cls) -> AutoencoderKLConfig:
        """The Stable Diffusion 1.x / 2.x autoencoder (kl-f8, 83.7M parameters)."""
        return cls()

    @classmethod
    def sdxl(cls) -> AutoencoderKLConfig:
        """SDXL's autoencoder (base and refiner): the SD shapes, latents scaled by 0.13025."""
        return cls(scaling_factor=0.13025)

    @classmethod
    def tiny(cls) -> AutoencoderKLConfig:
        """A small model with the same structure and the same 8x downsampling, for tests."""
        return cls(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor must be a positive number, got {self.scaling_factor}")
        widths = [self.base_channels * m for m in self.channel_mult]
        if any(w % self.norm_groups for w in widths):
            raise ValueError(
                f"every width must be a multiple of norm_groups={self.norm_groups}; "
                f"widths are {widths}"
            )


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] <-> unscaled latents (multiply by ``config.scaling_factor`` for the
    diffusion model).

    ``force_float32``: decode in float32 even when the weights are half precision. Without it, a
    half-precision decode (or encode) that gives non-finite values is retried in float32: SDXL's
    autoencoder overflows float16 at its usual sizes (diffusers marks it ``force_upcast``).
    """

    def __init__(self, config: AutoencoderKLConfig | None = None, *, force_float32: bool = False):
        super().__init__()
        self.config = config = config or AutoencoderKLConfig()
        self.force_float32 = force_float32
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        config: AutoencoderKLConfig | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        scaling_factor: float | None = None,
        force_float32: bool = False,
    ) -> AutoencoderKL:
        """Load from an SD single file (``.safetensors``, ``.ckpt``, ``.pt``, ``.bin``), a
        standalone VAE file, a diffusers folder (the VAE's, or the model root holding ``vae/``),
        or the tensors of such a file already read (``sd_vae.load_state_dict(path)``, or any
        mapping of names to tensors), so that one pickle is read once for several models.

        The config comes from ``config``, else the file (its safetensors metadata, or a
        diffusers ``config.json``), else the tensor shapes. ``dtype`` defaults to float32 (every
        floating tensor, whatever the file stores). Bad files raise ``CheckpointError``.

        ``scaling_factor`` replaces the config's (an SDXL single file: 0.13025, which its
        tensors cannot tell from SD's 0.18215). ``force_float32``: as the constructor's (not
        needed for SDXL: an overflowing half-precision decode is retried in float32 anyway; a
        diffusers ``config.json``'s ``force_upcast`` is not read, as recent diffusers writes
        it true for every autoencoder)."""
        from sd_vae.weights import load_autoencoder

        return load_autoencoder(path, config=config, dtype=dtype, device=device,
                                scaling_factor=scaling_factor,
                                force_float32=force_float32)  # fmt: skip

    def save(self, path: str | os.PathLike) -> None:
        """Write a standalone ``.safetensors`` VAE file in the original (CompVis) layout."""
        from sd_vae.weights import save_autoencoder

        save_autoencoder(self, path)

    def save_diffusers(self, folder: str | os.PathLike) -> None:
        """Write a diffusers ``AutoencoderKL`` folder (config.json + safetensors weights)."""
        from sd_vae.weights import save_diffusers_folder

        save_diffusers_folder(self, folder)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def encode(
        self, images: torch.Tensor, *, tile_size: int | None = None, banded: bool | None = None
    ) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 8 -> the latent posterior.

        ``tile_size`` (pixels): encode in overlapping tiles of that side, to bound memory.
        ``banded``: as for ``decode`` (``Encoder.forward_banded``).
        """
        self._check_images(images)
        images = images.to(self.dtype)
        moments = partial(self._safe_moments, banded=self._banded(banded))
        if tile_size is None or max(images.shape[-2:]) <= tile_size:
            return DiagonalGaussianDistribution(moments(images))
        f = self.config.downscale
        tile, overlap = self._tile_geometry(tile_size, f)
        return DiagonalGaussianDistribution(tiled_apply(moments, images, tile, overlap, 1 / f))

    def decode(
        self, latents: torch.Tensor, *, tile_size: int | None = None, banded: bool | None = None
    ) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), about [-1, 1].

        ``tile_size`` (pixels of the output): decode in overlapping tiles of that side.
        ``banded``: run the decoder's full-size layers a band of rows at a time
        (``Decoder.forward_banded``): the same image, about half the memory for activations, no
        gradients. By default on when autograd is off and the model is on the CPU.
        """
        self._check_latents(latents)
        decode = partial(self._safe_decode, banded=self._banded(banded))
        f = self.config.downscale
        if tile_size is None or max(latents.shape[-2:]) * f <= tile_size:
            return decode(latents)
        tile, overlap = self._tile_geometry(tile_size // f, 1)
        return tiled_apply(decode, latents, tile, overlap, f)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """Encode, sample the posterior, decode: a reconstruction of ``images``."""
        return self.decode(self.encode(images).sample(generator))

    # Inputs are put in the layout convolutions run fastest in (see ``_run_layout``); outputs
    # are returned contiguous.

    def _banded(self, banded: bool | None) -> bool:
        """Banded by default when autograd is off and the model is on the CPU."""
        if banded is None:
            return not torch.is_grad_enabled() and self.device.type == "cpu"
        return banded

    def _moments(self, images: torch.Tensor, banded: bool = False) -> torch.Tensor:
        images = images.contiguous(memory_format=_run_layout(self.encoder.conv_in.weight))
        encoder = self.encoder.forward_banded if banded else self.encoder
        return self.quant_conv(encoder(images)).contiguous()

    def _decode(self, latents: torch.Tensor, banded: bool = False) -> torch.Tensor:
        latents = latents.contiguous(memory_format=_run_layout(self.decoder.conv_in.weight))
        decoder = self.decoder.forward_banded if banded else self.decoder
        return decoder(self.post_quant_conv(latents)).contiguous()

    def _safe_moments(self, images: torch.Tensor, banded: bool = False) -> torch.Tensor:
        """Encode in the weights' precision; in float32 where half precision overflowed."""
        moments = self._moments(images, banded)
        if self.dtype not in (torch.float16, torch.bfloat16) or torch.isfinite(moments).all():
            return moments
        logger.warning("half-precision encode gave non-finite values; retrying in float32")
        with self._float32(self.encoder, self.quant_conv):
            moments = self._moments(images.float(), banded)
        return moments.to(self.dtype)

    def _safe_decode(self, latents: torch.Tensor, banded: bool = False) -> torch.Tensor:
        """Decode in the weights' precision; in float32 when forced, or when half precision
        overflowed (the SD 1.x decoder's activations can exceed float16's range)."""
        low_precision = self.dtype in (torch.float16, torch.bfloat16)
        if low_precision and not self.force_float32:
            images = self._decode(latents.to(self.dtype), banded)
            if torch.isfinite(images).all():
                return images
            logger.warning("half-precision decode gave non-finite values; retrying in float32")
        if not low_precision:
            return self._decode(latents.to(self.dtype), banded)
        with self._float32(self.decoder, self.post_quant_conv):
            images = self._decode(latents.float(), banded)
        return images.to(self.dtype)

    @staticmethod
    @contextlib.contextmanager
    def _float32(*modules: nn.Module):
        dtype = next(modules[0].parameters()).dtype
        try:
            for m in modules:
                m.float()
            yield
        finally:
            for m in modules:
                m.to(dtype)

    @staticmethod
    def _tile_geometry(tile: int, multiple: int) -> tuple[int, int]:
        """Tile side and overlap (a quarter of the tile), both multiples of ``multiple``."""
        tile = max(multiple, tile // multiple * multiple)
        overlap = tile // 4 // multiple * multiple
        return tile, overlap

    def _check_images(self, images: torch.Tensor) -> None:
        c, f = self.config, self.config.downscale
        if images.ndim != 4 or images.shape[1] != c.in_channels:
            raise ValueError(
                f"images must be (batch, {c.in_channels}, height, width); got shape "
                f"{tuple(images.shape)}"
            )
        H, W = images.shape[-2:]
        if H % f or W % f:
            raise ValueError(
                f"image height and width must be multiples of {f}; got {H}x{W} "
                f"(crop or pad to {H // f * f}x{W // f * f} or {math.ceil(H / f) * f}x"
                f"{math.ceil(W / f) * f})"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a floating-point tensor in [-1, 1], got {images.dtype} "
                "(map 8-bit pixels with x / 127.5 - 1)"
            )
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.5 or hi > 1.5:
            raise ValueError(
                f"images must be in [-1, 1]; found values in [{lo:.3g}, {hi:.3g}] "
                "(map [0, 1] with 2x - 1, 8-bit pixels with x / 127.5 - 1)"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(
                f"latents must be (batch, {c}, height, width); got shape {tuple(latents.shape)}"
            )
