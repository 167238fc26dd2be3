"""Noise sources for the stochastic samplers, all driven by the caller's torch.Generator."""

from __future__ import annotations

import torch

__all__ = ["BrownianTreeNoise", "GaussianNoise", "randn"]

_MASK64 = (1 << 64) - 1


def randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal of `like`'s device and dtype, drawn from `generator`.

    A CPU generator with a GPU tensor draws on the CPU and copies (as diffusers' randn_tensor),
    so a seed gives the same noise on every device.
    """
    device = like.device if generator is None else generator.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return noise.to(like.device)


class GaussianNoise:
    """noise(sigma, sigma_next) -> fresh standard normal noise shaped like x, from `generator`."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator | None = None):
        self.x, self.generator = x, generator

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return randn(self.x.shape, self.generator, self.x)


def _mix(seed: int, node: int) -> int:
    """A 63-bit seed for one tree node: splitmix64 of (seed, node)."""
    z = (seed + node * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class BrownianTreeNoise:
    """Increments of one fixed Brownian path W on [sigma_min, sigma_max], normalised.

    noise(s, s_next) = (W(s_next) - W(s)) / sqrt(|s_next - s|): standard normal for any interval,
    and the increments over overlapping or adjacent intervals are those of the same path, which is
    what SDE solvers such as DPM-Solver++ SDE need when they query an interval and its midpoint
    (the role of torchsde's BrownianTree in k-diffusion). W is built by Brownian-bridge bisection:
    the value at each midpoint is drawn from a generator seeded by (seed, node), so W(t) depends
    only on the seed and t, never on the order of queries. Below `depth` levels (an interval of
    (sigma_max - sigma_min) / 2^depth) W is interpolated linearly.

    The seed is one draw from the caller's generator (or given as an int).
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float,
        sigma_max: float,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        depth: int = 24,
    ):
        if seed is None:  # one host sync at construction, none while sampling
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_dev(generator)))
        self.x, self.seed, self.depth = x, seed, depth
        self.lo, self.hi = float(sigma_min), float(sigma_max)
        if not self.lo < self.hi:
            self.hi = self.lo + 1.0  # a one-point ladder: any nonempty interval will do
        self.w_hi = self._normal(1) * (self.hi - self.lo) ** 0.5  # W(lo) = 0

    def _normal(self, node: int) -> torch.Tensor:
        g = torch.Generator(device=self.x.device).manual_seed(_mix(self.seed, node))
        return torch.randn(self.x.shape, generator=g, device=self.x.device, dtype=self.x.dtype)

    def w(self, t: float) -> torch.Tensor:
        t = min(max(float(t), self.lo), self.hi)
        a, b, wa, wb, node = self.lo, self.hi, None, self.w_hi, 1  # wa None stands for 0
        for _ in range(self.depth):
            if t in (a, b):
                break
            m = (a + b) / 2
            wm = wb / 2 if wa is None else (wa + wb) / 2
            wm = wm + self._normal(2 * node) * ((b - a) / 4) ** 0.5  # the bridge at the midpoint
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        wa = torch.zeros_like(wb) if wa is None else wa
        if t == a:
            return wa
        return wa + (wb - wa) * ((t - a) / (b - a))

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        sigma, sigma_next = float(sigma), float(sigma_next)
        return (self.w(sigma_next) - self.w(sigma)) / abs(sigma_next - sigma) ** 0.5


def _dev(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device
