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

import math

import torch
from tqdm.auto import trange

from sd_samplers.noise import BrownianTreeNoise, GaussianNoise, randn

__all__ = [
    "get_ancestral_step",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_plms",
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
