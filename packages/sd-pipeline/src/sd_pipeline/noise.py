"""The starting noise of each image, as AUTOMATIC1111 makes it: seeds, variation seeds, seed
resizing, and its three sources of random numbers.

A picture made elsewhere is reproduced only with the same noise. AUTOMATIC1111 draws each
image's noise as ``randn(seed, (C, H, W))`` from one of three sources (its "Random number
generator source" setting):

- ``"cpu"``: torch's CPU generator seeded with the seed. The same on every machine, so it is
  sd-pipeline's default (and diffusers' habit of drawing on the CPU).
- ``"gpu"``: torch's CUDA generator (AUTOMATIC1111's default): needs a CUDA device, and gives
  what that device gives.
- ``"nv"``: AUTOMATIC1111's emulation of the CUDA generator on any device (Philox 4x32-10 with
  a Box-Muller transform, as torch's CUDA ``randn`` for a fresh generator), to reproduce
  pictures made on NVIDIA GPUs on a CPU.

Variation seeds mix a second noise in by spherical interpolation (``subseed_strength``, 0: the
seed's noise, 1: the subseed's), and "resize seed from" draws the noise at another size and
pastes it centred, so that a seed keeps its composition at a new size.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "RNG_SOURCES", "image_noise", "philox_randn", "randn", "request_noise", "row_noise", "slerp",
]  # fmt: skip

RNG_SOURCES = ("cpu", "gpu", "nv")

# Philox 4x32 round multipliers and Weyl key increments (Salmon et al., "Parallel random numbers:
# as easy as 1, 2, 3", SC 2011), as CUDA's curand uses them.
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
# Box-Muller's scale constants as AUTOMATIC1111's emulation rounds them (float32).
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _mulhilo(a: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """High and low 32 bits of the 64-bit products a * m (a: uint32 values in uint64)."""
    product = a * np.uint64(m)
    return product >> np.uint64(32), product & _MASK32


def _philox(counter: list[np.ndarray], key: list[np.ndarray], rounds: int = 10) -> list:
    for r in range(rounds):
        if r:
            key = [(key[0] + np.uint64(_PHILOX_W[0])) & _MASK32,
                   (key[1] + np.uint64(_PHILOX_W[1])) & _MASK32]  # fmt: skip
        hi0, lo0 = _mulhilo(counter[0], _PHILOX_M[0])
        hi1, lo1 = _mulhilo(counter[2], _PHILOX_M[1])
        counter = [hi1 ^ counter[1] ^ key[0], lo1, hi0 ^ counter[3] ^ key[1], lo0]
    return counter


def philox_randn(seed: int, shape, offset: int = 0) -> torch.Tensor:
    """Standard normal float32 numbers as torch's CUDA ``randn`` draws them for a generator
    seeded with ``seed`` (AUTOMATIC1111's "NV" source): one Philox counter per number, the
    number's index in the counter's third word, ``offset`` (the draw's index) in the first."""
    n = int(np.prod(shape))
    index = np.arange(n, dtype=np.uint64)
    zeros = np.zeros(n, dtype=np.uint64)
    counter = [zeros + np.uint64(offset), zeros, index, zeros]
    seed = int(seed) % 2**64
    key = [zeros + np.uint64(seed & 0xFFFFFFFF), zeros + np.uint64(seed >> 32)]
    x, y = _philox(counter, key)[:2]
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    values = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)
    return torch.from_numpy(values.reshape(tuple(shape)))


def randn(seed: int, shape, source: str = "cpu", device: torch.device | None = None):
    """One image's noise for ``seed`` from ``source`` (see the module's docstring), float32 on
    the CPU."""
    if source == "cpu":
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) % 2**64))
    if source == "nv":
        return philox_randn(seed, shape)
    if source == "gpu":
        if device is None or device.type != "cuda":
            raise ValueError(
                "rng 'gpu' draws with the CUDA generator and needs a CUDA device; use rng 'nv' "
                "(the same numbers, emulated) or 'cpu'"
            )
        g = torch.Generator(device).manual_seed(int(seed) % 2**64)
        return torch.randn(shape, generator=g, device=device).cpu()
    raise ValueError(f"unknown rng {source!r}; choose from: {', '.join(RNG_SOURCES)}")


def slerp(value: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's spherical interpolation of two noises (C, H, W), done along H for each
    channel and column as it does, with its near-parallel fallback."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * value + high * (1 - value)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - value) * omega) / so).unsqueeze(1) * low + (
        torch.sin(value * omega) / so
    ).unsqueeze(1) * high


def image_noise(
    seed: int,
    shape: tuple[int, int, int],
    *,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
    source: str = "cpu",
    device: torch.device | None = None,
) -> torch.Tensor:
    """One image's starting noise (C, H, W) as AUTOMATIC1111's ``create_random_tensors``:
    ``resize_from`` is the (height, width) in latents to draw at (then pasted centred into
    noise of ``shape``), ``subseed`` mixed in with ``subseed_strength``."""
    drawn = shape if resize_from is None else (shape[0], *resize_from)
    noise = randn(seed, drawn, source, device)
    if subseed is not None and subseed_strength != 0:
        noise = slerp(subseed_strength, noise, randn(subseed, drawn, source, device))
    if drawn == shape:
        return noise
    out = randn(seed, shape, source, device)
    dy, dx = (shape[1] - drawn[1]) // 2, (shape[2] - drawn[2]) // 2
    h = drawn[1] if dy >= 0 else drawn[1] + 2 * dy
    w = drawn[2] if dx >= 0 else drawn[2] + 2 * dx
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return out


def request_noise(request, i: int, seed: int, generator, shape, scale: int, device):
    """Image i of a request's starting noise (C, H, W): its seed's, with the request's seed
    extras and RNG source. ``generator`` (image i's, which then gives the sampler its noise)
    draws one noise of the image's shape first, whatever the recipe, as AUTOMATIC1111's
    per-image generators do; ``scale`` is pixels per latent."""
    plain = torch.randn(shape, generator=generator)
    if (request.rng, request.subseed_strength, request.seed_resize_from) == ("cpu", 0, None):
        return plain
    resize = request.seed_resize_from
    return image_noise(
        seed,
        shape,
        subseed=request.subseeds[i],
        subseed_strength=request.subseed_strength,
        resize_from=None if resize is None else (resize[1] // scale, resize[0] // scale),
        source=request.rng,
        device=device,
    )


def row_noise(kind: str, noise: torch.Tensor, generators, schedule):
    """A sampler's ``noise(sigma, sigma_next)`` for a batch whose row i is drawn from image i's
    generator (``kind``: ``"brownian"``, a Brownian path per image over the schedule's whole
    range, else Gaussian), so that image i of a batch equals a single run with its seed."""
    from sd_samplers import BrownianTreeNoise, GaussianNoise

    rows = [noise[i : i + 1] for i in range(len(generators))]
    if kind == "brownian":
        lo, hi = schedule.sigma_min, schedule.sigma_max
        sources = [BrownianTreeNoise(r, lo, hi, g) for r, g in zip(rows, generators)]
    else:
        sources = [GaussianNoise(r, g) for r, g in zip(rows, generators)]
    return lambda sigma, sigma_next: torch.cat([s(sigma, sigma_next) for s in sources])
