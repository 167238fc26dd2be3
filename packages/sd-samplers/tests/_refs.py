"""Test helpers: toy models, exact denoisers, and the reference implementations' loaders."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch


class ToyEps(torch.nn.Module):
    """A small nonlinear eps-predictor of (x_t, t): channel mixing, tanh, a t-dependent bias.

    With ``with_uncond=True`` (what the CFG++ samplers ask for) it returns (guided, unconditional)
    predictions: the unconditional one from a second set of weights, the guided one
    uncond + `scale` (cond - uncond), as classifier-free guidance combines them.
    """

    def __init__(self, channels: int = 4, seed: int = 0, scale: float = 0.7):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.b = torch.nn.Parameter(torch.randn(channels, generator=g))
        self.w_u = torch.nn.Parameter(torch.randn(channels, channels, generator=g) / channels**0.5)
        self.b_u = torch.nn.Parameter(torch.randn(channels, generator=g))
        self.scale = scale

    def _eps(self, x, t, w, b):
        tt = (t.to(x.dtype) / 1000).view(-1, *[1] * (x.ndim - 1))
        mixed = torch.einsum("bc...,dc->bd...", x, w.to(x.dtype))
        bias = b.to(x.dtype).view(1, -1, *[1] * (x.ndim - 2))
        return torch.tanh(mixed + bias * tt) * (1 - 0.5 * tt) + 0.5 * x

    def cond(self, x, t):
        return self._eps(x, t, self.w, self.b)

    def uncond(self, x, t):
        return self._eps(x, t, self.w_u, self.b_u)

    def forward(self, x, t, with_uncond=False):
        if not with_uncond:
            return self.cond(x, t)
        uncond = self.uncond(x, t)
        return uncond + self.scale * (self.cond(x, t) - uncond), uncond


class GaussianMixture:
    """Data x_0 ~ sum_k w_k N(m_k, v_k), i.i.d. in every coordinate: the ideal denoiser in closed form."""

    def __init__(self, weights, means, variances):
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.m = torch.tensor(means, dtype=torch.float64)
        self.v = torch.tensor(variances, dtype=torch.float64)

    def denoise(self, x, sigma):
        """E[x_0 | x_0 + sigma eps = x], x of any shape, sigma (B,)."""
        s2 = sigma.to(torch.float64).view(-1, *[1] * (x.ndim - 1), 1) ** 2
        xk = x.to(torch.float64)[..., None]
        var = self.v + s2
        log_r = self.w.log() - 0.5 * (xk - self.m) ** 2 / var - 0.5 * var.log()
        r = log_r.softmax(-1)
        return (r * (self.m + self.v / var * (xk - self.m))).sum(-1).to(x.dtype)

    def eps_model(self, schedule):
        """The matching model(x_t, t) -> eps on the VP scale, through the schedule's t -> sigma."""

        def model(x_t, t, with_uncond=False):  # unguided: the unconditional model is the model
            sigma = schedule.t_to_sigma(t.cpu()).to(x_t.device, torch.float64)
            s = sigma.view(-1, *[1] * (x_t.ndim - 1))
            x = x_t.to(torch.float64) * (1 + s**2) ** 0.5
            eps = ((x - self.denoise(x, sigma)) / s).to(x_t.dtype)
            return (eps, eps) if with_uncond else eps

        return model

    def sample(self, n, generator):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.m[k] + self.v[k].sqrt() * torch.randn(
            n, generator=generator, dtype=torch.float64
        )

    def moments(self, sigma_last: float = 0.0):
        """Mean, std and P(x > 0) of x_0 + sigma_last eps, scaled by 1 / sqrt(1 + sigma_last^2)."""
        c = 1 / math.sqrt(1 + sigma_last**2)
        mean = float((self.w * self.m).sum())
        second = float((self.w * (self.v + sigma_last**2 + self.m**2)).sum())
        std = math.sqrt(second - mean**2)
        sd = (self.v + sigma_last**2).sqrt()
        p_pos = float((self.w * 0.5 * torch.erfc(-self.m / sd / math.sqrt(2))).sum())
        return c * mean, c * std, p_pos


def load_k_diffusion():
    """k_diffusion.sampling and .external loaded by file path under a stub package.

    k-diffusion 0.1.1's package __init__ and utils import torchvision, scikit-image, PIL, ...;
    sampling and external only need utils.append_dims, which the stub provides.
    """
    for dep in ("scipy", "torchsde", "torchdiffeq"):
        pytest.importorskip(dep)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    if "_kd_ref.external" in sys.modules:
        return sys.modules["_kd_ref.sampling"], sys.modules["_kd_ref.external"]
    root = Path(next(iter(spec.submodule_search_locations)))
    pkg = types.ModuleType("_kd_ref")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("_kd_ref.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["_kd_ref"], sys.modules["_kd_ref.utils"] = pkg, utils
    modules = []
    for name in ("sampling", "external"):
        mspec = importlib.util.spec_from_file_location(f"_kd_ref.{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mspec.name] = module
        mspec.loader.exec_module(module)
        setattr(pkg, name, module)
        modules.append(module)
    return tuple(modules)
