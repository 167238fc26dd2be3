"""Correctness against exact references: for Gaussian(-mixture) data the ideal denoiser is known.

1. Every sampler, run through sample() on the ideal eps-model of a two-component Gaussian mixture,
   must produce that mixture (mean, std, mass of each mode, Wasserstein-1 distance).
2. The deterministic samplers solve the probability-flow ODE, whose solution for Gaussian data is
   closed form: x(sigma) = mu + (x(sigma_0) - mu) sqrt((v + sigma^2) / (v + sigma_0^2)). Their
   error must fall with the number of steps at the order of the method.
"""

import math

import pytest
import torch
from _refs import GaussianMixture

import sd_samplers as ks  # the public sampler functions
from sd_samplers import SAMPLERS, SCHEDULERS, NoiseSchedule, sample

SCHEDULE = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
MIXTURE = GaussianMixture([0.3, 0.7], [-1.5, 1.0], [0.09, 0.16])
N = 8000
STEPS = 50
# The multistep SDE samplers and UniPC take big steps in log sigma at the low end of the uniform
# ladder (sigma 0.1 -> 0.03 -> 0): measured W1 0.07 (2M SDE), 0.13 (2M SDE heun), 0.07 (UniPC)
# at 50 steps, against 0.01-0.05 for the others and for their Karras/exponential variants.
LOOSE = {"dpmpp_2m_sde": 2, "dpmpp_2m_sde_heun": 3, "unipc": 1.5}
# the same on the schedules that equal that uniform ladder; and A1111's Beta schedule (linear in
# sigma, with quantiles crowded at both ends) leaves Euler a a big last step: std -0.065 measured
LOOSE_SCHEDULE = {
    **{(name, s): k for name, k in LOOSE.items() for s in ("uniform", "normal")},
    ("euler_a", "beta"): 1.25,
}


def _wasserstein_1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.sort().values - b.sort().values).abs().mean().item()


@pytest.fixture(scope="module")
def truth():
    return MIXTURE.sample(N, torch.Generator().manual_seed(123)).float()


def _distribution_check(name, truth, scheduler=None, loose=1.0):
    noise = torch.randn(1, N, generator=torch.Generator().manual_seed(0))  # one batch item of N
    g = torch.Generator().manual_seed(1)
    out = sample(name, MIXTURE.eps_model(SCHEDULE), noise, SCHEDULE, STEPS, generator=g,
                 progress=False, scheduler=scheduler).flatten()  # fmt: skip
    spec = SAMPLERS[name]  # DDIM/PLMS stop at t=0, DPM fast/adaptive and kl_optimal at sigma_min
    last = spec.final_sigma(spec.sigmas(SCHEDULE, STEPS, scheduler))
    mean, std, p_pos = MIXTURE.moments(last)
    ref = (truth + last * torch.randn(N, generator=torch.Generator().manual_seed(7))) * (
        1 + last**2
    ) ** -0.5
    w1 = _wasserstein_1(out, ref)
    d_mean, d_std = out.mean().item() - mean, out.std().item() - std
    d_p = (out > 0).float().mean().item() - p_pos
    print(f"DIST {name} {scheduler}: mean {d_mean:+.3f} std {d_std:+.3f} P(x>0) {d_p:+.3f} "
          f"W1 {w1:.3f}")  # fmt: skip
    k = loose
    assert abs(d_mean) < 0.06 and abs(d_std) < 0.06 * k and abs(d_p) < 0.025 * k and w1 < 0.06 * k


# LCM jumps to the denoised estimate, which for an ideal denoiser is the posterior mean, not a
# sample: it is exact for a consistency model instead (test_lcm_is_exact_for_a_consistency_model)
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"lcm"}))
def test_samples_follow_the_data_distribution(name, truth):
    _distribution_check(name, truth, loose=LOOSE.get(name, 1))


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m_sde"])
def test_samples_follow_the_data_distribution_on_every_schedule(name, scheduler, truth):
    _distribution_check(name, truth, scheduler, loose=LOOSE_SCHEDULE.get((name, scheduler), 1))


