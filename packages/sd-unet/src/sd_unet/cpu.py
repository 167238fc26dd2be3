"""The UNet's CPU fast paths for float32 inference, each an ordinary layer everywhere else:
``Conv3x3``, the 3x3 convolutions through Winograd's algorithm (winograd.py) where the image
is large next to the weights, and ``Linear``, the linear layers through oneDNN's kernel."""

from __future__ import annotations

from torch import nn

from sd_unet import _onednn, winograd


class Conv3x3(nn.Conv2d):
    """The 3x3, stride-1 convolutions of the ResBlocks and Upsamples (an ``nn.Conv2d``, same
    parameters). In float32 on the CPU without autograd or autocast, over at least
    ``winograd_min_pixels`` output pixels (batch x height x width), it runs Winograd's
    F(4x4, 3x3) (winograd.py): 4 times fewer multiply-adds, equal to float32 rounding (1e-5 of
    the largest value).

    It is faster than oneDNN's direct convolution where the image is large next to the weights
    (SD's 64x64 and 32x32 levels) and slower below that, hence the threshold (figures:
    benchmarks/README.md). ``Conv3x3.winograd_min_pixels = None`` turns it off.
    """

    winograd_min_pixels: int | None = 2048

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.workspace: winograd.Workspace | None = None  # the UNet gives its convs one

    def forward(self, x):
        n, _, h, w = x.shape
        if (
            self.winograd_min_pixels is not None
            and n * h * w >= self.winograd_min_pixels
            and _onednn.cpu_float32_inference(x, self.weight)
        ):
            return winograd.conv3x3(x, self.weight, self.bias, self.workspace)
        return super().forward(x)


Linear = _onednn.Linear  # the linear layers: oneDNN's kernel for float32 CPU inference
