"""Each scheduler against its reference definition, written out plainly here (AUTOMATIC1111's
modules/sd_schedulers.py), and against k-diffusion's get_sigmas_* where it has one.

The A1111 definitions that need "the inner model" run here on k-diffusion's own CompVisDenoiser
(what A1111 passes them), so sigma_to_t / t_to_sigma / .sigmas are the reference's too.
"""

import math

import numpy as np
import pytest
import torch
from _refs import ToyEps, load_k_diffusion

from sd_samplers import SCHEDULERS, NoiseSchedule, scheduler_from_label, scheduler_label
from sd_samplers.schedulers import beta_ppf

SCHEDULE = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
STEPS = (1, 2, 7, 10, 11, 20, 30, 50)
# AUTOMATIC1111's labels (modules/sd_schedulers.py), typed here
A1111 = {
    "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal",
    "ddim_uniform": "DDIM", "beta": "Beta",
}  # fmt: skip


class _CompVisModel(torch.nn.Module):
    def __init__(self, schedule):
        super().__init__()
        self.eps, self.alphas_cumprod = ToyEps(), schedule.alphas_cumprod

    def apply_model(self, x, t):
        return self.eps(x, t)


@pytest.fixture(scope="module")
def kd():
    sampling, external = load_k_diffusion()
    return sampling, external.CompVisDenoiser(_CompVisModel(SCHEDULE))


def _close(ours, ref, rtol=1e-6):
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float64)).float()
    assert ours.shape == ref.shape, (ours.tolist(), ref.tolist())
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=1e-7)


def test_labels_and_names():
    assert {name: spec.label for name, spec in SCHEDULERS.items()} == A1111
    for name, label in A1111.items():
        assert scheduler_from_label(label) == name and scheduler_label(name) == label
        assert scheduler_from_label(label.upper()) == name and scheduler_from_label(name) == name
    assert scheduler_from_label("Automatic") is None and scheduler_from_label(None) is None
    assert scheduler_label(None) == "Automatic"
    assert scheduler_from_label("SGMUniform") == "sgm_uniform"  # A1111's alias
    with pytest.raises(ValueError, match=r"unknown schedule type 'Karas'.*Automatic, Uniform"):
        scheduler_from_label("Karas")


@pytest.mark.parametrize("n", STEPS)
def test_k_diffusion_schedules(kd, n):
    sampling, wrapped = kd
    lo, hi = wrapped.sigma_min.item(), wrapped.sigma_max.item()
    assert torch.equal(SCHEDULERS["uniform"].sigmas(SCHEDULE, n), wrapped.get_sigmas(n))
    _close(SCHEDULERS["karras"].sigmas(SCHEDULE, n), sampling.get_sigmas_karras(n, lo, hi))
    _close(SCHEDULERS["karras"].sigmas(SCHEDULE, n, rho=3.0),
           sampling.get_sigmas_karras(n, lo, hi, rho=3.0))  # fmt: skip
    _close(
        SCHEDULERS["exponential"].sigmas(SCHEDULE, n), sampling.get_sigmas_exponential(n, lo, hi)
    )
    for rho in (1.0, 2.5):
        _close(SCHEDULERS["polyexponential"].sigmas(SCHEDULE, n, rho=rho),
               sampling.get_sigmas_polyexponential(n, lo, hi, rho=rho))  # fmt: skip


@pytest.mark.parametrize("n", STEPS)
def test_plain_formulas(n):
    lo, hi = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    ramp = np.linspace(0, 1, n)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    _close(SCHEDULERS["karras"].sigmas(SCHEDULE, n), [*karras, 0.0])
    _close(SCHEDULERS["exponential"].sigmas(SCHEDULE, n), [*np.geomspace(hi, lo, n), 0.0])
    poly = np.exp(np.linspace(1, 0, n) ** 2 * math.log(hi / lo) + math.log(lo))
    _close(SCHEDULERS["polyexponential"].sigmas(SCHEDULE, n, rho=2.0), [*poly, 0.0])
    # KL optimal: n + 1 points evenly spaced in arctan sigma, no final 0 (A1111)
    i = np.arange(n + 1) / n
    _close(SCHEDULERS["kl_optimal"].sigmas(SCHEDULE, n),
           np.tan(i * np.arctan(lo) + (1 - i) * np.arctan(hi)), rtol=2e-6)  # fmt: skip


