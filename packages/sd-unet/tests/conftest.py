import pytest
import torch

from sd_unet import UNet, UNetConfig


def random_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose every parameter is random (the default init zeroes nothing, but scale it so
    that no block is near-identity and differences show)."""
    torch.manual_seed(seed)
    model = UNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def inputs(config: UNetConfig, batch: int = 2, size: int = 16, tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([3.5, 900.0][:batch] + [500.0] * max(0, batch - 2))
    context = torch.randn(batch, tokens, config.context_dim, generator=g)
    return x, t, context


@pytest.fixture
def tiny():
    return random_unet(UNetConfig.tiny())
