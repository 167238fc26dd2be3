"""The samplers: plain stateless functions of one shape, k-diffusion style.

Every sampler is `sample_x(model, x, sigmas, *, generator=None, callback=None, disable=None,
...options)`: `model(x, sigma)` is a denoiser (see `Denoiser`) on the sigma scale x = x_0 + sigma
eps, `x` the starting point at sigmas[0] on that scale, `sigmas` a falling ladder (tensor or list;
read once into Python floats, so the loop never waits on the device). It returns x at sigmas[-1].
Every random draw comes from `generator`. `callback` gets {"x", "i", "sigma", "denoised"} once per
step; `disable` switches the tqdm bar off.

DDIM, PLMS and DDPM are written on the sigma scale too: dividing the variance-preserving x_t by
sqrt(alpha_bar_t) turns DDIM into Euler steps (eta=0) or ancestral Euler steps (eta>0) and PLMS
into Adams-Bashforth on eps; `sample()` does the scaling in and out.
"""

from __future__ import annotations

import itertools
import math

import torch
from tqdm.auto import tqdm, trange

from sd_samplers.noise import BrownianTreeNoise, GaussianNoise, randn
from sd_samplers.schedule import karras_sigmas

__all__ = [
    "get_ancestral_step",
    "sample_ddim",
    "sample_ddim_cfg_pp",
    "sample_ddpm",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_heun",
    "sample_ipndm",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sample_restart",
    "sample_unipc",
]


# helpers


def _floats(sigmas) -> list[float]:
    return [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]


def _denoise(model, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return model(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32))


def _report(callback, x, i, sigma, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})