@pytest.mark.parametrize("n", STEPS)
def test_inner_model_schedules_are_a1111s(kd, n):
    _, inner = kd
    # A1111 normal_scheduler / sgm_uniform: timesteps from sigma_to_t(sigma_max) to
    # sigma_to_t(sigma_min), n of them (sgm: n + 1, the last dropped), t_to_sigma, then 0
    start = inner.sigma_to_t(torch.tensor(inner.sigma_max.item()))
    end = inner.sigma_to_t(torch.tensor(inner.sigma_min.item()))
    normal = [inner.t_to_sigma(t).item() for t in torch.linspace(start, end, n)] + [0.0]
    _close(SCHEDULERS["normal"].sigmas(SCHEDULE, n), normal)
    sgm = [inner.t_to_sigma(t).item() for t in torch.linspace(start, end, n + 1)[:-1]] + [0.0]
    _close(SCHEDULERS["sgm_uniform"].sigmas(SCHEDULE, n), sgm)
    # A1111 simple_scheduler: sigmas[-(1 + int(x * len / n))] for x < n, then 0
    ss = len(inner.sigmas) / n
    simple = [float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0]
    _close(SCHEDULERS["simple"].sigmas(SCHEDULE, n), simple, rtol=0)
    # A1111 ddim_scheduler: sigmas[1], sigmas[1 + ss], ... while < len, reversed, then 0
    ss, x, ddim = max(len(inner.sigmas) // n, 1), 1, []
    while x < len(inner.sigmas):
        ddim.append(float(inner.sigmas[x]))
        x += ss
    _close(SCHEDULERS["ddim_uniform"].sigmas(SCHEDULE, n), [*ddim[::-1], 0.0], rtol=0)


def test_ddim_uniform_keeps_the_extra_step_as_the_references():
    assert len(SCHEDULERS["ddim_uniform"].sigmas(SCHEDULE, 30)) == 32  # 31 steps for 30
    assert len(SCHEDULERS["ddim_uniform"].sigmas(SCHEDULE, 20)) == 21


# NVIDIA's published 10-step tables (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto)
AYS = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


@pytest.mark.parametrize("model", list(AYS))
@pytest.mark.parametrize("n", STEPS)
def test_align_your_steps(model, n):
    """The table itself for 11 steps (as A1111), else its log-linear interpolation to n values
    (NVIDIA's loglinear_interp: np.interp of the reversed log sigmas), then 0."""
    table = AYS[model]
    if n == 1:  # np.linspace(0, 1, 1) is [0], which would start A1111's one step at sigma_min
        return _close(SCHEDULERS["align_your_steps"].sigmas(SCHEDULE, 1, model=model), [14.615, 0])
    if n == len(table):
        expected = table
    else:
        xs, new_xs = np.linspace(0, 1, len(table)), np.linspace(0, 1, n)
        expected = np.exp(np.interp(new_xs, xs, np.log(table[::-1])))[::-1]
    _close(SCHEDULERS["align_your_steps"].sigmas(SCHEDULE, n, model=model), [*expected, 0.0])


@pytest.mark.parametrize(("alpha", "beta"), [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (1.0, 1.0)])
@pytest.mark.parametrize("n", STEPS)
def test_beta(alpha, beta, n):
    """A1111's beta_scheduler: sigma_min + ppf(1 - linspace(0, 1, n)) (sigma_max - sigma_min), 0;
    the Beta quantiles from scipy."""
    stats = pytest.importorskip("scipy.stats")
    lo, hi = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    ts = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
    expected = [lo + t * (hi - lo) for t in ts] + [0.0]
    _close(SCHEDULERS["beta"].sigmas(SCHEDULE, n, alpha=alpha, beta=beta), expected)


def test_beta_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (0.3, 2.0), (5.0, 1.5), (1.0, 1.0)]:
        for q in (1e-9, 0.01, 0.25, 0.5, 0.77, 0.999, 1 - 1e-9):
            assert beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-9, abs=1e-12)
    assert beta_ppf(0.0, 0.6, 0.6) == 0.0 and beta_ppf(1.0, 0.6, 0.6) == 1.0


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_ladders_fall(name):
    for n in STEPS:
        sigmas = SCHEDULERS[name].sigmas(SCHEDULE, n)
        assert (sigmas[1:] < sigmas[:-1]).all(), (name, n, sigmas)
        assert len(sigmas) == n + 1 or name == "ddim_uniform"
        assert sigmas[-1] == 0 or name == "kl_optimal"


