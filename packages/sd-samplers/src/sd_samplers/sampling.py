"""`sample()`: pick a sampler by its AUTOMATIC1111 name, build its sigma ladder, run it."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sd_samplers import k_samplers as ks
from sd_samplers import newer_samplers as nk
from sd_samplers.denoiser import Denoiser, LCMDenoiser, lcm_schedule
from sd_samplers.schedule import NoiseSchedule
from sd_samplers.schedulers import SCHEDULERS, Scheduler, scheduler_from_label

__all__ = [
    "SAMPLERS",
    "Sampler",
    "parse_sampler",
    "sample",
    "sampler_from_label",
    "sampler_label",
    "split_sampler",
    "steps_for_strength",
]

NOISE_KINDS = ("gaussian", "brownian")
# AUTOMATIC1111's names for the ladders, as it appends them to a label ("DPM++ 2M Karras") and
# as its 1.9+ metadata writes them apart ("Sampler: DPM++ 2M, Schedule type: Karras").
LADDER_LABELS = {"karras": "Karras", "exponential": "Exponential"}


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its function, the sigma ladder it runs on, and what callers need to
    know about it without reading its code.

    ladder: its own sigma ladder, used when `sample` is given no scheduler: a key of SCHEDULERS
    ("uniform" is k-diffusion's get_sigmas, "karras" rho 7, ...), or "compvis" (the original
    DDIM/PLMS timesteps, ending at alpha_bar_0) or "ddpm" (the same, ending at 0); the CompVis
    ones take no other scheduler. discard_penultimate: build steps + 1 sigmas and drop the
    next-to-last, as AUTOMATIC1111 does for DPM2, DPM2 a and DPM++ 3M SDE. second_order: two
    model calls per step (one for a last step to sigma 0). warmup_calls: extra calls once (PLMS'
    first Heun step). label: AUTOMATIC1111's name for it ("DPM++ 2M Karras"). noise: the kind of
    noise source it takes as ``noise_sampler`` ("gaussian": fresh draws, GaussianNoise;
    "brownian": increments of one Brownian path, BrownianTreeNoise), None if it takes none.
    noise_options: options that make it draw noise when set (DDIM's eta, the churn of Euler/Heun,
    Restart's restart_list). noise_min_steps: the fewest steps at which a sampler with a noise
    source draws from it (Restart adds its restarts from 20 steps). own_steps: it chooses its own
    steps between the ladder's ends (DPM fast, DPM adaptive, Restart), so its callbacks are not one
    per ladder step. stops_at_sigma_min: it ends at the ladder's smallest positive sigma, not at
    its last (DPM fast and adaptive, as k-diffusion's); `sample` gives it the schedule's
    sigma_min in place of a final 0, so it runs from the ladder's top to there. adaptive: the number of model calls
    depends on the model (DPM adaptive). needs_uncond: it calls
    ``model(x_t, t, with_uncond=True)`` and needs (guided, unconditional) predictions back (the
    CFG++ samplers). cfg_scale_multiplier: what a caller applying
    classifier-free guidance multiplies the user's guidance scale by (AUTOMATIC1111 maps CFG 12.5
    to CFG++'s lambda = 1 for DDIM CFG++). denoiser: "standard" (`Denoiser`) or "lcm"
    (`LCMDenoiser`: the model runs on the 50 LCM timesteps, whose schedule the ladders are then
    built on, as AUTOMATIC1111's and ComfyUI's LCM).
    """

    fn: Callable
    ladder: str = "uniform"
    options: dict = field(default_factory=dict)
    second_order: bool = False
    warmup_calls: int = 0
    discard_penultimate: bool = False
    label: str = ""
    noise: str | None = None
    noise_options: tuple[str, ...] = ()
    noise_min_steps: int = 0
    own_steps: bool = False
    stops_at_sigma_min: bool = False
    adaptive: bool = False
    needs_uncond: bool = False
    cfg_scale_multiplier: float = 1.0
    denoiser: str = "standard"

    def __post_init__(self):
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS} or None, got {self.noise!r}")
        if self.ladder not in (*SCHEDULERS, "compvis", "ddpm"):
            raise ValueError(f"unknown ladder {self.ladder!r}")
        if self.denoiser not in ("standard", "lcm"):
            raise ValueError(f"denoiser must be 'standard' or 'lcm', got {self.denoiser!r}")

    @property
    def vp(self) -> bool:
        """True for the CompVis samplers, which start from x_T = noise on the VP scale."""
        return self.ladder in ("compvis", "ddpm")

    @property
    def takes_scheduler(self) -> bool:
        """Whether `sample(..., scheduler=)` may replace its ladder (not for the CompVis ones)."""
        return not self.vp

    def draws_noise(self, options: dict | None = None, steps: int | None = None) -> bool:
        """Whether a run with these options (and this many steps, if given) draws random numbers,
        so depends on the seed."""
        options = {**self.options, **(options or {})}
        if any(_is_set(options.get(name)) for name in self.noise_options):
            return True
        if self.noise is not None or self.ladder == "ddpm":
            return steps is None or steps >= self.noise_min_steps
        return False

    def accepted_options(self) -> set[str]:
        """The options its function takes (beyond what `sample` itself passes)."""
        accepted = set(inspect.signature(self.fn).parameters) - {"model", "x", "sigmas"}
        return accepted - {"generator", "callback", "disable"}

    def sigmas(
        self, schedule: NoiseSchedule, steps: int, scheduler: str | None = None, **options
    ) -> torch.Tensor:
        """The sigmas this sampler steps through for `steps` steps: its own ladder, or the
        scheduler's (a key of SCHEDULERS) with `options` (rho, alpha, model, ...) for it.
        steps + 1 values, except for the schedulers that differ (ddim_uniform may add a step)."""
        n = steps + 1 if self.discard_penultimate else steps
        name = self.ladder if scheduler is None else scheduler
        if self.denoiser == "lcm":
            schedule = lcm_schedule(schedule)
        if name in ("compvis", "ddpm"):
            sigmas = schedule.compvis_sigmas(n, "alpha_0" if name == "compvis" else "zero")
        else:
            sigmas = _scheduler(name).sigmas(schedule, n, **options)
        if self.discard_penultimate:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def final_sigma(self, sigmas: torch.Tensor) -> float:
        """The sigma its result is at, for the ladder `sigmas` it was given."""
        if self.stops_at_sigma_min:
            return sigmas[sigmas > 0].min().item()
        return sigmas[-1].item()

    def make_denoiser(self, model, schedule: NoiseSchedule, prediction: str = "epsilon"):
        """The denoiser `sample` wraps the model in for this sampler."""
        if self.denoiser == "lcm":
            return LCMDenoiser(model, schedule, prediction)
        return Denoiser(model, schedule, prediction)

    def model_calls(self, steps: int) -> int | None:
        """How many times the model runs for `steps` steps (ladders ending at sigma 0); None
        when it depends on the model (adaptive step size)."""
        if self.adaptive:
            return None
        return (2 * steps - 1 if self.second_order else steps) + self.warmup_calls


