"""ControlNet residuals: added to the skip connections and the middle block's output, as
diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``."""

import pytest
import torch
from conftest import inputs
from test_parity import TINY_SD1, random_diffusers

from sd_unet import UNet

diffusers = pytest.importorskip("diffusers")


def _residuals(unet: UNet, x: torch.Tensor, rows: int, seed: int = 2):
    """Random residuals shaped like each input block's output (found by running them)."""
    g = torch.Generator().manual_seed(seed)
    shapes, h = [], x
    emb = torch.zeros(x.shape[0], unet.config.time_embed_dim)
    context = torch.zeros(x.shape[0], 1, unet.config.context_dim)
    with torch.no_grad():
        for block in unet.input_blocks:
            h = block(h, emb, context)
            shapes.append(h.shape[1:])
        mid = unet.middle_block(h, emb, context).shape[1:]
    down = [torch.randn(rows, *s, generator=g) for s in shapes]
    return down, torch.randn(rows, *mid, generator=g)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    theirs = random_diffusers(TINY_SD1)
    folder = tmp_path_factory.mktemp("unet")
    theirs.save_pretrained(folder)
    return UNet.from_checkpoint(folder), theirs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_residuals_match_diffusers(pair):
    ours, theirs = pair
    x, t, c = inputs(ours.config)
    down, mid = _residuals(ours, x, x.shape[0])
    with torch.no_grad():
        plain = ours(x, t, c)
        got = ours(x, t, c, down_residuals=down, mid_residual=mid)
        want = theirs(x, t, c, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample  # fmt: skip
    assert _rel(got, want) < 1e-4
    assert _rel(plain, got) > 1e-2  # the residuals did something


def test_residuals_with_shared_latents_match_repeated_latents(pair):
    """Latents of B rows, context and residuals of 2B (classifier-free guidance)."""
    ours, theirs = pair
    x, t, c = inputs(ours.config)
    c2 = torch.cat([c, c.flip(0)])
    down, mid = _residuals(ours, x, 2 * x.shape[0])
    with torch.no_grad():
        got = ours(x, t, c2, down_residuals=down, mid_residual=mid)
        want = theirs(torch.cat([x, x]), torch.cat([t, t]), c2,
                      down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample  # fmt: skip
    assert _rel(got, want) < 1e-4


def test_only_mid_or_only_down(pair):
    ours, theirs = pair
    x, t, c = inputs(ours.config)
    down, mid = _residuals(ours, x, x.shape[0])
    zeros = [torch.zeros_like(d) for d in down]
    with torch.no_grad():
        got = ours(x, t, c, mid_residual=mid)
        want = theirs(x, t, c, down_block_additional_residuals=zeros,
                      mid_block_additional_residual=mid).sample  # fmt: skip
        assert _rel(got, want) < 1e-4
        assert torch.equal(ours(x, t, c, down_residuals=zeros), ours(x, t, c))


def test_wrong_residuals_are_clear_errors(pair):
    ours, _ = pair
    x, t, c = inputs(ours.config)
    down, mid = _residuals(ours, x, x.shape[0])
    with pytest.raises(ValueError, match="down_residuals has 3 tensors; this UNet has"):
        ours(x, t, c, down_residuals=down[:3])
    bad = [*down[:1], torch.zeros(x.shape[0], 7, 16, 16), *down[2:]]
    with pytest.raises(ValueError, match=r"down_residuals\[1\] is \(2, 7, 16, 16\)"):
        ours(x, t, c, down_residuals=bad)
    with pytest.raises(ValueError, match="mid_residual is"):
        ours(x, t, c, mid_residual=mid[:, :, :2])