def _to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - D(x)) / sigma."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up noise.

    sigma_down^2 + sigma_up^2 = sigma_next^2; eta=1 is the DDPM posterior, eta=0 no noise.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    sigma_up = min(sigma_next, eta * up**0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras et al.'s stochastic churn: raise sigma to sigma_hat by adding fresh noise."""
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + randn(x.shape, generator, x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


# the original CompVis samplers, on the sigma scale


@torch.no_grad()
def sample_ddim(model, x, sigmas, *, eta=0.0, generator=None, callback=None, disable=None):
    """DDIM, Song et al. (2020): eta=0 deterministic; eta=1 the DDPM posterior."""
    sigmas = _floats(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised + _to_d(x, sigma, denoised) * sigma_down
        if sigma_up:
            x = x + randn(x.shape, generator, x) * sigma_up
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, *, generator=None, callback=None, disable=None):
    """DDPM ancestral sampling, Ho et al. (2020), on a strided ladder (DDIM with eta=1)."""
    return sample_ddim(
        model, x, sigmas, eta=1.0, generator=generator, callback=callback, disable=disable
    )


@torch.no_grad()
def sample_plms(model, x, sigmas, *, generator=None, callback=None, disable=None):
    """PLMS (pseudo linear multistep, 4th-order Adams-Bashforth on eps), Liu et al. (2022)."""
    sigmas = _floats(sigmas)
    old_eps = []
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        eps = _to_d(x, sigma, denoised)
        if not old_eps:  # the first step is a Heun (pseudo improved Euler) step: one extra call
            x_2 = x + eps * (sigma_next - sigma)
            eps_prime = (eps + _to_d(x_2, sigma_next, _denoise(model, x_2, sigma_next))) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps = [*old_eps[-2:], eps]
        x = x + eps_prime * (sigma_next - sigma)
    return x


# k-diffusion's samplers


@torch.no_grad()
def sample_euler(
    model, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Euler steps on the probability-flow ODE: Algorithm 2 of Karras et al. (2022)."""
    sigmas = _floats(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = _denoise(model, x, sigma_hat)
        _report(callback, x, i, sigma_hat, denoised)
        x = x + _to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Ancestral sampling with Euler steps (k-diffusion; the DDPM posterior for eta=1)."""
    sigmas = _floats(sigmas)
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Heun's 2nd-order method on the probability-flow ODE: Algorithm 2 of Karras et al. (2022)."""
    sigmas = _floats(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator)
        sigma_next = sigmas[i + 1]
        denoised = _denoise(model, x, sigma_hat)
        _report(callback, x, i, sigma_hat, denoised)
        d = _to_d(x, sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:  # Euler for the last step: D is not defined at sigma = 0
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, _denoise(model, x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """DPM-Solver-2 style midpoint steps (in log sigma), Lu et al. (2022) / Karras et al. (2022)."""
    sigmas = _floats(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, generator)
        sigma_next = sigmas[i + 1]
        denoised = _denoise(model, x, sigma_hat)
        _report(callback, x, i, sigma_hat, denoised)
        d = _to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            x = _dpm_2_step(model, x, d, sigma_hat, sigma_next)
    return x


def _dpm_2_step(model, x, d, sigma, sigma_next):
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _to_d(x_2, sigma_mid, _denoise(model, x_2, sigma_mid))
    return x + d_2 * (sigma_next - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Ancestral sampling with DPM-Solver-2 style midpoint steps (k-diffusion)."""
    sigmas = _floats(sigmas)
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = _to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_2_step(model, x, d, sigma, sigma_down)
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


def _lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the Lagrange basis polynomial of node t_(i-j) (exact)."""
    poly = [1.0]  # coefficients in u = tau - t_i, lowest degree first
    for k in range(order):
        if k == j:
            continue
        root, denom = t[i - k] - t[i], t[i - j] - t[i - k]
        shifted = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):  # poly *= (u - root) / denom
            shifted[p + 1] += c / denom
            shifted[p] -= c * root / denom
        poly = shifted
    h = t[i + 1] - t[i]
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))


@torch.no_grad()
def sample_lms(model, x, sigmas, *, order=4, generator=None, callback=None, disable=None):
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, k-diffusion."""
    sigmas = _floats(sigmas)
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = _denoise(model, x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        ds = [*ds, _to_d(x, sigmas[i], denoised)][-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, sigmas, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# DPM-Solver++ (Lu et al. 2022), in t = -log sigma


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Ancestral sampling with DPM-Solver++(2S) single-step 2nd-order steps, Lu et al. (2022)."""
    sigmas = _floats(sigmas)
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = sigma * math.exp(-h / 2)
            x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            denoised_2 = _denoise(model, x_2, sigma_mid)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


def _brownian(x, sigmas, generator):
    positive = [s for s in sigmas if s > 0]
    return BrownianTreeNoise(x, min(positive), max(positive), generator)


@torch.no_grad()
def sample_dpmpp_sde(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, r=0.5, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """DPM-Solver++ (stochastic, single-step 2nd order, Brownian-tree noise), Lu et al. (2022)."""
    sigmas = _floats(sigmas)
    noise = _brownian(x, sigmas, generator) if noise_sampler is None else noise_sampler
    fac = 1 / (2 * r)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = -math.log(sigma), -math.log(sigma_next)
        sigma_s = math.exp(-(t + (t_next - t) * r))
        # step 1: to the intermediate sigma_s
        sd, su = get_ancestral_step(sigma, sigma_s, eta)
        x_2 = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised
        if su:
            x_2 = x_2 + noise(sigma, sigma_s) * s_noise * su
        denoised_2 = _denoise(model, x_2, sigma_s)
        # step 2: to sigma_next, with a mix of both denoised estimates
        sd, su = get_ancestral_step(sigma, sigma_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma) * x - math.expm1(t + math.log(sd)) * denoised_d
        if su:
            x = x + noise(sigma, sigma_next) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, generator=None, callback=None, disable=None):
    """DPM-Solver++(2M): 2nd-order multistep, Lu et al. (2022)."""
    sigmas = _floats(sigmas)
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma) - math.log(sigma_next)
        denoised_d = denoised
        if old_denoised is not None:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, solver_type="midpoint", noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """DPM-Solver++(2M) SDE: 2nd-order multistep with noise (Brownian tree), Lu et al. (2022)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    sigmas = _floats(sigmas)
    noise = _brownian(x, sigmas, generator) if noise_sampler is None else noise_sampler
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
        if eta:
            scale = sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
            x = x + noise(sigma, sigma_next) * scale
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """DPM-Solver++(3M) SDE: 3rd-order multistep with noise (Brownian tree), Lu et al. (2022)."""
    sigmas = _floats(sigmas)
    noise = _brownian(x, sigmas, generator) if noise_sampler is None else noise_sampler
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma) - math.log(sigma_next)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            scale = sigma_next * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise
            x = x + noise(sigma, sigma_next) * scale
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


# UniPC (Zhao et al. 2023), data prediction, in lambda = -log sigma


def _unipc_coefficients(lambdas, lam_s0, lam_t, order, variant, corrector):
    """(h, B(h), h phi_1, rhos) of one UniP (predictor) or UniC (corrector) update."""
    h = lam_t - lam_s0
    rks = [(lam - lam_s0) / h for lam in lambdas] + [1.0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = [[rk ** (k - 1) for rk in rks] for k in range(1, order + 1)]
    if corrector:
        rhos = [0.5] if order == 1 else _solve(R, b)
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else _solve(R[:-1], b[:-1], drop_last=True)
    return rks[:-1], b_h, h_phi_1, rhos


def _solve(R, b, drop_last=False):
    A = torch.tensor([row[:-1] if drop_last else row for row in R], dtype=torch.float64)
    return torch.linalg.solve(A, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x, sigma_s0, sigma_t, ms, lambdas, order, variant, model_t=None):
    """Move x from sigma_s0 to sigma_t with the last `order` denoised outputs `ms` (UniP), or,
    given the new output `model_t` at sigma_t, correct the result (UniC)."""
    lam_s0, lam_t = -math.log(sigma_s0), -math.log(sigma_t)
    m0 = ms[-1]
    older = list(range(2, order + 1))  # ms[-k] for k in 2..order
    rks, b_h, h_phi_1, rhos = _unipc_coefficients(
        [lambdas[-k] for k in older], lam_s0, lam_t, order, variant, model_t is not None
    )
    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    res = sum(rho * (ms[-k] - m0) / rk for rho, k, rk in zip(rhos, older, rks))
    if model_t is not None:
        res = res + rhos[-1] * (model_t - m0)
    return x_t - b_h * res


@torch.no_grad()
def sample_unipc(
    model, x, sigmas, *, order=3, variant="bh1", lower_order_final=True,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """UniPC: multistep predictor (UniP) + corrector (UniC) of order `order`, Zhao et al. (2023)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    sigmas = _floats(sigmas)
    n = len(sigmas) - 1
    ms, lambdas, x_last, last_order = [], [], None, 1
    for i in trange(n, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        if x_last is not None:  # UniC: correct this step's x with the output just computed
            x = _unipc_update(x_last, sigmas[i - 1], sigma, ms, lambdas, last_order, variant,
                              model_t=denoised)  # fmt: skip
        ms, lambdas = [*ms, denoised][-order:], [*lambdas, -math.log(sigma)][-order:]
        if sigma_next == 0:
            x = denoised
            break
        last_order = min(order, len(ms), n - i if lower_order_final else order)
        x_last = x
        x = _unipc_update(x, sigma, sigma_next, ms, lambdas, last_order, variant)
    return x


# DPM-Solver (Lu et al. 2022) in t = -log sigma, on eps: the fixed-step and adaptive variants


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps on eps = (x - D(x)) / sigma, in t = -log sigma, with each
    step's model outputs cached by key so that a lower- and a higher-order step can share them."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    @staticmethod
    def sigma(t: float) -> float:
        return math.exp(-t)

    def eps(self, cache: dict, key: str, x, t: float):
        if key not in cache:
            sigma = self.sigma(t)
            denoised = _denoise(self.model, x, sigma)
            self.calls += 1
            cache[key] = ((x - denoised) / sigma, denoised)
        return cache[key][0]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.sigma(t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sigma_next = self.sigma(t_next)
        return (x - sigma_next * math.expm1(h) * eps
                - sigma_next / (2 * r1) * math.expm1(h) * (eps_r1 - eps))  # fmt: skip

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        phi_2 = math.expm1(r2 * h) / (r2 * h) - 1
        u2 = (x - self.sigma(s2) * math.expm1(r2 * h) * eps
              - self.sigma(s2) * (r2 / r1) * phi_2 * (eps_r1 - eps))  # fmt: skip
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sigma_next = self.sigma(t_next)
        return (x - sigma_next * math.expm1(h) * eps
                - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps))  # fmt: skip

    def ancestral(self, t, t_next, t_end, eta):
        """(the t to step to deterministically, the noise to add after) for an eta step."""
        if not eta:
            return t_next, 0.0
        sd, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_down = min(t_end, -math.log(sd))
        # clamped at 0: when t_down is clamped to t_end = t_next the difference is rounding
        return t_down, max(self.sigma(t_next) ** 2 - self.sigma(t_down) ** 2, 0.0) ** 0.5


def _ends(sigmas: list[float]) -> tuple[float, float]:
    positive = [s for s in sigmas if s > 0]
    if not positive:
        raise ValueError("DPM fast/adaptive need a ladder with a positive sigma")
    return min(positive), max(positive)


@torch.no_grad()
def sample_dpm_fast(
    model, x, sigmas, *, eta=0.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """DPM-Solver-Fast, Lu et al. (2022): n = len(sigmas) - 1 model calls in floor(n / 3) + 1
    steps evenly spaced in log sigma from the ladder's first sigma to its smallest positive one
    (only the ends of the ladder matter; `sample` puts the schedule's sigma_min in place of a
    final 0), orders 3, ..., 3 then the rest; returns x at that smallest sigma, as k-diffusion's
    sample_dpm_fast(model, x, sigma_min, sigma_max, n)."""
    sigmas = _floats(sigmas)
    sigma_min, sigma_max = _ends(sigmas)
    nfe = len(sigmas) - 1
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    solver = _DPMSolver(model)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = nfe // 3 + 1
    ts = [t_start + (t_end - t_start) * k / m for k in range(m)] + [t_end]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    with tqdm(total=nfe, disable=disable) as bar:
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            t_down, su = solver.ancestral(t, t_next, t_end, eta)
            cache, before = {}, solver.calls
            solver.eps(cache, "eps", x, t)
            _report(callback, x, i, solver.sigma(t), cache["eps"][1])
            step = (solver.step_1, solver.step_2, solver.step_3)[order - 1]
            x = step(x, t, t_down, cache)
            if su:
                x = x + noise(solver.sigma(t), solver.sigma(t_next)) * s_noise * su
            bar.update(solver.calls - before)
    return x


class _PIDStepSize:
    """A PID controller of the step size h from the (normalised) local error, as k-diffusion's
    PIDStepSizeController (integral-only by default): accept when the change factor is above
    `accept_safety`."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # a soft limiter on how fast h changes
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model, x, sigmas, *, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0,
    dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """DPM-Solver-12 / 23 with adaptive step size, Lu et al. (2022): from the ladder's first sigma
    to its smallest positive one (only the ends matter), each step a pair of orders (1 and 2, or 2
    and 3) whose difference controls h; the number of model calls depends on the model. Returns x
    at that smallest sigma, as k-diffusion's sample_dpm_adaptive(model, x, sigma_min, sigma_max).
    One callback per attempted step (rejected ones too), as there."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    sigmas = _floats(sigmas)
    sigma_min, sigma_max = _ends(sigmas)
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    solver = _DPMSolver(model)
    s, t_end = -math.log(sigma_max), -math.log(sigma_min)
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev, i = x, 0
    with tqdm(disable=disable) as bar:
        while s < t_end - 1e-5:
            t = min(t_end, s + pid.h)
            t_down, su = solver.ancestral(s, t, t_end, eta)
            cache, before = {}, solver.calls
            solver.eps(cache, "eps", x, s)
            _report(callback, x, i, solver.sigma(s), cache["eps"][1])
            if order == 2:
                x_low = solver.step_1(x, s, t_down, cache)
                x_high = solver.step_2(x, s, t_down, cache)
            else:
                x_low = solver.step_2(x, s, t_down, cache, r1=1 / 3)
                x_high = solver.step_3(x, s, t_down, cache)
            # the error relative to atol + rtol |x|, RMS over the elements (one host sync a step)
            scale = (rtol * torch.maximum(x_low.abs(), x_prev.abs())).clamp(min=atol)
            error = torch.linalg.norm((x_low - x_high) / scale).item() / x.numel() ** 0.5
            if pid.propose(error):
                x_prev = x_low
                x = x_high
                if su:
                    x = x + noise(solver.sigma(s), solver.sigma(t)) * s_noise * su
                s = t
            i += 1
            bar.update(solver.calls - before)
    return x


# Restart sampling (Xu et al. 2023), as AUTOMATIC1111's restart_sampler


def _closest(sigmas: list[float], value: float) -> int:
    return min(range(len(sigmas)), key=lambda k: abs(sigmas[k] - value))


def _restart_steps(sigmas: list[float], restart_list) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs Restart steps through: the main ladder, with each restart
    segment (a Karras ladder back down from a higher sigma) repeated after its sigma."""
    steps = len(sigmas) - 1
    if restart_list is None:  # AUTOMATIC1111's choice: from 20 steps, spend some on restarts
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            n_main = steps - restart_steps * restart_times
            sigmas = _floats(karras_sigmas(n_main, sigmas[-2], sigmas[0]))
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    at = {_closest(sigmas, key): value for key, value in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            n, times, sigma_high = at[i + 1]
            top = _closest(sigmas, sigma_high)
            if top < i + 1:
                segment = _floats(karras_sigmas(n, sigmas[i + 1], sigmas[top]))[:-1]
                pairs.extend(list(itertools.pairwise(segment)) * times)
    return pairs


@torch.no_grad()
def sample_restart(
    model, x, sigmas, *, s_noise=1.0, restart_list=None, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Restart sampling, Xu et al. (2023): Heun steps, and at chosen sigmas a jump back up (fresh
    noise) and a second descent. restart_list {sigma: [steps, times, sigma_high]}; None for
    AUTOMATIC1111's default (none below 20 steps; else a Karras main ladder of steps - 9, or of
    steps / 2 from 36 steps, and restarts from 0.1 up to 2), so the step count stays as asked."""
    sigmas = _floats(sigmas)
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    last = None
    for i, (sigma, sigma_next) in enumerate(tqdm(_restart_steps(sigmas, restart_list),
                                                 disable=disable)):  # fmt: skip
        if last is not None and last < sigma:  # a restart: noise x back up to sigma
            x = x + noise(last, sigma) * s_noise * (sigma**2 - last**2) ** 0.5
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        d = _to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, _denoise(model, x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        last = sigma_next
    return x


# few-step and guidance-aware samplers


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, noise_sampler=None, generator=None, callback=None,
               disable=None):  # fmt: skip
    """Latent Consistency Model sampling, Luo et al. (2023): jump to the denoised estimate, then
    noise it afresh to the next sigma (multistep consistency sampling)."""
    sigmas = _floats(sigmas)
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * sigma_next
    return x


def _denoise_both(model, x, sigma: float):
    """(guided, unconditional) denoised estimates, from a denoiser that takes with_uncond."""
    sigma_t = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
    return model(x, sigma_t, with_uncond=True)


def _cfg_pp(model, x, sigmas, eta, draw, callback, disable):
    """CFG++ steps: the guided estimate as the target, the unconditional one's noise as the
    direction (Chung et al. 2024), ancestral for eta > 0 with noise from draw(sigma, next)."""
    sigmas = _floats(sigmas)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = _denoise_both(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised + _to_d(x, sigma, uncond) * sigma_down
        if sigma_up and sigma_next > 0:
            x = x + draw(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, *, generator=None, callback=None, disable=None):
    """Euler CFG++, Chung et al. (2024): x_next = D_guided + sigma_next (x - D_uncond) / sigma.
    `model(x, sigma, with_uncond=True)` must return (guided, unconditional) denoised."""
    return _cfg_pp(model, x, sigmas, 0.0, None, callback, disable)


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    model, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler=None,
    generator=None, callback=None, disable=None,
):  # fmt: skip
    """Euler a CFG++: ancestral Euler steps with CFG++'s unconditional direction (ComfyUI's
    euler_ancestral_cfg_pp)."""
    noise = GaussianNoise(x, generator) if noise_sampler is None else noise_sampler
    return _cfg_pp(model, x, sigmas, eta, lambda s, n: noise(s, n) * s_noise, callback, disable)


@torch.no_grad()
def sample_ddim_cfg_pp(model, x, sigmas, *, eta=0.0, generator=None, callback=None, disable=None):
    """DDIM CFG++ (AUTOMATIC1111's ddim_cfgpp): DDIM on the CompVis timesteps with the
    unconditional eps as the direction to x_t-1; eta > 0 adds DDIM's posterior noise."""
    return _cfg_pp(model, x, sigmas, eta, lambda s, n: randn(x.shape, generator, x), callback,
                   disable)  # fmt: skip


@torch.no_grad()
def sample_ipndm(model, x, sigmas, *, max_order=4, generator=None, callback=None, disable=None):
    """iPNDM, Zhang & Chen (2023) (DEIS paper): Adams-Bashforth on dx/dsigma with the fixed
    equal-step coefficients of orders 1-4, an Euler first step, and the denoised estimate as the
    last step to sigma 0 (ComfyUI's ipndm)."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"max_order must be in 1..4, got {max_order}")
    sigmas = _floats(sigmas)
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(model, x, sigma)
        _report(callback, x, i, sigma, denoised)
        d = _to_d(x, sigma, denoised)
        order = min(max_order, i + 1)
        if sigma_next == 0:
            x = denoised
        elif order == 1:
            x = x + (sigma_next - sigma) * d
        elif order == 2:
            x = x + (sigma_next - sigma) * (3 * d - ds[-1]) / 2
        elif order == 3:
            x = x + (sigma_next - sigma) * (23 * d - 16 * ds[-1] + 5 * ds[-2]) / 12
        else:
            x = x + (sigma_next - sigma) * (55 * d - 59 * ds[-1] + 37 * ds[-2] - 9 * ds[-3]) / 24
        ds = [*ds, d][-(max_order - 1) :] if max_order > 1 else []
    return x
