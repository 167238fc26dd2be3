import math

import pytest
import torch
import torch.nn.functional as F
from conftest import inputs, random_unet
from torch import nn

from sd_unet import UNet, UNetConfig
from sd_unet._onednn import if_linear
from sd_unet.unet import Linear, timestep_embedding


def test_output_shape_and_determinism(tiny):
    x, t, c = inputs(tiny.config)
    with torch.no_grad():
        a, b = tiny(x, t, c), tiny(x, t, c)
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert a.abs().mean() > 0


def test_batch_items_are_independent(tiny):
    x, t, c = inputs(tiny.config)
    with torch.no_grad():
        both = tiny(x, t, c)
        first = tiny(x[:1], t[:1], c[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)


def test_timesteps_as_number_or_tensor(tiny):
    x, _, c = inputs(tiny.config)
    with torch.no_grad():
        from_number = tiny(x, 250.5, c)
        from_scalar = tiny(x, torch.tensor(250.5), c)
        from_batch = tiny(x, torch.tensor([250.5, 250.5]), c)
        other = tiny(x, 251.0, c)
    assert torch.equal(from_number, from_scalar)
    assert torch.equal(from_number, from_batch)
    assert not torch.allclose(from_number, other)  # fractional timesteps are not rounded


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 8)
    half = 4
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            freq = math.exp(-math.log(10000) * j / half)
            assert emb[i, j].item() == pytest.approx(math.cos(ti * freq), abs=1e-5)
            assert emb[i, half + j].item() == pytest.approx(math.sin(ti * freq), abs=1e-5)


def test_channels_last_matches_contiguous(tiny):
    x, t, c = inputs(tiny.config)
    with torch.no_grad():
        ref = tiny(x, t, c)
        tiny.to(memory_format=torch.channels_last)
        out = tiny(x, t, c)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tiny, dtype):
    x, t, c = inputs(tiny.config)
    with torch.no_grad():
        ref = tiny(x, t, c)
        out = tiny.to(dtype)(x.to(dtype), t, c.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_gradient_checkpointing_gives_the_same_gradients():
    config = UNetConfig.tiny()
    x, t, c = inputs(config, size=8)
    grads = []
    for checkpointing in (False, True):
        model = random_unet(config).train()
        model.gradient_checkpointing = checkpointing
        model(x, t, c).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_training_step_with_inplace_ops_has_gradients_everywhere():
    model = random_unet(UNetConfig.tiny()).train()
    x, t, c = inputs(model.config, size=8)
    model(x, t, c).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_sd15_has_the_sd15_parameter_count():
    with torch.device("meta"):
        model = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_sd2_and_inpainting_configs_build():
    with torch.device("meta"):
        sd2 = UNet(UNetConfig.sd2())
        inpaint = UNet(UNetConfig(in_channels=9))
    assert sum(p.numel() for p in sd2.parameters()) == 865_910_724
    assert inpaint.input_blocks[0][0].weight.shape == (320, 9, 3, 3)
    block = sd2.input_blocks[1][1]
    assert isinstance(block.proj_in, torch.nn.Linear)
    assert block.transformer_blocks[0].attn1.heads == 5  # 320 channels in 64-wide heads


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": 8, "num_head_channels": 64}, "exactly one of num_heads"),
        ({"num_heads": -1}, "exactly one of num_heads"),
        ({"model_channels": 48}, "not a multiple of norm_groups=32"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_compile_frozen_calls_the_compiled_unet_with_freezing_on(monkeypatch):
    """compile_frozen hands the module and mode to torch.compile, and every call of what it
    returns runs with inductor's global ``freezing`` on (where inductor reads it when it
    compiles), and off again afterwards."""
    from torch._inductor import config as inductor_config

    from sd_unet import compile_frozen

    seen = {}

    def fake_compile(module, **kwargs):
        seen.update(module=module, kwargs=kwargs)
        return lambda *args, **kw: (inductor_config.freezing, module(*args, **kw))

    monkeypatch.setattr(torch, "compile", fake_compile)
    unet = random_unet(UNetConfig.tiny())
    frozen = compile_frozen(unet, mode="max-autotune")
    assert seen == {"module": unet, "kwargs": {"mode": "max-autotune"}}
    x, t, c = inputs(unet.config)
    with torch.no_grad():
        freezing, out = frozen(x, t, context=c)
        torch.testing.assert_close(out, unet(x, t, c))
    assert freezing is True and inductor_config.freezing is False


@pytest.mark.slow
def test_compile_frozen_gives_the_eager_numbers():
    from torch._inductor import freezing

    from sd_unet import compile_frozen

    unet = random_unet(UNetConfig.tiny())
    x, t, c = inputs(unet.config)
    froze = []
    real_freeze = freezing.freeze

    def spy(*args, **kwargs):
        froze.append(1)
        return real_freeze(*args, **kwargs)

    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(freezing, "freeze", spy)
        compiled = compile_frozen(unet)(x, t, c)
        eager = unet(x, t, c)
    assert froze, "inductor compiled the UNet without freezing its weights"
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_shared_latents_equal_the_latents_repeated(tiny, channels_last):
    # classifier-free guidance: context [uncond rows; cond rows], the latents once
    if channels_last:
        tiny = tiny.to(memory_format=torch.channels_last)
    x, t, c = inputs(tiny.config)
    uncond = torch.randn_like(c)
    with torch.no_grad():
        repeated = tiny(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, c]))
        shared = tiny(x, t, torch.cat([uncond, c]))
        three = tiny(x[:1], t[:1], torch.cat([uncond[:1], c[:1], uncond[1:]]))
    assert shared.shape == repeated.shape == (4, *x.shape[1:])
    torch.testing.assert_close(shared, repeated, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        each = [tiny(x[:1], t[:1], row[None]) for row in (uncond[0], c[0], uncond[1])]
    torch.testing.assert_close(three, torch.cat(each), rtol=1e-4, atol=1e-5)


def test_shared_latents_run_the_first_self_attention_once_per_image(tiny):
    x, t, c = inputs(tiny.config)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, out.shape[0])

        return hook

    first = tiny.input_blocks[1][1].transformer_blocks[0]
    hooks = [first.attn1.register_forward_hook(record("self")),
             first.attn2.register_forward_hook(record("cross"))]  # fmt: skip
    with torch.no_grad():
        tiny(x, t, torch.cat([c, c]))
    for hook in hooks:
        hook.remove()
    assert seen == {"self": 2, "cross": 4}


