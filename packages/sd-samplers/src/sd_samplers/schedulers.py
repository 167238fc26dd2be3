"""Sigma schedules ("schedule types", "schedulers"): any of them with any k-sampler.

A scheduler turns a training `NoiseSchedule` and a step count n into the falling ladder of
sigmas a sampler steps through: n + 1 values, normally ending at 0 (`ddim_uniform` and `kl_optimal`
keep their reference's quirks, see their docstrings). The definitions are AUTOMATIC1111's
(`modules/sd_schedulers.py`, 1.9+), which are k-diffusion's `get_sigmas_*` where k-diffusion has
one. Where ComfyUI's `comfy/samplers.py` differs (kl_optimal, beta, its Align Your Steps node),
the option reference="comfyui" gives ComfyUI's. `SCHEDULERS` maps our name (ComfyUI's where it
has one) to the function, AUTOMATIC1111's label and default options.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sd_samplers.schedule import NoiseSchedule, exponential_sigmas, karras_sigmas

__all__ = [
    "AYS_SIGMAS",
    "AYS_SIGMAS_COMFYUI",
    "REFERENCES",
    "SCHEDULERS",
    "Scheduler",
    "align_your_steps_sigmas",
    "beta_ppf",
    "beta_sigmas",
    "ddim_uniform_sigmas",
    "kl_optimal_sigmas",
    "normal_sigmas",
    "polyexponential_sigmas",
    "scheduler_from_label",
    "scheduler_label",
    "sgm_uniform_sigmas",
    "simple_sigmas",
]

# The 10-step tables NVIDIA published for Align Your Steps (Sabour et al., 2024; the "how to" page),
# as AUTOMATIC1111 ships them: sigma_max and sigma_min of the SD training schedule at the ends.
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
# The same tables to more digits, as ComfyUI's AlignYourStepsScheduler node ships them.
AYS_SIGMAS_COMFYUI = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}  # fmt: skip
REFERENCES = ("a1111", "comfyui")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a sigma ladder needs an integer number of steps >= 1, got {n!r}")


def _check_reference(reference: str) -> None:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")


def _range(schedule: NoiseSchedule, sigma_min, sigma_max) -> tuple[float, float]:
    """The schedule's sigma range, or the caller's override of either end."""
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {lo} and {hi}")
    return lo, hi


# the schedules


def _uniform(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """n sigmas at timesteps evenly spaced from T-1 to 0, then 0: k-diffusion's get_sigmas
    (AUTOMATIC1111's "Uniform", what its k-samplers use by default)."""
    _check_n(n)
    return schedule.get_sigmas(n)


def _karras(schedule: NoiseSchedule, n: int, *, rho=7.0, sigma_min=None, sigma_max=None):
    """Karras et al. (2022) eq. 5, k-diffusion's get_sigmas_karras."""
    _check_n(n)
    return karras_sigmas(n, *_range(schedule, sigma_min, sigma_max), rho)


def _exponential(schedule: NoiseSchedule, n: int, *, sigma_min=None, sigma_max=None):
    """Evenly spaced in log sigma: k-diffusion's get_sigmas_exponential."""
    _check_n(n)
    return exponential_sigmas(n, *_range(schedule, sigma_min, sigma_max))


def polyexponential_sigmas(
    schedule: NoiseSchedule, n: int, *, rho=1.0, sigma_min=None, sigma_max=None
) -> torch.Tensor:
    """log sigma polynomial of degree rho in the step index, k-diffusion's
    get_sigmas_polyexponential: log sigma_i = log sigma_min + (1 - i/(n-1))^rho log(max/min)."""
    _check_n(n)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))


def _timestep_ladder(schedule, n, sigma_min, sigma_max, drop_last) -> torch.Tensor:
    lo, hi = _range(schedule, sigma_min, sigma_max)
    start, end = schedule.sigma_to_t(torch.tensor(hi)), schedule.sigma_to_t(torch.tensor(lo))
    t = torch.linspace(start.item(), end.item(), n + 1 if drop_last else n)
    return _append_zero(schedule.t_to_sigma(t[:-1] if drop_last else t))


def normal_sigmas(schedule: NoiseSchedule, n: int, *, sigma_min=None, sigma_max=None):
    """n sigmas at timesteps evenly spaced from t(sigma_max) to t(sigma_min), then 0
    (AUTOMATIC1111's and ComfyUI's "normal"). For a discrete schedule these are the timesteps
    T-1 ... 0, so it equals `uniform` up to float rounding of the sigma -> t round trip."""
    _check_n(n)
    return _timestep_ladder(schedule, n, sigma_min, sigma_max, drop_last=False)


