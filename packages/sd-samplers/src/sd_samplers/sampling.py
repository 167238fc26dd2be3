"""`sample()`: pick a sampler by its AUTOMATIC1111 name, build its sigma ladder, run it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sd_samplers import k_samplers as ks
from sd_samplers.denoiser import Denoiser
from sd_samplers.schedule import NoiseSchedule

__all__ = ["SAMPLERS", "Sampler", "sample"]

LADDERS = ("uniform", "karras", "exponential", "compvis", "ddpm")


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its function, the sigma ladder it runs on, and default options.

    ladder: "uniform" (k-diffusion's get_sigmas), "karras" (rho 7), "exponential", "compvis"
    (the original DDIM/PLMS timesteps, ending at alpha_bar_0) or "ddpm" (the same, ending at 0).
    discard_penultimate: build steps + 1 sigmas and drop the next-to-last, as AUTOMATIC1111 does
    for DPM2, DPM2 a and DPM++ 3M SDE. second_order: two model calls per step (one for the last
    step, which is Euler to sigma 0). warmup_calls: extra calls once (PLMS' first Heun step).
    """

    fn: Callable
    ladder: str = "uniform"
    options: dict = field(default_factory=dict)
    second_order: bool = False
    warmup_calls: int = 0
    discard_penultimate: bool = False

    @property
    def vp(self) -> bool:
        """True for the CompVis samplers, which start from x_T = noise on the VP scale."""
        return self.ladder in ("compvis", "ddpm")

    def sigmas(self, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
        """The steps + 1 sigmas this sampler steps through for `steps` steps."""
        n = steps + 1 if self.discard_penultimate else steps
        if self.ladder == "uniform":
            sigmas = schedule.get_sigmas(n)
        elif self.ladder == "karras":
            sigmas = schedule.karras(n)
        elif self.ladder == "exponential":
            sigmas = schedule.exponential(n)
        else:
            sigmas = schedule.compvis_sigmas(n, "alpha_0" if self.ladder == "compvis" else "zero")
        if self.discard_penultimate:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def model_calls(self, steps: int) -> int:
        """How many times the model runs for `steps` steps (ladders ending at sigma 0)."""
        return (2 * steps - 1 if self.second_order else steps) + self.warmup_calls


_BASE = {
    "ddpm": Sampler(ks.sample_ddpm, ladder="ddpm"),
    "ddim": Sampler(ks.sample_ddim, ladder="compvis"),
    "plms": Sampler(ks.sample_plms, ladder="compvis", warmup_calls=1),
    "euler": Sampler(ks.sample_euler),
    "euler_a": Sampler(ks.sample_euler_ancestral),
    "heun": Sampler(ks.sample_heun, second_order=True),
    "lms": Sampler(ks.sample_lms),
    "dpm2": Sampler(ks.sample_dpm_2, second_order=True, discard_penultimate=True),
    "dpm2_a": Sampler(ks.sample_dpm_2_ancestral, second_order=True, discard_penultimate=True),
    "dpmpp_2s_a": Sampler(ks.sample_dpmpp_2s_ancestral, second_order=True),
    "dpmpp_2m": Sampler(ks.sample_dpmpp_2m),
    "dpmpp_sde": Sampler(ks.sample_dpmpp_sde, second_order=True),
    "dpmpp_2m_sde": Sampler(ks.sample_dpmpp_2m_sde),
    "dpmpp_2m_sde_heun": Sampler(ks.sample_dpmpp_2m_sde, options={"solver_type": "heun"}),
    "dpmpp_3m_sde": Sampler(ks.sample_dpmpp_3m_sde, discard_penultimate=True),
    "unipc": Sampler(ks.sample_unipc),
}
# the ladder variants AUTOMATIC1111 lists
_VARIANTS = {
    "karras": ["lms", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde",
               "dpmpp_2m_sde_heun", "dpmpp_3m_sde"],
    "exponential": ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"],
}  # fmt: skip

SAMPLERS: dict[str, Sampler] = dict(_BASE)
for _ladder, _names in _VARIANTS.items():
    for _name in _names:
        _b = _BASE[_name]
        SAMPLERS[f"{_name}_{_ladder}"] = Sampler(
            _b.fn, _ladder, _b.options, _b.second_order, _b.warmup_calls, _b.discard_penultimate
        )


def _declared_timesteps(model) -> int | None:
    """The number of training timesteps a model declares, if it declares one."""
    for owner in (model, getattr(model, "config", None)):
        for attr in ("num_train_timesteps", "num_timesteps"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    alphas_cumprod = getattr(model, "alphas_cumprod", None)
    return len(alphas_cumprod) if alphas_cumprod is not None else None


def _steps_for_strength(steps: int, strength: float) -> int:
    """floor(strength * steps), immune to float rounding (0.29 * 100 is 29, not 28)."""
    return min(steps, math.floor(strength * steps + 1e-6))


def sample(
    name: str,
    model,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int = 20,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    prediction: str = "epsilon",
    **options,
) -> torch.Tensor:
    """Sample from `model` with the sampler `name` (a key of SAMPLERS); returns clean latents.

    model(x_t, t) predicts eps (prediction="epsilon") or v (prediction="v") for x_t on the
    variance-preserving scale and t a float tensor (B,) in [0, T-1], T = len(schedule). `noise` is
    standard normal, shaped like the output; the sampler scales it as its method needs (by
    sigma_max for the k-samplers as k-diffusion does, as x_T itself for DDIM/PLMS/DDPM as CompVis
    does). Every random draw comes from `generator`. `callback(d)` runs once per step with
    d = {"x", "i", "sigma", "denoised"} (x and denoised on the sigma scale, x = x_0 + sigma eps);
    `progress` switches the tqdm bar. `options` go to the sampler function (eta, s_noise, order,
    ...). The result is x at the last sigma on the VP scale: the clean sample for the k-samplers,
    and for DDIM/PLMS x at t=0, as the original code returns.

    img2img follows diffusers' convention: `steps` is the length of the full ladder, and
    `strength` in [0, 1] picks how far into it to start: the last floor(strength * steps) steps
    run, from init + sigma * noise at the first of them. So strength=0.6, steps=20 runs 12 steps,
    i.e. 12 model calls for one-call samplers (euler, dpmpp_2m, ddim, ...), 2*12-1 for the
    second-order ones (heun, dpm2, dpm2_a, dpmpp_2s_a, dpmpp_sde), 12+1 for PLMS; in general
    `SAMPLERS[name].model_calls(floor(strength * steps))`. (AUTOMATIC1111 runs one step more.)
    strength=1.0 is txt2img exactly (init is then not used); strength=0 returns init unchanged.
    """
    spec = SAMPLERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if not torch.is_tensor(noise) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating-point tensor shaped (B, ...) like the latents")
    if init is not None and tuple(init.shape) != tuple(noise.shape):
        raise ValueError(
            f"init has shape {tuple(init.shape)} but noise has {tuple(noise.shape)}; they must match"
        )
    if init is None and strength < 1.0:
        raise ValueError(f"strength={strength} needs init= (the latents to start from)")
    declared = _declared_timesteps(model)
    if declared is not None and declared != len(schedule):
        raise ValueError(
            f"the model declares {declared} training timesteps but the schedule has "
            f"{len(schedule)}; build the schedule with num_timesteps={declared}"
        )
    options = {**spec.options, **options}
    accepted = set(inspect.signature(spec.fn).parameters) - {"model", "x", "sigmas"}
    accepted -= {"generator", "callback", "disable"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"sampler {name!r} takes no option {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(accepted)) or 'none'}"
        )

    sigmas = spec.sigmas(schedule, steps)
    if init is None or strength == 1.0:
        sigma_max = sigmas[0].item()
        x = noise * ((1 + sigma_max**2) ** 0.5 if spec.vp else sigma_max)
    else:
        run = _steps_for_strength(steps, strength)
        if run == 0:
            return init.clone()
        sigmas = sigmas[len(sigmas) - 1 - run :]
        x = init.to(noise.dtype) + noise * sigmas[0].item()
    denoiser = Denoiser(model, schedule, prediction)
    x = spec.fn(denoiser, x, sigmas, generator=generator, callback=callback,
                disable=not progress, **options)  # fmt: skip
    return x / (1 + sigmas[-1].item() ** 2) ** 0.5
