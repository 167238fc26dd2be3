"""Parity with the reference implementations on the same model, schedule, noise and sigmas.

k-diffusion (CompVisDenoiser) for the k-samplers, with our noise fed to its `noise_sampler` for
the stochastic ones; diffusers' DDIM/PNDM/DDPM schedulers configured as the original CompVis code
for ddim/plms/ddpm, and its UniPC scheduler run on our ladder for unipc.
"""

import itertools
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


def _kd_denoisers(external, schedule, eps):
    """k-diffusion CompVisDenoisers of the guided model, its conditional and unconditional parts."""
    guided = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    cond = external.CompVisDenoiser(_CompVisModel(eps.cond, schedule))
    uncond = external.CompVisDenoiser(_CompVisModel(eps.uncond, schedule))
    return guided, cond, uncond


@pytest.mark.parametrize("eta", [None, 0.0])
@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
@pytest.mark.parametrize(("steps", "scheduler"), [(1, None), (7, None), (12, None), (20, None),
                                                  (7, "sgm_uniform"), (9, "karras")])  # fmt: skip
def test_dpm_fast_and_adaptive_match_k_diffusion(kdiff, name, eta, steps, scheduler):
    """k-diffusion's sample_dpm_fast(model, x, sigma_min, sigma_max, n) / sample_dpm_adaptive(
    model, x, sigma_min, sigma_max) as AUTOMATIC1111's txt2img calls them: from the ladder's top
    to the model's sigma_min whatever the schedule type, n = steps, with the registry's eta
    (A1111's 1.0) or eta=0."""
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(), _noise(3)
    options = {} if eta is None else {"eta": eta}
    g = torch.Generator().manual_seed(5)
    ours = sample(name, eps, noise, schedule, steps, generator=g, progress=False,
                  scheduler=scheduler, **options)  # fmt: skip
    denoiser = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    sigma_min, sigma_max = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    g = torch.Generator().manual_seed(5)
    kwargs = {"eta": SAMPLERS[name].options["eta"] if eta is None else eta,
              "noise_sampler": lambda s, s_next: torch.randn(SHAPE, generator=g)}  # fmt: skip
    x = noise * sigma_max
    if name == "dpm_fast":
        ref = sampling.sample_dpm_fast(denoiser, x, sigma_min, sigma_max, steps, disable=True,
                                       **kwargs)  # fmt: skip
    else:
        ref = sampling.sample_dpm_adaptive(denoiser, x, sigma_min, sigma_max, disable=True,
                                           **kwargs)  # fmt: skip
    ref = ref / (1 + sigma_min**2) ** 0.5  # x at sigma_min on the VP scale, as sample() returns
    err, rel = _report(f"{name} eta={eta} steps={steps} {scheduler}", ours, ref)
    assert rel < 1e-5, f"{name}: max abs error {err:.3g} against k-diffusion"


def _a1111_restart_pairs(sampling, sigmas):
    """AUTOMATIC1111's restart_sampler step list (sd_samplers_extra.py), written out with
    k-diffusion's get_sigmas_karras on torch tensors as there."""
    steps = sigmas.shape[0] - 1
    restart_list = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        sigmas = sampling.get_sigmas_karras(steps - restart_steps * restart_times,
                                            sigmas[-2].item(), sigmas[0].item())  # fmt: skip
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - k), dim=0)): v for k, v in restart_list.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            n, times, high = restart_list[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - high), dim=0))
            if max_idx < i + 1:
                restart = sampling.get_sigmas_karras(n, sigmas[i + 1].item(),
                                                     sigmas[max_idx].item())[:-1]  # fmt: skip
                pairs.extend(list(itertools.pairwise(restart)) * times)
    return pairs


@pytest.mark.parametrize("steps", [8, 20, 36, 40])
def test_restart_matches_a1111s_with_k_diffusion_heun(kdiff, steps):
    """Restart = k-diffusion's Heun step on each pair of A1111's step list, with fresh noise
    x += randn * sqrt(sigma^2 - last^2) wherever the list jumps back up."""
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(), _noise(4)
    ours = sample("restart", eps, noise, schedule, steps, progress=False,
                  generator=torch.Generator().manual_seed(6))  # fmt: skip
    denoiser = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    sigmas = SAMPLERS["restart"].sigmas(schedule, steps)
    pairs = _a1111_restart_pairs(sampling, sigmas)
    assert len(pairs) == steps
    g, x, last = torch.Generator().manual_seed(6), noise * sigmas[0], None
    for sigma, sigma_next in pairs:
        if last is not None and last < sigma:
            x = x + torch.randn(SHAPE, generator=g) * (sigma**2 - last**2) ** 0.5
        x = sampling.sample_heun(denoiser, x, torch.stack([sigma, sigma_next]), disable=True)
        last = sigma_next
    err, rel = _report(f"restart steps={steps}", ours, x)
    assert rel < 1e-5, f"restart: max abs error {err:.3g} against A1111's construction"


