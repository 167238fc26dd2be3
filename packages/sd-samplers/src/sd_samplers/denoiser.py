"""One adapter from a noise-predicting (or v-predicting) model to a denoiser on the sigma scale."""

from __future__ import annotations

import torch

from sd_samplers.schedule import NoiseSchedule

__all__ = ["Denoiser", "LCMDenoiser", "lcm_schedule"]

PREDICTIONS = ("epsilon", "v")


class Denoiser:
    """D(x, sigma) ~ E[x_0 | x], for x = x_0 + sigma * eps, from the user's `model(x_t, t)`.

    The model sees what it was trained on: x_t = x / sqrt(1 + sigma^2) on the variance-preserving
    scale and t = schedule.sigma_to_t(sigma), a float tensor (B,) in [0, T-1]. It returns eps
    (prediction="epsilon"), so D = x - sigma eps, or v = alpha eps - sqrt(1 - alpha_bar) x_0
    (prediction="v"), so D = x / (1 + sigma^2) - v sigma / sqrt(1 + sigma^2). This is k-diffusion's
    CompVisDenoiser / CompVisVDenoiser; the samplers only ever call `denoiser(x, sigma)`.
    Extra keyword arguments are passed through to the model (conditioning, say).

    CFG++ samplers call ``denoiser(x, sigma, with_uncond=True)``: the model is then called with
    ``with_uncond=True`` too and must return a pair (guided prediction, unconditional prediction),
    both in the training parameterisation, from its one batched call; the denoiser returns both
    denoised estimates.
    """

    def __init__(self, model, schedule: NoiseSchedule, prediction: str = "epsilon"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from: epsilon, v")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self._log_sigmas: dict[torch.device, torch.Tensor] = {}

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's (fractional) timestep for each sigma, computed on sigma's device."""
        log_sigmas = self._log_sigmas.get(sigma.device)
        if log_sigmas is None:  # one copy per device, not one per call
            log_sigmas = self._log_sigmas[sigma.device] = self.schedule.log_sigmas.to(sigma.device)
        return self.schedule.sigma_to_t(sigma, log_sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, with_uncond: bool = False, **kwargs):
        sigma = sigma.to(torch.float32)
        s = sigma.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        c_in = (s**2 + 1) ** -0.5
        if not with_uncond:
            return self._denoised(x, s, c_in, self.model(x * c_in, self.t(sigma), **kwargs))
        out = self.model(x * c_in, self.t(sigma), with_uncond=True, **kwargs)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(
                "model(x_t, t, with_uncond=True) must return a pair (guided prediction, "
                f"unconditional prediction), got {type(out).__name__}"
            )
        return tuple(self._denoised(x, s, c_in, o) for o in out)

    def _denoised(self, x, s, c_in, out):
        if self.prediction == "epsilon":
            return x - s * out
        return x * c_in**2 - s * c_in * out


def lcm_schedule(schedule: NoiseSchedule, original_steps: int = 50) -> NoiseSchedule:
    """The `original_steps` timesteps a Latent Consistency Model was distilled on: t = k s + s - 1
    for s = T // original_steps (19, 39, ..., 999 for T = 1000), as a schedule of their own."""
    if not 1 <= original_steps <= schedule.num_timesteps:
        raise ValueError(
            f"original_steps must be in [1, {schedule.num_timesteps}], got {original_steps}"
        )
    skip = schedule.num_timesteps // original_steps
    return NoiseSchedule(alphas_cumprod=schedule.alphas_cumprod[skip - 1 :: skip][:original_steps])


class LCMDenoiser(Denoiser):
    """The denoiser of a Latent Consistency Model (Luo et al. 2023), as AUTOMATIC1111's
    LCMCompVisDenoiser and ComfyUI's ModelSamplingDiscreteDistilled: the model runs at the
    nearest of the LCM timesteps (`lcm_schedule`), and its estimate gets the consistency
    boundary condition c_skip x + c_out D with sigma_data = 0.5 and the timestep scaled by 10.
    """

    SIGMA_DATA = 0.5  # LCM's boundary-condition constants (its scheduler's defaults)
    TIMESTEP_SCALING = 10.0

    def __init__(self, model, schedule: NoiseSchedule, prediction="epsilon", original_steps=50):
        super().__init__(model, schedule, prediction)
        self.lcm = lcm_schedule(schedule, original_steps)
        self.skip = schedule.num_timesteps // original_steps

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.lcm.log_sigmas.to(sigma.device)
        index = (sigma.log() - log_sigmas[:, None]).abs().argmin(dim=0)
        return (index * self.skip + self.skip - 1).to(torch.float32).view(sigma.shape)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, with_uncond: bool = False, **kwargs):
        out = super().__call__(x, sigma, with_uncond, **kwargs)
        scaled = self.t(sigma.to(torch.float32)).view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        scaled = scaled * self.TIMESTEP_SCALING
        c_skip = self.SIGMA_DATA**2 / (scaled**2 + self.SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + self.SIGMA_DATA**2) ** 0.5
        if with_uncond:
            return tuple(c_out * o + c_skip * x for o in out)
        return c_out * out + c_skip * x
