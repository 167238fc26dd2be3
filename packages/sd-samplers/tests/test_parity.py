"""Parity with the reference implementations on the same model, schedule, noise and sigmas.

k-diffusion (CompVisDenoiser) for the k-samplers, with our noise fed to its `noise_sampler` for
the stochastic ones; diffusers' DDIM/PNDM/DDPM schedulers configured as the original CompVis code
for ddim/plms/ddpm, and its UniPC scheduler run on our ladder for unipc.
"""

import math

import pytest
import torch
from _refs import ToyEps, load_k_diffusion

from sd_samplers import SAMPLERS, NoiseSchedule, sample

SHAPE = (2, 4, 6, 6)
STEPS = 12
# our name (without ladder suffix) -> k-diffusion function
K_FUNCTIONS = {
    "euler": "sample_euler",
    "euler_a": "sample_euler_ancestral",
    "heun": "sample_heun",
    "lms": "sample_lms",
    "dpm2": "sample_dpm_2",
    "dpm2_a": "sample_dpm_2_ancestral",
    "dpmpp_2s_a": "sample_dpmpp_2s_ancestral",
    "dpmpp_2m": "sample_dpmpp_2m",
    "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_2m_sde_heun": "sample_dpmpp_2m_sde",
    "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
}
ANCESTRAL = {"euler_a", "dpm2_a", "dpmpp_2s_a"}
BROWNIAN = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}


def _base(name):
    for suffix in ("_karras", "_exponential"):
        name = name.removesuffix(suffix)
    return name


K_NAMES = [n for n in SAMPLERS if _base(n) in K_FUNCTIONS]


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


class _RoundedKeyNoise:
    """Noise that depends only on the queried interval, to 6 significant digits of log sigma.

    A Brownian path is rough: moving a query point by one float32 ulp (our sigmas are Python
    floats, k-diffusion's float32 tensors) changes the increment by ~1e-4. To compare the SDE
    solvers' arithmetic, both sides get this noise instead (the Brownian tree itself is tested in
    test_noise.py).
    """

    def __init__(self, seed):
        self.seed = seed

    def __call__(self, sigma, sigma_next):
        key = (round(math.log(float(sigma)), 5), round(math.log(float(sigma_next)), 5))
        g = torch.Generator().manual_seed(hash((self.seed, *key)) % 2**62)
        return torch.randn(SHAPE, generator=g)