def _a1111_lcm_denoiser(external, eps, schedule):
    """AUTOMATIC1111's LCMCompVisDenoiser (sd_samplers_lcm.py), written out on k-diffusion's
    DiscreteEpsDDPMDenoiser: the 50 LCM alphas, sigma snapped to the nearest of them and passed
    to the model as t = 20 k + 19, and the boundary condition with sigma_data 0.5, t * 10."""

    class LCMCompVisDenoiser(external.DiscreteEpsDDPMDenoiser):
        def __init__(self):
            valid = torch.zeros(50)
            for x in range(50):
                valid[49 - x] = schedule.alphas_cumprod[999 - x * 20]
            super().__init__(eps, valid, quantize=None)

        def get_sigmas(self, n):
            start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
            return torch.cat([self.t_to_sigma(torch.linspace(start, end, n)), torch.zeros(1)])

        def sigma_to_t(self, sigma, quantize=None):
            dists = sigma.log() - self.log_sigmas[:, None]
            return dists.abs().argmin(dim=0).view(sigma.shape) * 20 + 19

        def t_to_sigma(self, timestep):
            t = torch.clamp(((timestep - 19) / 20).float(), min=0, max=len(self.sigmas) - 1)
            return super().t_to_sigma(t)

        def forward(self, input, sigma):
            c_out, c_in = [x.view(-1, 1, 1, 1) for x in self.get_scalings(sigma)]
            out = input + self.get_eps(input * c_in, self.sigma_to_t(sigma)) * c_out
            scaled = self.sigma_to_t(sigma).view(-1, 1, 1, 1) * 10.0
            c_skip = 0.25 / (scaled**2 + 0.25)
            return scaled / (scaled**2 + 0.25) ** 0.5 * out + c_skip * input

    return LCMCompVisDenoiser()


@pytest.mark.parametrize(("scheduler", "steps"), [(None, 4), (None, 6), ("karras", 6),
                                                  ("simple", 5), ("sgm_uniform", 4)])  # fmt: skip
def test_lcm_matches_a1111s(kdiff, scheduler, steps):
    """A1111's LCM: its sample_lcm loop (x = D(x), then x += sigma_next * noise) on its
    LCMCompVisDenoiser, whose own get_sigmas is the default ladder; a scheduler's ladder is built
    on the 50 LCM sigmas, as A1111 passes that denoiser as the inner model."""
    _, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(), _noise(5)
    ours = sample("lcm", eps, noise, schedule, steps, progress=False, scheduler=scheduler,
                  generator=torch.Generator().manual_seed(8))  # fmt: skip
    denoiser = _a1111_lcm_denoiser(external, eps, schedule)
    sigmas = SAMPLERS["lcm"].sigmas(schedule, steps, scheduler)
    if scheduler is None:
        torch.testing.assert_close(sigmas, denoiser.get_sigmas(steps), rtol=1e-6, atol=0)
    g, x = torch.Generator().manual_seed(8), noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        x = denoiser(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * torch.randn(SHAPE, generator=g)
    _err, rel = _report(f"lcm {scheduler} {steps}", ours, x)
    assert rel < 1e-5


@pytest.mark.parametrize(("name", "eta"), [("euler_cfg_pp", 0.0), ("euler_a_cfg_pp", 1.0),
                                           ("euler_a_cfg_pp", 0.5)])  # fmt: skip
def test_euler_cfg_pp_matches_comfyuis(kdiff, name, eta):
    """ComfyUI's sample_euler(_ancestral)_cfg_pp on k-diffusion's denoisers of the conditional and
    unconditional models: D = D_u + scale (D_c - D_u); d = (x - D_u) / sigma; x = D + d sigma_down
    (+ noise sigma_up), the last step to 0 giving D."""
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(scale=0.6), _noise(6)
    options = {"eta": eta} if name == "euler_a_cfg_pp" else {}
    ours = sample(name, eps, noise, schedule, STEPS, progress=False,
                  generator=torch.Generator().manual_seed(9), **options)  # fmt: skip
    _, cond, uncond = _kd_denoisers(external, schedule, eps)
    sigmas = SAMPLERS[name].sigmas(schedule, STEPS)
    g, x = torch.Generator().manual_seed(9), noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        s_in = sigmas[i] * x.new_ones([x.shape[0]])
        d_u, d_c = uncond(x, s_in), cond(x, s_in)
        denoised = d_u + eps.scale * (d_c - d_u)
        sigma_down, sigma_up = sampling.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        x = denoised + sampling.to_d(x, sigmas[i], d_u) * sigma_down
        if sigmas[i + 1] > 0 and eta:
            x = x + torch.randn(SHAPE, generator=g) * sigma_up
    _err, rel = _report(f"{name} eta={eta}", ours, x)
    assert rel < 1e-5


@pytest.mark.parametrize(("eta", "steps"), [(0.0, 20), (0.0, 7), (0.6, 20)])
def test_ddim_cfg_pp_matches_a1111s(eta, steps):
    """A1111's ddim_cfgpp (sd_samplers_timesteps_impl.py), written out on the VP scale with the
    CompVis timesteps and alphas_cumprod: x_prev = sqrt(a_prev) x0(e_guided) +
    sqrt(1 - a_prev - s_t^2) e_uncond + s_t noise."""
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(scale=0.6), _noise(7)
    ours = sample("ddim_cfg_pp", eps, noise, schedule, steps, progress=False, eta=eta,
                  generator=torch.Generator().manual_seed(10))  # fmt: skip
    ac = schedule.alphas_cumprod.double()
    timesteps = [t + 1 for t in range(0, 1000, 1000 // steps)][:steps]  # CompVis, shifted by one
    g, x = torch.Generator().manual_seed(10), noise.double()
    for index in reversed(range(steps)):
        t = timesteps[index]
        a_t, a_prev = ac[t], ac[timesteps[index - 1]] if index > 0 else ac[0]
        s_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        t_in = torch.full((SHAPE[0],), float(t))
        e_t, e_u = (e.double() for e in eps(x.float(), t_in, with_uncond=True))
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t**0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev - s_t**2) ** 0.5 * e_u
        if eta:
            x = x + s_t * torch.randn(SHAPE, generator=g)
    _err, rel = _report(f"ddim_cfg_pp eta={eta} steps={steps}", ours, x.float())
    assert rel < 1e-5


def test_ipndm_matches_comfyuis(kdiff):
    """ComfyUI's sample_ipndm on k-diffusion's denoiser: Adams-Bashforth with fixed coefficients
    on d = (x - D) / sigma, an Euler first step, D as the last step."""
    _, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(), _noise(8)
    ours = sample("ipndm", eps, noise, schedule, STEPS, progress=False)
    denoiser = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    sigmas = SAMPLERS["ipndm"].sigmas(schedule, STEPS)
    coefficients = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}  # fmt: skip
    x, history = noise * sigmas[0], []
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i] * x.new_ones([x.shape[0]]))
        d = (x - denoised) / sigmas[i]
        history.insert(0, d)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            order = min(4, i + 1)
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(
                c * h for c, h in zip(coefficients[order], history[:order])
            )
    _err, rel = _report("ipndm", ours, x)
    assert rel < 1e-5


