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

import sd_samplers.k_samplers as ks
from sd_samplers import SAMPLERS, NoiseSchedule, sample

SCHEDULE = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
MIXTURE = GaussianMixture([0.3, 0.7], [-1.5, 1.0], [0.09, 0.16])
N = 8000
STEPS = 50
# The multistep SDE samplers and UniPC take big steps in log sigma at the low end of the uniform
# ladder (sigma 0.1 -> 0.03 -> 0): measured W1 0.07 (2M SDE), 0.13 (2M SDE heun), 0.07 (UniPC)
# at 50 steps, against 0.01-0.05 for the others and for their Karras/exponential variants.
LOOSE = {"dpmpp_2m_sde": 2, "dpmpp_2m_sde_heun": 3, "unipc": 1.5}


def _wasserstein_1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.sort().values - b.sort().values).abs().mean().item()


@pytest.fixture(scope="module")
def truth():
    return MIXTURE.sample(N, torch.Generator().manual_seed(123)).float()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samples_follow_the_data_distribution(name, truth):
    noise = torch.randn(1, N, generator=torch.Generator().manual_seed(0))  # one batch item of N
    g = torch.Generator().manual_seed(1)
    out = sample(name, MIXTURE.eps_model(SCHEDULE), noise, SCHEDULE, STEPS, generator=g,
                 progress=False).flatten()  # fmt: skip
    last = SAMPLERS[name].sigmas(SCHEDULE, STEPS)[-1].item()  # DDIM/PLMS stop at t=0
    mean, std, p_pos = MIXTURE.moments(last)
    ref = (truth + last * torch.randn(N, generator=torch.Generator().manual_seed(7))) * (
        1 + last**2
    ) ** -0.5
    w1 = _wasserstein_1(out, ref)
    d_mean, d_std = out.mean().item() - mean, out.std().item() - std
    d_p = (out > 0).float().mean().item() - p_pos
    print(f"DIST {name}: mean {d_mean:+.3f} std {d_std:+.3f} P(x>0) {d_p:+.3f} W1 {w1:.3f}")
    k = LOOSE.get(name, 1)
    assert abs(d_mean) < 0.06 and abs(d_std) < 0.06 * k and abs(d_p) < 0.025 * k and w1 < 0.06 * k


def _gaussian_denoiser(mu, v):
    def denoise(x, sigma):
        return mu + v / (v + sigma.to(x.dtype).view(-1, 1) ** 2) * (x - mu)

    return denoise


def _unipc(**kw):
    return lambda *a, **k: ks.sample_unipc(*a, **kw, **k)


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