def _is_set(value) -> bool:
    if isinstance(value, (int, float)):
        return value > 0
    return bool(value)


def _scheduler(name) -> Scheduler:
    spec = SCHEDULERS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown scheduler {name!r}; choose from: {', '.join(SCHEDULERS)}")
    return spec


_CHURN = ("s_churn",)
_BASE = {
    "ddpm": Sampler(ks.sample_ddpm, ladder="ddpm", label="DDPM"),
    "ddim": Sampler(ks.sample_ddim, ladder="compvis", label="DDIM", noise_options=("eta",)),
    "plms": Sampler(ks.sample_plms, ladder="compvis", warmup_calls=1, label="PLMS"),
    "euler": Sampler(ks.sample_euler, label="Euler", noise_options=_CHURN),
    "euler_a": Sampler(ks.sample_euler_ancestral, label="Euler a", noise="gaussian"),
    "heun": Sampler(ks.sample_heun, second_order=True, label="Heun", noise_options=_CHURN),
    "lms": Sampler(ks.sample_lms, label="LMS"),
    "dpm2": Sampler(ks.sample_dpm_2, second_order=True, discard_penultimate=True, label="DPM2",
                    noise_options=_CHURN),
    "dpm2_a": Sampler(ks.sample_dpm_2_ancestral, second_order=True, discard_penultimate=True,
                      label="DPM2 a", noise="gaussian"),
    "dpmpp_2s_a": Sampler(ks.sample_dpmpp_2s_ancestral, second_order=True, label="DPM++ 2S a",
                          noise="gaussian"),
    "dpmpp_2m": Sampler(ks.sample_dpmpp_2m, label="DPM++ 2M"),
    "dpmpp_sde": Sampler(ks.sample_dpmpp_sde, second_order=True, label="DPM++ SDE",
                         noise="brownian"),
    "dpmpp_2m_sde": Sampler(ks.sample_dpmpp_2m_sde, label="DPM++ 2M SDE", noise="brownian"),
    "dpmpp_2m_sde_heun": Sampler(ks.sample_dpmpp_2m_sde, options={"solver_type": "heun"},
                                 label="DPM++ 2M SDE Heun", noise="brownian"),
    "dpmpp_3m_sde": Sampler(ks.sample_dpmpp_3m_sde, discard_penultimate=True,
                            label="DPM++ 3M SDE", noise="brownian"),
    "unipc": Sampler(ks.sample_unipc, label="UniPC"),
    # AUTOMATIC1111 passes its "Eta for ancestral samplers" (1.0) to every function taking eta,
    # so its DPM fast and DPM adaptive are ancestral; k-diffusion's own default is eta=0.
    "dpm_fast": Sampler(nk.sample_dpm_fast, options={"eta": 1.0}, label="DPM fast",
                        noise="gaussian", own_steps=True, stops_at_sigma_min=True),
    "dpm_adaptive": Sampler(nk.sample_dpm_adaptive, options={"eta": 1.0}, label="DPM adaptive",
                            noise="gaussian", own_steps=True, stops_at_sigma_min=True,
                            adaptive=True),
    "restart": Sampler(nk.sample_restart, ladder="karras", second_order=True, label="Restart",
                       noise="gaussian", noise_options=("restart_list",), noise_min_steps=20,
                       own_steps=True),
    "lcm": Sampler(nk.sample_lcm, label="LCM", noise="gaussian", denoiser="lcm"),
    "euler_cfg_pp": Sampler(nk.sample_euler_cfg_pp, label="Euler CFG++", needs_uncond=True),
    "euler_a_cfg_pp": Sampler(nk.sample_euler_ancestral_cfg_pp, label="Euler a CFG++",
                              noise="gaussian", needs_uncond=True),
    "ddim_cfg_pp": Sampler(nk.sample_ddim_cfg_pp, ladder="compvis", label="DDIM CFG++",
                           noise_options=("eta",), needs_uncond=True,
                           cfg_scale_multiplier=1 / 12.5),
    "ipndm": Sampler(nk.sample_ipndm, label="iPNDM"),
}  # fmt: skip
# the ladder variants AUTOMATIC1111 lists
_VARIANTS = {
    "karras": ["lms", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde",
               "dpmpp_2m_sde_heun", "dpmpp_3m_sde"],
    "exponential": ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"],
}  # fmt: skip