def sgm_uniform_sigmas(schedule: NoiseSchedule, n: int, *, sigma_min=None, sigma_max=None):
    """As `normal` but with n + 1 evenly spaced timesteps of which the last (t(sigma_min)) is
    dropped, then 0: the spacing of Stability's sgm code (and the usual choice for LCM)."""
    _check_n(n)
    return _timestep_ladder(schedule, n, sigma_min, sigma_max, drop_last=True)


def simple_sigmas(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """Every (T/n)-th training sigma from the top: sigmas[T - 1 - floor(i T / n)], then 0
    (ComfyUI's and AUTOMATIC1111's "simple")."""
    _check_n(n)
    T = schedule.num_timesteps
    index = [T - 1 - int(i * (T / n)) for i in range(n)]
    return _append_zero(schedule.sigmas[index].clone())


def ddim_uniform_sigmas(schedule: NoiseSchedule, n: int) -> torch.Tensor:
    """The training sigmas at t = 1, 1 + s, 1 + 2s, ... < T with s = T // n, high to low, then 0
    (ComfyUI's "ddim_uniform", AUTOMATIC1111's "DDIM"): the original DDIM timesteps. As there,
    when n does not divide T the ladder keeps every such t, so it can have more than n steps
    (T=1000, n=30: 31 steps)."""
    _check_n(n)
    stride = max(schedule.num_timesteps // n, 1)
    index = list(range(1, schedule.num_timesteps, stride))[::-1]
    return _append_zero(schedule.sigmas[index].clone())


def kl_optimal_sigmas(
    schedule: NoiseSchedule, n: int, *, sigma_min=None, sigma_max=None, reference="a1111"
):
    """Sigmas evenly spaced in arctan(sigma) from sigma_max down to sigma_min (Sabour et al.,
    2024). reference="a1111": n + 1 of them and no final 0, so the last step lands on sigma_min
    and the result keeps that little noise; "comfyui": n of them, then 0."""
    _check_n(n)
    _check_reference(reference)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    a_min, a_max = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
    if reference == "a1111":
        frac = torch.arange(n + 1) / n
        return torch.tan(frac * a_min + (1.0 - frac) * a_max)
    frac = torch.arange(n, dtype=torch.float32) / max(n - 1, 1)  # one step: from sigma_max
    return _append_zero(torch.tan(frac * a_min + (1.0 - frac) * a_max))


def _loglinear_interp(values, num: int) -> list[float]:
    """`num` values log-linearly interpolated along a falling sequence (its ends kept)."""
    logs = [math.log(v) for v in values]
    out = []
    for k in range(num):
        pos = k * (len(logs) - 1) / (num - 1) if num > 1 else 0.0
        i = min(int(pos), len(logs) - 2)
        w = pos - i
        out.append(math.exp(logs[i] + w * (logs[i + 1] - logs[i])))
    return out


def align_your_steps_sigmas(
    schedule: NoiseSchedule, n: int, *, model: str = "sd15", reference: str = "a1111"
):
    """Align Your Steps (Sabour et al., 2024): the published 10-step sigmas for `model` ("sd15"
    or "sdxl"; AUTOMATIC1111 picks by the loaded model). reference="a1111": the table
    log-linearly interpolated to n sigmas (the table itself for n = 11), then 0; "comfyui" (its
    AlignYourStepsScheduler node): interpolated to n + 1 values (the table itself for n = 10), the
    last set to 0. The table is fixed in sigma, for SD's training schedule; `schedule` is not
    consulted. One A1111 step starts at the table's sigma_max (its interpolation to one point
    would start it at sigma_min)."""
    _check_n(n)
    _check_reference(reference)
    tables = AYS_SIGMAS if reference == "a1111" else AYS_SIGMAS_COMFYUI
    table = tables.get(model)
    if table is None:
        raise ValueError(f"align_your_steps has tables for {', '.join(tables)}, not {model!r}")
    # np.interp on reversed values, as the references, is the same as interpolating in index
    num = n if reference == "a1111" else n + 1
    values = list(table) if num == len(table) else _loglinear_interp(table, num)
    if reference == "comfyui":
        return torch.tensor([*values[:-1], 0.0], dtype=torch.float64).float()
    return _append_zero(torch.tensor(values, dtype=torch.float64).float())


def _log_beta_fn(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _betainc(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz), on the side of the symmetry I_x(a, b) = 1 - I_(1-x)(b, a) where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(1.0 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta_fn(a, b)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile function of the Beta(a, b) distribution (scipy.stats.beta.ppf), by bisection
    on the regularized incomplete beta function: exact to float64 resolution, no scipy needed."""
    if not (a > 0 and b > 0):
        raise ValueError(f"beta distribution parameters must be positive, got alpha={a}, beta={b}")
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_sigmas(
    schedule: NoiseSchedule, n: int, *, alpha=0.6, beta=0.6, sigma_min=None, sigma_max=None,
    reference="a1111",
):  # fmt: skip
    """Beta sampling (Lee et al., 2024, arXiv:2407.12173), default alpha = beta = 0.6.
    reference="a1111": sigma_min + (sigma_max - sigma_min) ppf(1 - i/(n-1)) for i = 0 .. n-1,
    then 0 (linear in sigma). "comfyui": the quantiles ppf(1 - i/n), i = 0 .. n-1, as timesteps:
    rounded to training timesteps (half to even), repeats dropped (so possibly fewer than n
    steps), their training sigmas, then 0."""
    _check_n(n)
    _check_reference(reference)
    if reference == "comfyui":
        last = schedule.num_timesteps - 1
        ts = [round(beta_ppf(1.0 - i / n, alpha, beta) * last) for i in range(n)]
        ts = [t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
        return _append_zero(schedule.sigmas[ts].clone())
    lo, hi = _range(schedule, sigma_min, sigma_max)
    qs = [1.0 - (i / (n - 1) if n > 1 else 0.0) for i in range(n)]
    values = [lo + beta_ppf(q, alpha, beta) * (hi - lo) for q in qs]
    return _append_zero(torch.tensor(values, dtype=torch.float64).float())


# the registry


@dataclass(frozen=True)
class Scheduler:
    """A registered sigma schedule: `fn(schedule, n, **options)`, AUTOMATIC1111's label for it
    (as its 1.9+ metadata writes "Schedule type: Karras"), its default options (rho, alpha, ...),
    and other names it is known by."""

    fn: Callable
    label: str
    options: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def accepted_options(self) -> set[str]:
        return set(inspect.signature(self.fn).parameters) - {"schedule", "n"}

    def sigmas(self, schedule: NoiseSchedule, n: int, **options) -> torch.Tensor:
        """The ladder for n steps, with `options` over the defaults; unknown options refused."""
        unknown = sorted(set(options) - self.accepted_options())
        if unknown:
            raise ValueError(
                f"schedule type {self.label!r} takes no option {', '.join(unknown)}; "
                f"its options: {', '.join(sorted(self.accepted_options())) or 'none'}"
            )
        options = {**self.options, **options}
        sigmas = self.fn(schedule, n, **options)
        if not bool((sigmas[1:] < sigmas[:-1]).all()):  # a zero-length step divides by zero
            given = ", ".join(f"{k}={v!r}" for k, v in options.items())
            raise ValueError(
                f"schedule type {self.label!r} ({given or 'defaults'}) repeats a sigma at {n} "
                "steps; use fewer steps or other options"
            )
        return sigmas


SCHEDULERS: dict[str, Scheduler] = {
    "uniform": Scheduler(_uniform, "Uniform"),
    "karras": Scheduler(_karras, "Karras", {"rho": 7.0}),
    "exponential": Scheduler(_exponential, "Exponential"),
    "polyexponential": Scheduler(polyexponential_sigmas, "Polyexponential", {"rho": 1.0}),
    "sgm_uniform": Scheduler(sgm_uniform_sigmas, "SGM Uniform", aliases=("SGMUniform",)),
    "kl_optimal": Scheduler(kl_optimal_sigmas, "KL Optimal"),
    "align_your_steps": Scheduler(align_your_steps_sigmas, "Align Your Steps", {"model": "sd15"}),
    "simple": Scheduler(simple_sigmas, "Simple"),
    "normal": Scheduler(normal_sigmas, "Normal"),
    "ddim_uniform": Scheduler(ddim_uniform_sigmas, "DDIM", aliases=("ddim",)),
    "beta": Scheduler(beta_sigmas, "Beta", {"alpha": 0.6, "beta": 0.6}),
}


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


_SCHEDULER_NAMES = {}
for _name, _spec in SCHEDULERS.items():
    for _text in (_name, _spec.label, *_spec.aliases):
        _SCHEDULER_NAMES[_key(_text)] = _name


def scheduler_from_label(label: str | None) -> str | None:
    """Our scheduler name for an AUTOMATIC1111 "Schedule type" label (or our own name, or an alias
    such as A1111's "SGMUniform" and "ddim"); None for "Automatic" or no label (the sampler's own
    ladder). Raises a ValueError naming the known labels otherwise."""
    key = _key(label or "")
    if key in ("", "automatic"):
        return None
    name = _SCHEDULER_NAMES.get(key)
    if name is None:
        raise ValueError(
            f"unknown schedule type {label!r}; AUTOMATIC1111 labels known here: Automatic, "
            f"{', '.join(spec.label for spec in SCHEDULERS.values())}"
        )
    return name


def scheduler_label(name: str | None) -> str:
    """AUTOMATIC1111's label for one of our scheduler names ("Automatic" for None)."""
    if name is None:
        return "Automatic"
    spec = SCHEDULERS.get(name)
    if spec is None:
        raise ValueError(f"unknown scheduler {name!r}; choose from: {', '.join(SCHEDULERS)}")
    return spec.label