@pytest.mark.parametrize("scheduler", [None, "simple"])
@pytest.mark.parametrize("steps", [1, 2, 8, 50])
def test_lcm_is_exact_for_a_consistency_model(steps, scheduler):
    """For Gaussian data N(mu, v) the consistency function (the probability-flow ODE's map to
    sigma 0) is f(x, sigma) = mu + (x - mu) sqrt(v / (v + sigma^2)): it maps the marginal at sigma
    onto the data law, so LCM's jump-and-renoise is exact at any step count. The model is an LCM
    in its parameterisation: at its timestep t (one of 19, 39, ..., 999) it returns the eps whose
    boundary-conditioned estimate c_skip(t) x + c_out(t) (x - sigma eps) is f. These step counts
    keep every sigma on the LCM timesteps. (The start x = sigma_max noise, as every sampler takes
    it, has mean 0 where the marginal has mu: a bias of mu sqrt(v) / sigma_max, 0.007 here.)"""
    mu, v = 0.2, 0.25

    def model(x_t, t):
        assert torch.equal(t, t.round()) and ((t - 19) % 20 == 0).all()  # LCM's timesteps only
        sigma = SCHEDULE.t_to_sigma(t).view(-1, 1).double()
        x = x_t.double() * (1 + sigma**2) ** 0.5
        f = mu + (x - mu) * (v / (v + sigma**2)) ** 0.5
        scaled = t.view(-1, 1).double() * 10
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / (scaled**2 + 0.25) ** 0.5
        denoised = (f - c_skip * x) / c_out
        return ((x - denoised) / sigma).float()

    noise = torch.randn(1, N, generator=torch.Generator().manual_seed(0))
    out = sample("lcm", model, noise, SCHEDULE, steps, scheduler=scheduler, progress=False,
                 generator=torch.Generator().manual_seed(1)).flatten()  # fmt: skip
    exact = mu + v**0.5 * torch.randn(N, generator=torch.Generator().manual_seed(2))
    w1 = _wasserstein_1(out, exact)
    print(f"LCM {steps} {scheduler}: mean {out.mean():.3f} std {out.std():.3f} W1 {w1:.3f}")
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - v**0.5) < 0.02
    assert w1 < 0.03


def _gaussian_denoiser(mu, v):
    def denoise(x, sigma):
        return mu + v / (v + sigma.to(x.dtype).view(-1, 1) ** 2) * (x - mu)

    return denoise


def _unipc(**kw):
    return lambda *a, **k: ks.sample_unipc(*a, **kw, **k)


def _unguided(fn):
    """A CFG++ sampler on a denoiser without guidance: the unconditional estimate is the one."""

    def run(denoise, x, sigmas, **kwargs):
        def both(x, sigma, with_uncond=False):
            d = denoise(x, sigma)
            return (d, d) if with_uncond else d

        return fn(both, x, sigmas, **kwargs)

    return run


def _dpm_fast(denoise, x, sigmas, **kwargs):  # n model calls: compare at equal cost
    return ks.sample_dpm_fast(denoise, x, sigmas, **kwargs)


# name: (function, expected order, steps to measure between)
DETERMINISTIC = {
    "euler": (ks.sample_euler, 1, (16, 64)),
    "ddim": (ks.sample_ddim, 1, (16, 64)),
    "heun": (ks.sample_heun, 2, (16, 64)),
    "dpm2": (ks.sample_dpm_2, 2, (16, 64)),
    "dpmpp_2m": (ks.sample_dpmpp_2m, 2, (16, 64)),
    "plms": (ks.sample_plms, 2, (16, 64)),  # AB4 coefficients for equal steps: 2 on this ladder
    "lms": (ks.sample_lms, 3.5, (32, 128)),  # order 4, approached from below (startup steps)
    "unipc": (ks.sample_unipc, 2, (32, 128)),  # the final step is first order (lower_order_final)
    "unipc order 3, no lower-order final": (_unipc(lower_order_final=False), 4, (32, 128)),
    "unipc order 2, no lower-order final": (_unipc(order=2, lower_order_final=False), 3, (32, 128)),
    "unipc bh2": (_unipc(variant="bh2"), 2, (32, 128)),
    "ipndm": (ks.sample_ipndm, 2, (16, 64)),  # AB4 with equal-step coefficients, Euler start
    "euler_cfg_pp": (_unguided(ks.sample_euler_cfg_pp), 1, (16, 64)),
    "ddim_cfg_pp": (_unguided(ks.sample_ddim_cfg_pp), 1, (16, 64)),
    "dpm_fast (eta 0)": (_dpm_fast, 3, (15, 60)),  # orders 3, ..., 3: n a multiple of 3 + 0
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_error_falls_at_the_expected_order(name):
    fn, expected, (n_lo, n_hi) = DETERMINISTIC[name]
    mu, v = 0.7, 0.25
    x_unit = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for n in (n_lo, n_hi):
        # geometric ladder from sigma_max to sigma_min (not to 0, where the ODE is singular)
        sigmas = SCHEDULE.exponential(n)[:-1].double()
        x = x_unit * sigmas[0]
        out = fn(_gaussian_denoiser(mu, v), x, sigmas, disable=True)
        s0, s1 = sigmas[0].item(), sigmas[-1].item()
        exact = mu + (x - mu) * math.sqrt((v + s1**2) / (v + s0**2))
        errors[n] = (out - exact).abs().max().item()
    order = math.log(errors[n_lo] / errors[n_hi]) / math.log(n_hi / n_lo)
    print(f"ORDER {name}: {order:.2f} (errors {errors[n_lo]:.2e} at {n_lo}, {errors[n_hi]:.2e})")
    assert expected - 0.25 < order < expected + 0.6
