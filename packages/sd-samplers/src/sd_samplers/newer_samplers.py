"""Samplers beyond k-diffusion's set, in the same shape (see ``k_samplers``): DPM-Solver's
fixed-step and adaptive variants (DPM fast, DPM adaptive), Restart, LCM, the CFG++ samplers
and iPNDM."""

from __future__ import annotations

import itertools
import math

import torch
from tqdm.auto import tqdm, trange

from sd_samplers.k_samplers import _denoise, _floats, _report, _to_d, get_ancestral_step
from sd_samplers.noise import GaussianNoise, randn
from sd_samplers.schedule import karras_sigmas

__all__ = [
    "sample_ddim_cfg_pp",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_euler_ancestral_cfg_pp",
    "sample_euler_cfg_pp",
    "sample_ipndm",
    "sample_lcm",
    "sample_restart",
]


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