SAMPLERS: dict[str, Sampler] = dict(_BASE)
_SPLIT: dict[str, tuple[str, str | None]] = {name: (name, None) for name in _BASE}
for _ladder, _names in _VARIANTS.items():
    for _name in _names:
        _b = _BASE[_name]
        SAMPLERS[f"{_name}_{_ladder}"] = dataclasses.replace(
            _b, ladder=_ladder, label=f"{_b.label} {LADDER_LABELS[_ladder]}"
        )
        _SPLIT[f"{_name}_{_ladder}"] = (_name, _ladder)
_BY_LABEL = {spec.label.lower(): name for name, spec in SAMPLERS.items()}


def sampler_label(name: str) -> str:
    """AUTOMATIC1111's label for one of our sampler names: ``dpmpp_2m_karras`` -> ``DPM++ 2M
    Karras``."""
    spec = SAMPLERS.get(name)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")
    return spec.label


def sampler_from_label(label: str, schedule_type: str | None = None) -> str:
    """Our sampler name for an AUTOMATIC1111 label, written either way it writes them: the
    ladder in the label (``DPM++ 2M Karras``, before 1.9) or apart (``DPM++ 2M`` with
    ``Schedule type: Karras``, 1.9 and later; ``Automatic`` means the sampler's own). Our own
    names are accepted too. Raises a ValueError naming the label when nothing matches.
    """
    text = " ".join(label.split())
    name = _BY_LABEL.get(text.lower()) or (text if text in SAMPLERS else None)
    if name is None:
        raise ValueError(
            f"unknown sampler {label!r}; AUTOMATIC1111 labels known here: "
            f"{', '.join(spec.label for spec in SAMPLERS.values())}"
        )
    kind = " ".join((schedule_type or "").split()).lower()
    if kind in ("", "automatic") or SAMPLERS[name].ladder != "uniform":
        return name
    ladder = {v.lower(): k for k, v in LADDER_LABELS.items()}.get(kind)
    if kind == "uniform" or (ladder is None and kind == "normal"):
        return name
    variant = f"{name}_{ladder}" if ladder else None
    if variant not in SAMPLERS:
        offered = [v for k, v in LADDER_LABELS.items() if f"{name}_{k}" in SAMPLERS]
        raise ValueError(
            f"sampler {SAMPLERS[name].label!r} with schedule type {schedule_type!r} has no "
            f"sampler name of its own (those: {', '.join(['Automatic', *offered])}); "
            "parse_sampler(label, schedule_type) gives the (sampler, scheduler) pair for "
            "sample(..., scheduler=)"
        )
    return variant


