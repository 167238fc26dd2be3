import pytest
import torch

from sd_controlnet import ControlNet, ControlNetConfig

# The machine is shared and small: one thread per test process beats two fighting for cores.
torch.set_num_threads(1)


def random_controlnet(config: ControlNetConfig, seed: int = 0) -> ControlNet:
    """A ControlNet whose every parameter is random: the zero convolutions too, or every
    residual would be 0 and any two implementations would agree."""
    g = torch.Generator().manual_seed(seed)
    model = ControlNet(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "bias" in name else 0.2) + (
                    1.0 if "norm" in name and "weight" in name else 0.0))  # fmt: skip
    return model


def inputs(config: ControlNetConfig, batch: int = 2, size: int = 8, tokens: int = 5, seed: int = 1):
    """Latents, timesteps, context and a control image (8x the latents' size) for a call."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.tensor([3.5, 900.0, 500.0, 17.0][:batch])
    context = torch.randn(batch, tokens, config.context_dim, generator=g)
    hint = torch.rand(batch, config.hint_channels, size * 8, size * 8, generator=g)
    return x, t, context, hint


@pytest.fixture
def tiny():
    return random_controlnet(ControlNetConfig.tiny())