def _report(name, ours, ref):
    err = (ours - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    print(f"PARITY {name}: max abs {err:.2e}, rel {rel:.2e}")
    return err, rel


class _CompVisModel(torch.nn.Module):
    """What CompVisDenoiser wraps: a LatentDiffusion-like object with apply_model."""

    def __init__(self, eps, schedule):
        super().__init__()
        self.eps, self.alphas_cumprod = eps, schedule.alphas_cumprod

    def apply_model(self, x, t):
        return self.eps(x, t)


@pytest.fixture(scope="module")
def kdiff():
    return load_k_diffusion()


def test_k_diffusion_ladders_match(kdiff):
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    wrapped = external.CompVisDenoiser(_CompVisModel(ToyEps(), schedule))
    for n in (1, 7, 20, 50):
        assert torch.equal(schedule.get_sigmas(n), wrapped.get_sigmas(n))
        ref = sampling.get_sigmas_karras(n, wrapped.sigma_min.item(), wrapped.sigma_max.item())
        torch.testing.assert_close(schedule.karras(n), ref, rtol=1e-6, atol=0)
        ref = sampling.get_sigmas_exponential(n, wrapped.sigma_min.item(), wrapped.sigma_max.item())
        torch.testing.assert_close(schedule.exponential(n), ref, rtol=1e-6, atol=0)
    t = torch.tensor([0.0, 0.25, 17.5, 500.3, 998.9, 999.0])
    torch.testing.assert_close(schedule.t_to_sigma(t), wrapped.t_to_sigma(t), rtol=1e-6, atol=0)
    sigmas = wrapped.t_to_sigma(t)
    torch.testing.assert_close(schedule.sigma_to_t(sigmas), wrapped.sigma_to_t(sigmas))


@pytest.mark.parametrize("name", K_NAMES)
def test_k_sampler_matches_k_diffusion(kdiff, name):
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps = ToyEps()
    spec = SAMPLERS[name]
    noise = _noise()
    options = {"noise_sampler": _RoundedKeyNoise(7)} if _base(name) in BROWNIAN else {}
    g = torch.Generator().manual_seed(5)
    ours = sample(name, eps, noise, schedule, STEPS, generator=g, progress=False, **options)

    denoiser = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    sigmas = spec.sigmas(schedule, STEPS)
    x = noise * sigmas[0]
    kwargs = dict(spec.options)
    g = torch.Generator().manual_seed(5)
    if _base(name) in ANCESTRAL:
        kwargs["noise_sampler"] = lambda s, s_next: torch.randn(SHAPE, generator=g)
    elif _base(name) in BROWNIAN:
        kwargs["noise_sampler"] = _RoundedKeyNoise(7)
    ref = getattr(sampling, K_FUNCTIONS[_base(name)])(denoiser, x, sigmas, disable=True, **kwargs)
    err, rel = _report(name, ours, ref)
    assert rel < 1e-5, f"{name}: max abs error {err:.3g} against k-diffusion"


def _diffusers_run(scheduler, eps, noise, steps, g=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_out = eps(x, t.float().expand(x.shape[0]))
        if g is not None:
            step_kwargs["generator"] = g
        x = scheduler.step(model_out, t, x, **step_kwargs).prev_sample
    return x


COMPVIS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.mark.parametrize(
    ("name", "eta", "steps"), [("ddim", 0.0, 20), ("ddim", 0.0, 30), ("ddim", 0.7, 20),
                               ("plms", 0.0, 20), ("plms", 0.0, 7), ("ddpm", 1.0, 25)],
)  # fmt: skip
def test_compvis_sampler_matches_diffusers(name, eta, steps):
    diffusers = pytest.importorskip("diffusers")
    if name == "ddim":
        ref_sched = diffusers.DDIMScheduler(
            **COMPVIS, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading"
        )
        kwargs = {"eta": eta}
    elif name == "plms":
        ref_sched = diffusers.PNDMScheduler(**COMPVIS, skip_prk_steps=True, set_alpha_to_one=False)
        kwargs = {}
    else:
        ref_sched = diffusers.DDPMScheduler(
            **COMPVIS, clip_sample=False, variance_type="fixed_small", timestep_spacing="leading"
        )
        kwargs = {}
    schedule = NoiseSchedule(alphas_cumprod=ref_sched.alphas_cumprod)
    eps, noise = ToyEps(), _noise(1)
    g = torch.Generator().manual_seed(3) if eta else None
    ref = _diffusers_run(ref_sched, eps, noise, steps, g, **kwargs)
    options = {"eta": eta} if name == "ddim" else {}
    g = torch.Generator().manual_seed(3)
    ours = sample(name, eps, noise, schedule, steps, generator=g, progress=False, **options)
    err, rel = _report(f"{name} eta={eta} steps={steps}", ours, ref)
    assert rel < 1e-5, f"{name}: max abs error {err:.3g} against diffusers"


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers(variant):
    """diffusers' UniPC (order 3, x0-prediction) run on our ladder and timesteps.

    The last step (to sigma 0) just returns the x0 prediction; diffusers computes it as
    0 * inf = nan for bh1, so the reference takes its x0 prediction there directly.
    """
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    ref_sched = diffusers.UniPCMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", solver_order=3,
        solver_type=variant, predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    eps, noise = ToyEps(), _noise(2)
    sigmas = SAMPLERS["unipc"].sigmas(schedule, STEPS)
    ref_sched.set_timesteps(STEPS)
    ref_sched.sigmas = sigmas.clone()
    ref_sched.timesteps = schedule.sigma_to_t(sigmas[:-1])
    x = noise * sigmas[0] / (1 + sigmas[0] ** 2) ** 0.5  # x_T on the VP scale
    for t in ref_sched.timesteps[:-1]:
        x = ref_sched.step(eps(x, t.expand(x.shape[0])), t, x).prev_sample
    t = ref_sched.timesteps[-1]
    ref = ref_sched.convert_model_output(eps(x, t.expand(x.shape[0])), sample=x)
    ours = sample("unipc", eps, noise, schedule, STEPS, progress=False, variant=variant)
    err, rel = _report(f"unipc {variant}", ours, ref)
    assert rel < 1e-5, f"unipc: max abs error {err:.3g} against diffusers"
