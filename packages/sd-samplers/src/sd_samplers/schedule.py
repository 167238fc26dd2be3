"""The training noise schedule of a discrete-time diffusion model, and the sigma ladders.

A model trained on T discrete timesteps sees x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
(the variance-preserving scale). The samplers work on the variance-exploding scale of Karras et
al. (2022): x = x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps, with sigma_t^2 = (1 - alpha_bar_t) /
alpha_bar_t. `NoiseSchedule` converts between timestep, alpha-bar and sigma; fractional timesteps
interpolate log-sigma linearly between neighbours (k-diffusion's DiscreteSchedule), so every sigma
between sigma_min and sigma_max has a timestep to condition the model on.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ZERO_SNR_LAST_ALPHA_BAR",
    "NoiseSchedule",
    "exponential_sigmas",
    "karras_sigmas",
    "rescale_zero_terminal_snr",
]

# What a zero-terminal-SNR schedule's last alpha-bar becomes (AUTOMATIC1111's
# rescale_zero_terminal_snr_abar): exactly 0 would make sigma_max infinite, which no sampler on
# the sigma scale can start from; this leaves sigma_max about 4519, and the first step's
# estimate within 2e-4 of one at the true zero.
ZERO_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), then a final 0.

    The ladder of Karras et al. (2022), eq. 5; rho=7 is their (and AUTOMATIC1111's) choice.
    """
    _check_ladder(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas from sigma_max to sigma_min, evenly spaced in log sigma, then a final 0."""
    _check_ladder(n, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Betas whose last alpha-bar is exactly 0 (zero terminal SNR): Lin et al. (2023),
    Algorithm 1, as diffusers' ``rescale_betas_zero_snr`` applies it. sqrt(alpha-bar) is
    shifted so its last value is 0 and scaled so its first is unchanged; the last beta is then
    1, which :class:`NoiseSchedule` does not accept (see :meth:`NoiseSchedule.zero_terminal_snr`
    for the schedule the samplers use). float64 throughout."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    root = _zero_snr_root(torch.cumprod(1 - betas, dim=0).sqrt())
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _zero_snr_root(root: torch.Tensor) -> torch.Tensor:
    """sqrt(alpha-bar) moved to end at 0 with its first value kept (Lin et al., Algorithm 1)."""
    first, last = root[0].clone(), root[-1].clone()
    return (root - last) * (first / (first - last))


def _check_ladder(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"a sigma ladder needs at least 1 step, got n={n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")


class NoiseSchedule:
    """alpha-bar (cumulative product of 1 - beta) for each of the T training timesteps.

    Build it from `betas` or from `alphas_cumprod` (one of the two), or with a preset:
    `scaled_linear` (Stable Diffusion 1.x/2.x), `linear` (DDPM), `cosine` (improved DDPM).
    Tables are float32, as in the CompVis checkpoints, so sigmas match k-diffusion bit for bit.
    """

    def __init__(self, betas=None, *, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("give exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64)
            if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
                raise ValueError("betas must be a 1-D sequence of numbers in (0, 1)")
            alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got {ac.shape}")
        if not ((ac > 0) & (ac < 1)).all() or not (ac[1:] <= ac[:-1]).all():
            raise ValueError("alphas_cumprod must decrease within (0, 1)")
        self.alphas_cumprod = ac
        self.sigmas = ((1 - ac) / ac) ** 0.5  # ascending in t
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = self.sigmas[0].item()
        self.sigma_max = self.sigmas[-1].item()

    # presets

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, num_timesteps=1000):
        """sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end): the SD 1.x training schedule."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
        return cls(betas**2)

    @classmethod
    def linear(cls, beta_start=0.0001, beta_end=0.02, num_timesteps=1000):
        """beta linear in t: the schedule of Ho et al. (2020)."""
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_timesteps=1000, s=0.008, max_beta=0.999):
        """alpha-bar = cos^2(pi/2 (t/T + s) / (1 + s)): Nichol & Dhariwal (2021), betas clipped."""

        def alpha_bar(t):
            return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_timesteps)]
        return cls(betas)

    def zero_terminal_snr(self) -> NoiseSchedule:
        """This schedule rescaled to zero terminal SNR (Lin et al. 2023), as AUTOMATIC1111's
        "Noise schedule: Zero Terminal SNR" does it: alpha-bar from :func:`rescale_zero_terminal_snr`,
        its last value, 0, replaced by :data:`ZERO_SNR_LAST_ALPHA_BAR` so that sigma_max stays
        finite. For models trained on such a schedule (v-prediction fine-tunes); with an
        epsilon model the last step cannot recover the image from pure noise."""
        root = _zero_snr_root(self.alphas_cumprod.to(torch.float64).sqrt())
        alpha_bar = root**2
        alpha_bar[-1] = ZERO_SNR_LAST_ALPHA_BAR
        return NoiseSchedule(alphas_cumprod=alpha_bar)

    @property
    def betas(self) -> torch.Tensor:
        """beta_t = 1 - alpha-bar_t / alpha-bar_(t-1) (float64), e.g. for a diffusers
        scheduler's ``trained_betas``."""
        ac = self.alphas_cumprod.to(torch.float64)
        return 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])

    # conversions

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, sigma_min={self.sigma_min:.4g}, "
            f"sigma_max={self.sigma_max:.4g})"
        )

    def t_to_sigma(self, t) -> torch.Tensor:
        """Timesteps (may be fractional) to sigmas, interpolating log sigma linearly."""
        t = torch.as_tensor(t, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(t.device)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def sigma_to_t(self, sigma, log_sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """Sigmas to fractional timesteps: the inverse of `t_to_sigma`, clamped to [0, T-1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.log_sigmas.to(sigma.device) if log_sigmas is None else log_sigmas
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]  # (T, N)
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha-bar at (fractional) timesteps t: 1 / (1 + sigma(t)^2)."""
        return 1 / (1 + self.t_to_sigma(t) ** 2)

    @staticmethod
    def alpha_bar_to_sigma(alpha_bar) -> torch.Tensor:
        alpha_bar = torch.as_tensor(alpha_bar)
        return ((1 - alpha_bar) / alpha_bar) ** 0.5

    @staticmethod
    def sigma_to_alpha_bar(sigma) -> torch.Tensor:
        return 1 / (1 + torch.as_tensor(sigma) ** 2)

    # ladders: n sigmas from high to low, then 0 (the samplers step through consecutive pairs)

    def get_sigmas(self, n: int) -> torch.Tensor:
        """n sigmas at timesteps evenly spaced from T-1 to 0, then 0 (k-diffusion's get_sigmas)."""
        _check_ladder(n, self.sigma_min, self.sigma_max)
        return _append_zero(self.t_to_sigma(torch.linspace(self.num_timesteps - 1, 0, n)))

    def karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """`karras_sigmas` between this schedule's sigma_min and sigma_max."""
        return karras_sigmas(n, self.sigma_min, self.sigma_max, rho)

    def exponential(self, n: int) -> torch.Tensor:
        """`exponential_sigmas` between this schedule's sigma_min and sigma_max."""
        return exponential_sigmas(n, self.sigma_min, self.sigma_max)

    def compvis_timesteps(self, n: int) -> list[int]:
        """The original DDIM/PLMS timesteps, high to low: range(0, T, T // n)[:n] shifted by one.

        CompVis' make_ddim_timesteps keeps every entry of the range, one step more than asked for
        when n does not divide T; like diffusers ("leading" spacing, steps_offset=1) and
        AUTOMATIC1111 we keep exactly n.
        """
        if not 1 <= n <= self.num_timesteps - 1:
            raise ValueError(f"steps must be in [1, {self.num_timesteps - 1}] here, got {n}")
        stride = self.num_timesteps // n
        return [i * stride + 1 for i in reversed(range(n))]

    def compvis_sigmas(self, n: int, final: str = "alpha_0") -> torch.Tensor:
        """Sigmas at `compvis_timesteps(n)`, then the last step's target.

        final="alpha_0" ends at sigma(t=0), as DDIM/PLMS with set_alpha_to_one=False; "zero" ends
        at 0 (clean data), as DDPM's last step.
        """
        if final not in ("alpha_0", "zero"):
            raise ValueError(f"final must be 'alpha_0' or 'zero', got {final!r}")
        sigmas = self.sigmas[self.compvis_timesteps(n)]
        last = self.sigmas[:1] if final == "alpha_0" else sigmas.new_zeros([1])
        return torch.cat([sigmas, last])