def test_sigma_range_overrides():
    s = SCHEDULERS["karras"].sigmas(SCHEDULE, 5, sigma_min=0.1, sigma_max=10.0)
    assert s[0].item() == pytest.approx(10.0) and s[-2].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="need 0 < sigma_min <= sigma_max"):
        SCHEDULERS["exponential"].sigmas(SCHEDULE, 5, sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="'Simple' takes no option rho; its options: none"):
        SCHEDULERS["simple"].sigmas(SCHEDULE, 5, rho=2.0)
    with pytest.raises(ValueError, match="integer number of steps >= 1, got 0"):
        SCHEDULERS["beta"].sigmas(SCHEDULE, 0)
    # Beta(0.1, 0.1)'s quantiles reach 1.0 in float64 well before the end: repeated sigmas
    with pytest.raises(ValueError, match=r"'Beta' \(alpha=0.1, beta=0.1\) repeats a sigma"):
        SCHEDULERS["beta"].sigmas(SCHEDULE, 1000, alpha=0.1, beta=0.1)


# reference="comfyui": ComfyUI's comfy/samplers.py and its AlignYourStepsScheduler node

AYS_COMFYUI = {
    "sd15": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
}  # fmt: skip


@pytest.mark.parametrize("n", [s for s in STEPS if s > 1])
def test_comfyui_kl_optimal(n):
    """kl_optimal_scheduler: n points arange(n) / (n - 1) in arctan sigma, then 0."""
    lo, hi = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    adj = np.arange(n) / (n - 1)
    expected = [*np.tan(adj * math.atan(lo) + (1 - adj) * math.atan(hi)), 0.0]
    _close(SCHEDULERS["kl_optimal"].sigmas(SCHEDULE, n, reference="comfyui"), expected, rtol=2e-6)


@pytest.mark.parametrize("model", list(AYS_COMFYUI))
@pytest.mark.parametrize("n", STEPS)
def test_comfyui_align_your_steps(model, n):
    """The node: the table when steps + 1 == 11, else loglinear_interp(table, steps + 1); the last
    value set to 0."""
    table = AYS_COMFYUI[model]
    if n + 1 == len(table):
        expected = list(table)
    else:
        xs, new_xs = np.linspace(0, 1, len(table)), np.linspace(0, 1, n + 1)
        expected = list(np.exp(np.interp(new_xs, xs, np.log(table[::-1])))[::-1])
    expected[-1] = 0.0
    ours = SCHEDULERS["align_your_steps"].sigmas(SCHEDULE, n, model=model, reference="comfyui")
    _close(ours, expected)


@pytest.mark.parametrize(("alpha", "beta"), [(0.6, 0.6), (0.5, 0.7)])
@pytest.mark.parametrize("n", STEPS)
def test_comfyui_beta(kd, alpha, beta, n):
    """beta_scheduler: ts = rint(ppf(1 - linspace(0, 1, n, endpoint=False)) * (T - 1)), repeats
    dropped, model_sampling.sigmas[t], then 0."""
    stats = pytest.importorskip("scipy.stats")
    _, inner = kd
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta) * 999)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(inner.sigmas[int(t)]))
        last = t
    ours = SCHEDULERS["beta"].sigmas(SCHEDULE, n, alpha=alpha, beta=beta, reference="comfyui")
    _close(ours, [*sigs, 0.0], rtol=0)


def test_reference_is_checked():
    with pytest.raises(ValueError, match="reference must be one of a1111, comfyui, got 'forge'"):
        SCHEDULERS["beta"].sigmas(SCHEDULE, 5, reference="forge")