def test_shared_latents_without_attention_still_give_every_row():
    unet = random_unet(UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
        context_dim=32))  # fmt: skip
    x, t, c = inputs(unet.config)
    with torch.no_grad():
        shared = unet(x, t, torch.cat([c, c]))
        plain = unet(x, t, c)
    torch.testing.assert_close(shared, torch.cat([plain, plain]))


@pytest.mark.parametrize(
    "timesteps, context_batch, message",
    [
        (torch.tensor([1.0, 2.0, 3.0]), 2, "timesteps must be one number or one per latent row"),
        (5.0, 3, "a multiple of the latents' batch 2"),
    ],
)
def test_mismatched_batches_are_refused(tiny, timesteps, context_batch, message):
    x, _, c = inputs(tiny.config, batch=2)
    context = torch.randn(context_batch, *c.shape[1:])
    with pytest.raises(ValueError, match=message):
        tiny(x, timesteps, context)


def test_feed_forward_in_slices_of_tokens_equals_it_whole(monkeypatch):
    from sd_unet.unet import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(16).eval()
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        whole = ff(x)
        monkeypatch.setattr(FeedForward, "chunk", 10)  # 74 tokens: 8 slices, the last of 4
        calls = []
        ff.net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        sliced = ff(x)
    assert calls == [10] * 7 + [4]
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The linear layers through oneDNN


@pytest.mark.skipif(Linear.onednn is None, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize(
    "shape, bias", [((2, 77, 24), True), ((5, 24), False), ((1, 3, 4, 24), True)]
)
def test_onednn_linear_matches_f_linear_in_float64(shape, bias):
    """The fast path against the product in float64, as close as F.linear's float32 is; used
    only for float32 CPU inference, and F.linear itself everywhere else."""
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(shape)
    calls = []
    fast_op = Linear.onednn
    with torch.no_grad():
        layer.onednn = lambda *a: calls.append(1) or fast_op(*a)
        fast = layer(x)
        b = None if layer.bias is None else layer.bias.double()
        exact = F.linear(x.double(), layer.weight.double(), b)
        plain = F.linear(x, layer.weight, layer.bias)
        layer.double()(x.double())  # float64: F.linear
        layer.float()
    assert calls == [1]
    assert fast.shape == plain.shape and fast.dtype == torch.float32
    scale = exact.abs().max().item()
    assert (fast.double() - exact).abs().max().item() <= 4 * max(
        (plain.double() - exact).abs().max().item(), 1e-7 * scale
    )
    layer(x).sum().backward()  # autograd on: F.linear, for its backward pass
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert calls == [1]
    assert layer.weight.grad is not None


def test_a_unet_through_onednn_linears_matches_f_linear(monkeypatch):
    unet = random_unet(UNetConfig.tiny())
    x, t, c = inputs(unet.config)
    assert all(type(m) is Linear for m in unet.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        fast = unet(x, t, c)
        monkeypatch.setattr(Linear, "onednn", None)
        plain = unet(x, t, c)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_the_onednn_kernel_is_used_only_if_it_computes_f_linear():
    def broken(*args):
        raise TypeError("another signature")

    assert if_linear(None) is None
    assert if_linear(broken) is None
    assert if_linear(lambda x, w, b, *rest: torch.zeros(2, 2)) is None
    exact = if_linear(lambda x, w, b, *rest: F.linear(x, w, b))
    assert exact is not None
