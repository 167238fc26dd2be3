"""Noise schedules and samplers for diffusion models: DDIM, PLMS, Euler, DPM++, UniPC and more, model-agnostic."""

from sd_samplers._version import __version__
from sd_samplers.denoiser import Denoiser
from sd_samplers.k_samplers import (
    get_ancestral_step,
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_plms,
    sample_unipc,
)
from sd_samplers.noise import BrownianTreeNoise, GaussianNoise
from sd_samplers.sampling import SAMPLERS, Sampler, sample, sampler_from_label, sampler_label
from sd_samplers.schedule import NoiseSchedule, exponential_sigmas, karras_sigmas

__all__ = [
    "SAMPLERS",
    "BrownianTreeNoise",
    "Denoiser",
    "GaussianNoise",
    "NoiseSchedule",
    "Sampler",
    "__version__",
    "exponential_sigmas",
    "get_ancestral_step",
    "karras_sigmas",
    "sample",
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
    "sampler_from_label",
    "sampler_label",
]