def split_sampler(name: str) -> tuple[str, str | None]:
    """A sampler name as (base sampler, scheduler): ``dpmpp_2m_karras`` -> ``("dpmpp_2m",
    "karras")``, ``euler`` -> ``("euler", None)`` (None: the sampler's own ladder). The pair runs
    the same sigmas as the name, and is what AUTOMATIC1111 1.9+ writes apart as "Sampler" and
    "Schedule type" (`sampler_label(base)`, `scheduler_label(scheduler)`)."""
    if name not in _SPLIT:
        raise ValueError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")
    return _SPLIT[name]


def parse_sampler(label: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(sampler, scheduler) for an AUTOMATIC1111 label and its 1.9+ "Schedule type", any
    combination: ``("Euler", "Karras")`` -> ``("euler", "karras")``, ``("DPM++ 2M Karras", None)``
    -> ``("dpmpp_2m", "karras")``, ``("Euler a", "Automatic")`` -> ``("euler_a", None)``. The
    sampler is always a base name (no ``_karras`` suffix); the scheduler a key of SCHEDULERS, or
    None for the sampler's own ladder (also when the schedule type names that ladder). A schedule
    type wins over a ladder in the label; for DDIM, PLMS and the other CompVis-timestep samplers
    it is ignored, as AUTOMATIC1111 ignores it. Our own names are accepted for both. Raises a
    ValueError naming what is unknown."""
    base, scheduler = split_sampler(sampler_from_label(label))
    kind = scheduler_from_label(schedule_type)
    spec = SAMPLERS[base]
    if not spec.takes_scheduler:
        return base, None
    if kind is not None:
        scheduler = kind
    return base, None if scheduler == spec.ladder else scheduler


def _declared_timesteps(model) -> int | None:
    """The number of training timesteps a model declares, if it declares one."""
    for owner in (model, getattr(model, "config", None)):
        for attr in ("num_train_timesteps", "num_timesteps"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    alphas_cumprod = getattr(model, "alphas_cumprod", None)
    return len(alphas_cumprod) if alphas_cumprod is not None else None


def _takes_with_uncond(model) -> bool:
    """Whether model(x_t, t, with_uncond=True) can be called (True when it cannot be told)."""
    try:
        params = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "with_uncond" or p.kind is p.VAR_KEYWORD for p in params)


def steps_for_strength(steps: int, strength: float) -> int:
    """How many steps img2img at ``strength`` runs of a ``steps``-step ladder: floor(strength *
    steps), immune to float rounding (0.29 * 100 is 29, not 28)."""
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
    scheduler: str | None = None,
    scheduler_options: dict | None = None,
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
    and for DDIM/PLMS x at t=0, as the original code returns (DPM fast/adaptive and a kl_optimal
    ladder stop at sigma_min: x there, `SAMPLERS[name].final_sigma(sigmas)`).

    img2img follows diffusers' convention: `steps` is the length of the full ladder, and
    `strength` in [0, 1] picks how far into it to start: the last floor(strength * steps) steps
    run, from init + sigma * noise at the first of them. So strength=0.6, steps=20 runs 12 steps,
    i.e. 12 model calls for one-call samplers (euler, dpmpp_2m, ddim, ...), 2*12-1 for the
    second-order ones (heun, dpm2, dpm2_a, dpmpp_2s_a, dpmpp_sde), 12+1 for PLMS; in general
    `SAMPLERS[name].model_calls(floor(strength * steps))`. (AUTOMATIC1111 runs one step more.)
    strength=1.0 is txt2img exactly (init is then not used); strength=0 returns init unchanged.

    scheduler: a key of SCHEDULERS ("karras", "exponential", "sgm_uniform", "beta", ...) to run
    this sampler on that sigma ladder, AUTOMATIC1111 1.9+'s "Schedule type" (None: the sampler's
    own; not for the CompVis-timestep samplers ddim, plms, ddpm, ddim_cfg_pp).
    `scheduler_options` go to it (rho, sigma_min/sigma_max, Beta's alpha and beta, Align Your
    Steps' model="sdxl"). A sampler with `needs_uncond` (CFG++) calls
    ``model(x_t, t, with_uncond=True)``, which must return (guided, unconditional) predictions.
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
    if scheduler is not None:
        _scheduler(scheduler)
        if not spec.takes_scheduler:
            raise ValueError(
                f"sampler {name!r} runs on the original CompVis timesteps and takes no "
                f"scheduler (AUTOMATIC1111 ignores the schedule type for it); got {scheduler!r}"
            )
    if spec.needs_uncond and not _takes_with_uncond(model):
        raise ValueError(
            f"sampler {name!r} (CFG++) needs the unconditional prediction too: the model must "
            "accept model(x_t, t, with_uncond=True) and return (guided, unconditional)"
        )
    options = {**spec.options, **options}
    accepted = spec.accepted_options()
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"sampler {name!r} takes no option {', '.join(unknown)}; "
            f"its options: {', '.join(sorted(accepted)) or 'none'}"
        )

    sigmas = spec.sigmas(schedule, steps, scheduler, **(scheduler_options or {}))
    steps = len(sigmas) - 1  # ddim_uniform can add one
    if init is None or strength == 1.0:
        sigma_max = sigmas[0].item()
        x = noise * ((1 + sigma_max**2) ** 0.5 if spec.vp else sigma_max)
    else:
        run = steps_for_strength(steps, strength)
        if run == 0:
            return init.clone()
        sigmas = sigmas[len(sigmas) - 1 - run :]
        x = init.to(noise.dtype) + noise * sigmas[0].item()
    if spec.stops_at_sigma_min and sigmas[-1].item() == 0:
        # DPM fast/adaptive integrate from the ladder's top to the schedule's sigma_min, as
        # AUTOMATIC1111 passes them (a ladder of one step then still runs it)
        sigmas = torch.cat([sigmas[:-1], sigmas.new_tensor([schedule.sigma_min])])
    denoiser = spec.make_denoiser(model, schedule, prediction)
    x = spec.fn(denoiser, x, sigmas, generator=generator, callback=callback,
                disable=not progress, **options)  # fmt: skip
    return x / (1 + spec.final_sigma(sigmas) ** 2) ** 0.5
