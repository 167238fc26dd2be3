"""NoiseSchedule: presets against their formulas, conversions, ladders, and errors."""

import math

import numpy as np
import pytest
import torch

from sd_samplers import NoiseSchedule, exponential_sigmas, karras_sigmas


def test_scaled_linear_is_the_sd_training_schedule():
    s = NoiseSchedule.scaled_linear(0.00085, 0.012, 1000)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # CompVis ldm
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-6)
    assert len(s) == 1000 and s.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert s.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_linear_and_cosine_presets():
    lin = NoiseSchedule.linear()
    np.testing.assert_allclose(
        lin.alphas_cumprod.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-6
    )
    cos = NoiseSchedule.cosine(1000)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = np.cumprod(np.minimum(1 - f[1:] / f[:-1], 0.999) * -1 + 1)
    np.testing.assert_allclose(cos.alphas_cumprod.numpy(), expected, rtol=1e-5)


def test_conversions_round_trip_and_interpolate_log_sigma():
    s = NoiseSchedule.scaled_linear()
    t = torch.arange(1000).float()
    torch.testing.assert_close(s.t_to_sigma(t), s.sigmas)
    torch.testing.assert_close(s.sigma_to_t(s.sigmas), t, rtol=0, atol=2e-3)
    # a half timestep is the geometric mean of its neighbours' sigmas
    mid = s.t_to_sigma(torch.tensor([10.5]))
    assert mid.item() == pytest.approx(math.sqrt(s.sigmas[10].item() * s.sigmas[11].item()))
    frac = torch.tensor([0.3, 123.75, 998.2])
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(frac)), frac, rtol=1e-4, atol=1e-3)
    ab = s.alpha_bar(torch.tensor([0.0, 500.0]))
    torch.testing.assert_close(ab, s.alphas_cumprod[[0, 500]])
    torch.testing.assert_close(NoiseSchedule.alpha_bar_to_sigma(ab), s.sigmas[[0, 500]])
    torch.testing.assert_close(NoiseSchedule.sigma_to_alpha_bar(s.sigmas[[0, 500]]), ab)


def test_ladders():
    k = karras_sigmas(10, 0.03, 14.6)
    assert len(k) == 11 and k[-1] == 0 and k[0].item() == pytest.approx(14.6)
    assert k[-2].item() == pytest.approx(0.03)
    steps = k[:-1] ** (1 / 7)
    torch.testing.assert_close(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(9))
    e = exponential_sigmas(5, 0.1, 10.0)
    torch.testing.assert_close(e[:-1], torch.tensor([10.0, 10**0.5, 1.0, 10**-0.5, 0.1]))
    s = NoiseSchedule.scaled_linear()
    assert s.compvis_timesteps(50) == [t + 1 for t in range(0, 1000, 20)][::-1]
    assert s.compvis_timesteps(30) == [t * 33 + 1 for t in range(30)][::-1]  # exactly 30
    assert s.compvis_sigmas(4)[-1] == s.sigmas[0] and s.compvis_sigmas(4, "zero")[-1] == 0
    u = s.get_sigmas(3)
    torch.testing.assert_close(u[:-1], s.t_to_sigma(torch.tensor([999.0, 499.5, 0.0])))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: NoiseSchedule(), "exactly one of betas= or alphas_cumprod="),
        (lambda: NoiseSchedule([0.1], alphas_cumprod=[0.9]), "exactly one"),
        (lambda: NoiseSchedule([0.1, 1.5]), r"betas must be .* in \(0, 1\)"),
        (lambda: NoiseSchedule(alphas_cumprod=[0.5, 0.9]), "must decrease"),
        (lambda: karras_sigmas(0, 0.1, 1.0), "at least 1 step"),
        (lambda: karras_sigmas(5, 2.0, 1.0), "sigma_min <= sigma_max"),
        (lambda: NoiseSchedule.scaled_linear().compvis_sigmas(5, "one"), "final must be"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_zero_terminal_snr_betas_equal_diffusers():
    """rescale_zero_terminal_snr against diffusers' own (Lin et al. 2023, Algorithm 1), and the
    schedule the samplers use against a diffusers scheduler built with rescale_betas_zero_snr:
    equal but for the last alpha-bar, AUTOMATIC1111's 4.897e-08 where diffusers has 0."""
    schedulers = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    from sd_samplers import ZERO_SNR_LAST_ALPHA_BAR, rescale_zero_terminal_snr

    base = NoiseSchedule.scaled_linear()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ours = rescale_zero_terminal_snr(betas)
    theirs = schedulers.rescale_zero_terminal_snr(betas.clone())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)
    assert ours[-1].item() == pytest.approx(1.0) and ours[0].item() == pytest.approx(0.00085)
    ddim = schedulers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, rescale_betas_zero_snr=True)  # fmt: skip
    assert ddim.alphas_cumprod[-1] == 0
    zsnr = base.zero_terminal_snr()
    torch.testing.assert_close(
        zsnr.alphas_cumprod[:-1], ddim.alphas_cumprod[:-1].float(), rtol=2e-5, atol=1e-10
    )  # fmt: skip (float32 there, float64 here)
    assert zsnr.alphas_cumprod[-1].item() == pytest.approx(ZERO_SNR_LAST_ALPHA_BAR)
    assert zsnr.alphas_cumprod[0] == base.alphas_cumprod[0]
    assert zsnr.sigma_max == pytest.approx((1 / ZERO_SNR_LAST_ALPHA_BAR - 1) ** 0.5, rel=1e-4)
    # betas give the schedule back (as diffusers' trained_betas take them)
    again = NoiseSchedule(zsnr.betas)
    torch.testing.assert_close(again.alphas_cumprod, zsnr.alphas_cumprod, rtol=1e-5, atol=0)
