"""Every registered sampler honours the same contract, and sample() rejects bad input clearly."""

import pytest
import torch
from _refs import ToyEps

from sd_samplers import SAMPLERS, NoiseSchedule, sample

SCHEDULE = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
SHAPE = (2, 4, 5, 5)
STEPS = 6


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _run(name, seed=1, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return sample(name, ToyEps(), _noise(), SCHEDULE, STEPS, generator=g, progress=False, **kwargs)


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.calls = ToyEps(), 0

    def forward(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        assert t.min() >= 0 and t.max() <= 999
        return self.inner(x, t)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name):
    spec = SAMPLERS[name]
    steps, seen, model = [], [], Counter()
    out = sample(name, model, _noise(), SCHEDULE, STEPS, generator=torch.Generator().manual_seed(1),
                 callback=steps.append, progress=False)  # fmt: skip
    assert out.shape == SHAPE and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the model ran as often as documented
    assert model.calls == spec.model_calls(STEPS)
    # one callback per step, fixed keys, on the sampler's ladder, from high to low noise
    sigmas = spec.sigmas(SCHEDULE, STEPS).tolist()
    assert [d["i"] for d in steps] == list(range(STEPS))
    for d in steps:
        assert set(d) == {"x", "i", "sigma", "denoised"}
        assert d["x"].shape == SHAPE and d["denoised"].shape == SHAPE
        assert torch.isfinite(d["denoised"]).all()
        seen.append(d["sigma"])
    assert seen == pytest.approx(sigmas[:-1], rel=1e-6)
    # the same generator seed gives the same result; a different seed differs iff stochastic
    again = _run(name, seed=1)
    assert torch.equal(out, again)
    other = _run(name, seed=2)
    stochastic = (
        name.split("_karras")[0] in {"ddpm", "euler_a", "dpm2_a", "dpmpp_2s_a"} or "sde" in name
    )
    assert torch.equal(out, other) != stochastic


def test_ladders_fall_to_zero_or_alpha_0():
    for name, spec in SAMPLERS.items():
        sigmas = spec.sigmas(SCHEDULE, STEPS)
        assert len(sigmas) == STEPS + 1, name
        assert (sigmas[1:] < sigmas[:-1]).all(), name
        expected_last = SCHEDULE.sigmas[0].item() if spec.ladder == "compvis" else 0.0
        assert sigmas[-1].item() == pytest.approx(expected_last), name


def test_ddim_eta_is_stochastic_only_when_asked():
    assert torch.equal(_run("ddim", seed=1, eta=0.5), _run("ddim", seed=1, eta=0.5))
    assert not torch.equal(_run("ddim", seed=1, eta=0.5), _run("ddim", seed=2, eta=0.5))


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras", "ddim", "plms", "heun"])
def test_img2img_strength(name):
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    txt2img = _run(name)
    assert torch.equal(_run(name, init=init, strength=1.0), txt2img)  # strength 1: init unused
    assert torch.equal(_run(name, init=init, strength=0.0), init)
    model, calls = Counter(), []
    steps = 10
    out = sample(name, model, _noise(), SCHEDULE, steps, init=init, strength=0.5, progress=False,
                 callback=calls.append)  # fmt: skip
    assert len(calls) == 5 and model.calls == SAMPLERS[name].model_calls(5)
    full = SAMPLERS[name].sigmas(SCHEDULE, steps).tolist()
    assert calls[0]["sigma"] == pytest.approx(full[5])  # the last 5 steps of the 10-step ladder
    # at low strength the result stays near init; x at the start is init + sigma * noise
    torch.testing.assert_close(calls[0]["x"], init + full[5] * _noise())
    assert (out - init).abs().mean() < (txt2img - init).abs().mean()
    # 0.29 * 100 is 28.999999999999996 in floats; we still run 29 steps
    calls.clear()
    sample(name, ToyEps(), _noise(), SCHEDULE, 100, init=init, strength=0.29, progress=False,
           callback=calls.append)  # fmt: skip
    assert len(calls) == 29


def test_v_prediction_goes_through_the_same_adapter():
    """A v-model built from an eps-model gives the eps-model's samples."""
    eps_model = ToyEps()

    def v_model(x_t, t):
        alpha_bar = SCHEDULE.alpha_bar(t).view(-1, 1, 1, 1)
        eps = eps_model(x_t, t)
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        return alpha_bar**0.5 * eps - (1 - alpha_bar) ** 0.5 * x0

    for name in ("euler", "dpmpp_2m", "ddim"):
        a = sample(name, eps_model, _noise(), SCHEDULE, STEPS, progress=False)
        b = sample(name, v_model, _noise(), SCHEDULE, STEPS, progress=False, prediction="v")
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_progress_bar_can_be_switched(capsys):
    sample("euler", ToyEps(), _noise(), SCHEDULE, 3, progress=True)
    assert "3/3" in capsys.readouterr().err
    sample("euler", ToyEps(), _noise(), SCHEDULE, 3, progress=False)
    assert capsys.readouterr().err == ""


class Declares(ToyEps):
    num_train_timesteps = 500


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "eular"}, "unknown sampler 'eular'; choose from: ddpm, ddim, plms, euler"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"steps": 2.5}, "steps must be an integer >= 1"),
        ({"strength": 1.5}, r"strength must be in \[0, 1\], got 1.5"),
        ({"strength": -0.1}, r"strength must be in \[0, 1\]"),
        ({"strength": 0.5}, "needs init="),
        ({"init": torch.zeros(1, 4, 5, 5)}, r"init has shape \(1, 4, 5, 5\) but noise has"),
        ({"model": Declares()}, "declares 500 training timesteps but the schedule has 1000"),
        ({"eta": 0.5}, "sampler 'euler' takes no option eta; its options: s_churn"),
        ({"prediction": "x0"}, "unknown prediction 'x0'; choose from: epsilon, v"),
        ({"noise": [1.0, 2.0]}, "noise must be a floating-point tensor"),
    ],
)
def test_bad_input_is_refused_clearly(kwargs, message):
    args = {"name": "euler", "model": ToyEps(), "noise": _noise(), "schedule": SCHEDULE, "steps": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sample(**args, progress=False)


def test_compvis_steps_beyond_the_schedule_are_refused():
    with pytest.raises(ValueError, match=r"steps must be in \[1, 999\] here, got 1000"):
        sample("ddim", ToyEps(), _noise(), SCHEDULE, 1000, progress=False)
