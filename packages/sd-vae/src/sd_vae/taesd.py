"""TAESD: a tiny autoencoder for Stable Diffusion's latent space (Ollin Boer Bohan, 2023).

A few 64-channel convolution blocks that decode SD latents to pixels about 100 times cheaper
than the KL VAE, close enough for live previews (and fine for final pictures in a hurry). The
module tree follows the published weights (``taesd_decoder.pth`` / ``.safetensors``: a flat
``nn.Sequential``, keys ``1.weight``, ``3.conv.0.weight``, ...), so loading them is a plain
``load_state_dict``; diffusers' ``AutoencoderTiny`` layout (``decoder.layers.N...``) is the
same modules, one index down (it applies the clamp outside its Sequential). TAESDXL has the same shape, other weights.

The decoder takes *scaled* latents (what the UNet sees, ``z * scaling_factor``) and gives
pictures in about [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sd_vae._checkpoint import CheckpointError, load_tensors

__all__ = ["TinyDecoder"]

WIDTH = 64  # every TAESD block's channels
LATENT_CLAMP = 3.0  # the decoder first soft-clamps latents to (-3, 3): tanh(z / 3) * 3


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


def _shift(key: str) -> str:
    index, _, rest = key.partition(".")
    return f"{int(index) + 1}.{rest}"


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / LATENT_CLAMP) * LATENT_CLAMP


class Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between, a residual, and a ReLU after the sum."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """TAESD's decoder: latents (B, 4, h, w) -> pictures (B, 3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, latent_channels: int = 4):
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, WIDTH), nn.ReLU()]
        for _level in range(3):  # three upsampling levels, then one more block
            layers += [Block(WIDTH, WIDTH) for _ in range(3)]
            layers += [nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]
        layers += [Block(WIDTH, WIDTH), _conv(WIDTH, 3)]
        super().__init__(*layers)
        self.latent_channels = latent_channels

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # the published network outputs [0, 1]; the rest of this package speaks [-1, 1]
        return super().forward(latents) * 2 - 1

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> TinyDecoder:
        """Load ``taesd_decoder`` weights (``.pth`` / ``.safetensors``, the published layout), a
        whole TAESD file holding ``decoder.*``, or diffusers' ``AutoencoderTiny`` layout
        (``decoder.layers.*``, a file or its folder's ``diffusion_pytorch_model.safetensors``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "diffusion_pytorch_model.safetensors"
        tensors = load_tensors(path)
        if any(k.startswith("decoder.layers.") for k in tensors):
            # diffusers keeps the clamp out of its Sequential: its layer N is our N + 1
            tensors = {
                _shift(k.removeprefix("decoder.layers.")): v
                for k, v in tensors.items()
                if k.startswith("decoder.layers.")
            }
        elif any(k.startswith("decoder.") for k in tensors):  # a whole TAESD (encoder too)
            tensors = {k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")}
        if "1.weight" not in tensors:
            raise CheckpointError(
                f"{path}: not a TAESD decoder: expected keys '1.weight', '3.conv.0.weight', ... "
                "(taesd_decoder.pth) or 'decoder.layers.*' (diffusers AutoencoderTiny)"
            )
        model = cls(latent_channels=tensors["1.weight"].shape[1])
        expected = model.state_dict()
        bad = sorted(set(expected) ^ set(tensors))
        if bad:
            raise CheckpointError(f"{path}: not a TAESD decoder (unexpected or missing: {bad[:4]})")
        for key, value in tensors.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(
                    f"{path}: {key} has shape {tuple(value.shape)}, a TAESD decoder has "
                    f"{tuple(expected[key].shape)}"
                )
        model.load_state_dict(tensors)
        return model.to(device=device, dtype=dtype or torch.float32).eval()
