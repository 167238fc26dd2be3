"""DeepCache: its full calls are the UNet's own; its shallow calls, given the inputs of the
full call before them, give the same result (the kept deep features are then exactly what the
deep blocks would compute), so the shallow branch is wired as the UNet is."""

import pytest
import torch
from conftest import inputs

from sd_unet import DeepCache, UNetConfig


@pytest.mark.parametrize("batch", [1, 2])
def test_interval_one_is_the_exact_unet(tiny, batch):
    cached = DeepCache(tiny, interval=1)
    with torch.no_grad():
        for seed in range(3):
            x, t, c = inputs(tiny.config, batch=batch, seed=seed)
            assert cached(x, t, c).equal(tiny(x, t, c))
    assert cached.full_calls == 3


def test_full_calls_are_the_unet_and_every_interval(tiny):
    cached = DeepCache(tiny, interval=3)
    with torch.no_grad():
        for call in range(7):
            x, t, c = inputs(tiny.config, seed=call)
            out, exact = cached(x, t, c), tiny(x, t, c)
            assert out.equal(exact) == (call % 3 == 0), call
    assert cached.full_calls == 3


@pytest.mark.parametrize("branch", range(5))  # tiny(): 6 input blocks, branches 0 .. 4
def test_a_shallow_call_on_the_same_inputs_is_the_full_result(tiny, branch):
    cached = DeepCache(tiny, interval=2, branch=branch)
    x, t, c = inputs(tiny.config)
    with torch.no_grad():
        exact = tiny(x, t, c)
        assert cached(x, t, c).equal(exact)  # full
        shallow = cached(x, t, c)
        assert cached.full_calls == 1
        torch.testing.assert_close(shallow, exact, rtol=1e-5, atol=1e-6)
        moved = cached(*inputs(tiny.config, seed=5)[:1], t, c)  # full again: not the old one
        assert cached.full_calls == 2 and not moved.equal(exact)


def test_shared_latents_and_residuals(tiny):
    """Classifier-free guidance's one latent row for two context rows, and a ControlNet's
    residuals (added to the fresh skips of a shallow call)."""
    x, t, c = inputs(tiny.config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        shapes = []
        blocks = [*tiny.input_blocks, tiny.middle_block]
        hooks = [b.register_forward_hook(lambda m, a, o: shapes.append(o.shape)) for b in blocks]
        tiny(x, t, c)
        for hook in hooks:
            hook.remove()
        down = [torch.randn(s, generator=g) * 0.1 for s in shapes[:-1]]
        mid = torch.randn(shapes[-1], generator=g) * 0.1
        cached = DeepCache(tiny, interval=4, branch=2)
        exact = tiny(x[:1], t[:1], c, down_residuals=down, mid_residual=mid)
        for _ in range(3):
            out = cached(x[:1], t[:1], c, down_residuals=down, mid_residual=mid)
            torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-6)
        assert cached.full_calls == 1


def test_each_shape_keeps_its_own(tiny):
    """Another size, batch or context length is a full call the first time, then runs its
    own interval on its own kept feature (a pipeline calls once per context length a step)."""
    cached = DeepCache(tiny, interval=2)
    shapes = [dict(size=16), dict(size=8), dict(batch=1, size=8), dict(size=8, tokens=5)]
    with torch.no_grad():
        for _ in range(2):  # full, then shallow, for each shape
            for shape in shapes:
                x, t, c = inputs(tiny.config, **shape)
                torch.testing.assert_close(cached(x, t, c), tiny(x, t, c), rtol=1e-5, atol=1e-6)
        assert cached.full_calls == 4
        cached.reset()
        cached(*inputs(tiny.config, size=8))
    assert cached.full_calls == 5


@pytest.mark.parametrize("interval, branch, match", [
    (0, 1, "interval must be a whole number, 1 or more"),
    (2.5, 1, "interval must be a whole number"),
    (3, 5, r"branch must be 0 to 4"),
    (3, -1, r"branch must be 0 to 4"),
])  # fmt: skip
def test_bad_settings(tiny, interval, branch, match):
    with pytest.raises(ValueError, match=match):
        DeepCache(tiny, interval=interval, branch=branch)


def test_sd15_branch_range():
    with torch.device("meta"):
        from sd_unet import UNet

        unet = UNet(UNetConfig.sd15())
    DeepCache(unet, branch=10)
    with pytest.raises(ValueError, match="branch must be 0 to 10"):
        DeepCache(unet, branch=11)
