"""Every registered sampler honours the same contract, and sample() rejects bad input clearly."""

import itertools

import pytest
import torch
from _refs import ToyEps

from sd_samplers import SAMPLERS, SCHEDULERS, NoiseSchedule, lcm_schedule, sample

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

    def forward(self, x, t, with_uncond=False):
        self.calls += 1
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        assert t.min() >= 0 and t.max() <= 999
        return self.inner(x, t, with_uncond=with_uncond)


# the samplers that draw noise at STEPS steps (typed here, not read from the registry)
STOCHASTIC = {"ddpm", "euler_a", "dpm2_a", "dpmpp_2s_a", "dpm_fast", "dpm_adaptive", "lcm",
              "euler_a_cfg_pp"}  # fmt: skip


def _check_callbacks(spec, steps, sigmas):
    """One callback per step with fixed keys, on the sampler's ladder, from high to low noise;
    for samplers that choose their own steps: consecutive, falling, from the ladder's top."""
    for d in steps:
        assert set(d) == {"x", "i", "sigma", "denoised"}
        assert d["x"].shape == SHAPE and d["denoised"].shape == SHAPE
        assert torch.isfinite(d["denoised"]).all()
    seen = [d["sigma"] for d in steps]
    assert [d["i"] for d in steps] == list(range(len(steps)))
    if spec.own_steps:
        assert seen[0] == pytest.approx(sigmas[0], rel=1e-6) and len(steps) >= 1
        if not spec.adaptive and not spec.noise_options:
            assert all(b < a for a, b in itertools.pairwise(seen))
    else:
        assert len(steps) == len(sigmas) - 1
        assert seen == pytest.approx(sigmas[:-1], rel=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_contract(name):
    spec = SAMPLERS[name]
    steps, model = [], Counter()
    out = sample(name, model, _noise(), SCHEDULE, STEPS, generator=torch.Generator().manual_seed(1),
                 callback=steps.append, progress=False)  # fmt: skip
    assert out.shape == SHAPE and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the model ran as often as documented
    assert spec.model_calls(STEPS) in (model.calls, None)
    _check_callbacks(spec, steps, spec.sigmas(SCHEDULE, STEPS).tolist())
    # the same generator seed gives the same result; a different seed differs iff stochastic
    again = _run(name, seed=1)
    assert torch.equal(out, again)
    other = _run(name, seed=2)
    stochastic = name.split("_karras")[0] in STOCHASTIC or "sde" in name
    assert torch.equal(out, other) != stochastic


SCHEDULABLE = sorted(n for n, spec in SAMPLERS.items() if spec.takes_scheduler)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", SCHEDULABLE)
def test_any_sampler_with_any_scheduler(name, scheduler):
    """sample(..., scheduler=) runs the sampler on exactly that scheduler's ladder."""
    spec = SAMPLERS[name]
    steps, model = [], Counter()
    out = sample(name, model, _noise(), SCHEDULE, STEPS, generator=torch.Generator().manual_seed(1),
                 callback=steps.append, progress=False, scheduler=scheduler)  # fmt: skip
    assert out.shape == SHAPE and torch.isfinite(out).all()
    sigmas = spec.sigmas(SCHEDULE, STEPS, scheduler).tolist()
    n = STEPS + 1 if spec.discard_penultimate else STEPS
    base = lcm_schedule(SCHEDULE) if spec.denoiser == "lcm" else SCHEDULE  # LCM's 50 timesteps
    ladder = SCHEDULERS[scheduler].sigmas(base, n).tolist()
    if spec.discard_penultimate:
        ladder = ladder[:-2] + ladder[-1:]
    assert sigmas == ladder
    _check_callbacks(spec, steps, sigmas)
    if not spec.adaptive:  # a second-order step to a last sigma above 0 takes its second call
        extra = spec.second_order and sigmas[-1] > 0
        assert model.calls == spec.model_calls(len(sigmas) - 1) + extra


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_few_steps_on_every_scheduler_stay_real_and_finite(name):
    """1-3 steps, where ladders are short and ends coincide (DPM fast's last ancestral step once
    took the square root of a rounding error's negative)."""
    spec = SAMPLERS[name]
    for scheduler in [None, *SCHEDULERS] if spec.takes_scheduler else [None]:
        for steps in (1, 2, 3):
            out = sample(name, ToyEps(), _noise(), SCHEDULE, steps, scheduler=scheduler,
                         generator=torch.Generator().manual_seed(1), progress=False)  # fmt: skip
            assert out.dtype == torch.float32 and torch.isfinite(out).all(), (scheduler, steps)


def test_scheduler_options_and_variants():
    # a _karras name is the base sampler on the karras scheduler
    assert torch.equal(_run("dpmpp_2m_karras"), _run("dpmpp_2m", scheduler="karras"))
    assert torch.equal(_run("euler", scheduler="uniform"), _run("euler"))
    # options reach the scheduler
    a = _run("euler", scheduler="karras", scheduler_options={"rho": 3.0})
    assert not torch.equal(a, _run("euler", scheduler="karras"))
    sdxl = SAMPLERS["euler"].sigmas(SCHEDULE, 11, "align_your_steps", model="sdxl")
    assert sdxl[1].item() == pytest.approx(6.315)  # 11 steps: the table itself (A1111)


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


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras", "ddim", "plms", "heun", "lcm",
                                  "ipndm", "euler_cfg_pp", "ddim_cfg_pp", "restart"])  # fmt: skip
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


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
@pytest.mark.parametrize("scheduler", [None, "karras"])
def test_img2img_for_samplers_with_their_own_steps(name, scheduler):
    """They start where the ladder's last floor(strength * steps) steps start, and end near init."""
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    calls = []
    out = _run(name, init=init, strength=0.5, callback=calls.append, scheduler=scheduler)
    full = SAMPLERS[name].sigmas(SCHEDULE, STEPS, scheduler).tolist()
    assert calls[0]["sigma"] == pytest.approx(full[STEPS - 3])
    torch.testing.assert_close(calls[0]["x"], init + full[STEPS - 3] * _noise())
    assert (out - init).abs().mean() < (_run(name, scheduler=scheduler) - init).abs().mean()


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

    def v_pair(x_t, t, with_uncond=False):  # CFG++: both predictions converted to v
        alpha_bar = SCHEDULE.alpha_bar(t).view(-1, 1, 1, 1)
        outs = eps_model(x_t, t, with_uncond=True)
        x0s = [(x_t - (1 - alpha_bar) ** 0.5 * e) / alpha_bar**0.5 for e in outs]
        return tuple(alpha_bar**0.5 * e - (1 - alpha_bar) ** 0.5 * x0 for e, x0 in zip(outs, x0s))

    for name in ("euler_cfg_pp", "ddim_cfg_pp"):
        a = sample(name, eps_model, _noise(), SCHEDULE, STEPS, progress=False)
        b = sample(name, v_pair, _noise(), SCHEDULE, STEPS, progress=False, prediction="v")
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
        ({"scheduler": "karas"}, "unknown scheduler 'karas'; choose from: uniform, karras"),
        ({"name": "ddim", "scheduler": "karras"}, "'ddim' runs on the original CompVis"),
        ({"scheduler": "karras", "scheduler_options": {"eta": 1}}, "'Karras' takes no option eta"),
        (
            {"scheduler": "align_your_steps", "scheduler_options": {"model": "sd3"}},
            "tables for sd15, sdxl, not 'sd3'",
        ),
        (
            {"name": "euler_cfg_pp", "model": lambda x, t: x},
            r"'euler_cfg_pp' \(CFG\+\+\) needs the unconditional prediction",
        ),
        (
            {"name": "euler_cfg_pp", "model": lambda x, t, with_uncond=False: x},
            "must return a pair",
        ),
        ({"name": "dpm_adaptive", "order": 4}, "order must be 2 or 3, got 4"),
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
