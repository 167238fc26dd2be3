"""The UNet's CPU fast paths for float32 inference, each an ordinary layer everywhere else:
``Conv3x3``, the 3x3 convolutions through Winograd's algorithm (winograd.py) where the image
is large next to the weights and as one matrix product where it is small, and ``Linear``, the
linear layers through oneDNN's kernel."""

from __future__ import annotations

from torch import nn

from sd_unet import _onednn, winograd


class Conv3x3(nn.Conv2d):
    """The 3x3, stride-1 convolutions of the ResBlocks and Upsamples (an ``nn.Conv2d``, same
    parameters). In float32 on the CPU without autograd or autocast:

    - over at least ``winograd_min_pixels`` output pixels (batch x height x width), Winograd's
      F(4x4, 3x3) (winograd.py): 4 times fewer multiply-adds, equal to float32 rounding (1e-5
      of the largest value). Faster than oneDNN's direct convolution where the image is large
      next to the weights (SD's 64x64 and 32x32 levels), slower below that;
    - over at most ``product_pixels_per_channel`` output pixels per input channel (SD 1.x's
      1280-channel convolutions at 16x16 and 8x8), ``winograd.conv3x3_product``: one matrix
      product, which runs there at the product's full rate where the direct convolution,
      blocked for large images, runs at half of it or less. Equal to float32 rounding (the
      same sums in another order).

    Figures: benchmarks/README.md. ``None`` turns either off.
    """

    winograd_min_pixels: int | None = 2048
    product_pixels_per_channel: float | None = 0.5

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.workspace: winograd.Workspace | None = None  # the UNet gives its convs one

    def forward(self, x):
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x, weight, bias):
        """The forward with another weight and bias of the same shapes (what sd-lora folds an
        attached LoRA's update into): the same fast paths."""
        if _onednn.cpu_float32_inference(x, weight):
            out = winograd.fast_conv3x3(x, weight, bias, self.workspace, self.winograd_min_pixels,
                                        self.product_pixels_per_channel, _onednn.linear)  # fmt: skip
            if out is not None:
                return out
        return self._conv_forward(x, weight, bias)


Linear = _onednn.Linear  # the linear layers: oneDNN's kernel for float32 CPU inference