@pytest.mark.parametrize(("eta", "s_noise"), [(0.0, 1.0), (0.5, 0.8), (1.0, 0.0)])
def test_euler_a_eta_and_s_noise_match_k_diffusion(kdiff, eta, s_noise):
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(), _noise(9)
    ours = sample("euler_a", eps, noise, schedule, STEPS, progress=False, eta=eta,
                  s_noise=s_noise, generator=torch.Generator().manual_seed(11))  # fmt: skip
    denoiser = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    sigmas = SAMPLERS["euler_a"].sigmas(schedule, STEPS)
    g = torch.Generator().manual_seed(11)
    ref = sampling.sample_euler_ancestral(
        denoiser, noise * sigmas[0], sigmas, disable=True, eta=eta, s_noise=s_noise,
        noise_sampler=lambda s, s_next: torch.randn(SHAPE, generator=g),
    )  # fmt: skip
    _err, rel = _report(f"euler_a eta={eta} s_noise={s_noise}", ours, ref)
    assert rel < 1e-5
    if eta == 0.0:  # no noise at all: Euler
        plain = sample("euler", eps, noise, schedule, STEPS, progress=False)
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["beta", "align_your_steps", "kl_optimal", "sgm_uniform"])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpm2", "lms", "dpmpp_2s_a"])
def test_k_samplers_on_other_schedulers_match_k_diffusion(kdiff, name, scheduler):
    """Any k-sampler on any schedule: k-diffusion's function given the scheduler's sigmas."""
    sampling, external = kdiff
    schedule = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    eps, noise = ToyEps(), _noise(10)
    ours = sample(name, eps, noise, schedule, STEPS, progress=False, scheduler=scheduler,
                  generator=torch.Generator().manual_seed(12))  # fmt: skip
    sigmas = SAMPLERS[name].sigmas(schedule, STEPS, scheduler)
    g = torch.Generator().manual_seed(12)
    kwargs = {}
    if name in ANCESTRAL:
        kwargs["noise_sampler"] = lambda s, s_next: torch.randn(SHAPE, generator=g)
    denoiser = external.CompVisDenoiser(_CompVisModel(eps, schedule))
    ref = getattr(sampling, K_FUNCTIONS[name])(denoiser, noise * sigmas[0], sigmas, disable=True,
                                               **kwargs)  # fmt: skip
    ref = ref / (1 + sigmas[-1].item() ** 2) ** 0.5
    _err, rel = _report(f"{name} on {scheduler}", ours, ref)
    assert rel < 1e-5
