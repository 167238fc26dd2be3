"""Preprocessors that need no model weights: each a function from a PIL image to a control
image (RGB, same size), named and parameterised as in AUTOMATIC1111's ControlNet extension.

    edges = preprocess("canny", image, low_threshold=100, high_threshold=200)
    edges = preprocess("canny", image, threshold_a=100, threshold_b=200)  # the extension's API

The extension runs them through OpenCV; these are written with numpy and torch and follow
OpenCV's definitions (Canny's integer Sobel gradients, its non-maximum suppression and
hysteresis; Gaussian kernel sizes; area and cubic resampling), so the same image and settings
give the same control image. Preprocessors that need networks of their own (depth, openpose,
HED, ...) are not here: give their output as the control image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _image(pixels: np.ndarray) -> Image.Image:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Canny


_TAN_22_5 = 13573  # tan(22.5 degrees) in 15-bit fixed point, as OpenCV's Canny compares slopes


def _sobel(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 3x3 Sobel derivatives (x, y) of an (H, W, C) image, edges replicated."""
    p = np.pad(pixels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def _local_maxima(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the gradient magnitude is a maximum across the edge: compared with the two
    neighbours along the gradient's direction, quantised to 0, 45, 90 or 135 degrees (strictly
    greater than the one before, at least the one after, as OpenCV)."""
    m = np.pad(mag, 1)
    centre = m[1:-1, 1:-1]
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22 = x * _TAN_22_5
    tg67 = tg22 + (x << 16)
    horizontal = y < tg22
    vertical = ~horizontal & (y > tg67)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # the gradient points down-right (or up-left)
    keep = horizontal & (centre > m[1:-1, :-2]) & (centre >= m[1:-1, 2:])
    keep |= vertical & (centre > m[:-2, 1:-1]) & (centre >= m[2:, 1:-1])
    keep |= diagonal & same_sign & (centre > m[:-2, :-2]) & (centre > m[2:, 2:])
    keep |= diagonal & ~same_sign & (centre > m[:-2, 2:]) & (centre > m[2:, :-2])
    return keep


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected (through weak ones) to a strong one, and the strong ones."""
    edges = torch.from_numpy(strong)[None, None].float()
    allowed = torch.from_numpy(strong | weak)[None, None]
    while True:
        grown = F.max_pool2d(edges, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, edges):
            return edges[0, 0].bool().numpy()
        edges = grown


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200):
    """Canny's edge detector (1986), as OpenCV's ``Canny`` with an aperture of 3 and the L1
    gradient norm: on colour images each pixel takes the channel of largest gradient. Pixels
    above ``high_threshold`` start edges, those above ``low_threshold`` continue them."""
    low, high = sorted((int(np.floor(low_threshold)), int(np.floor(high_threshold))))
    dx, dy = _sobel(_rgb(image))
    mags = np.abs(dx) + np.abs(dy)
    channel = np.argmax(mags, axis=2)[:, :, None]  # the first of equal magnitudes, as OpenCV
    mag = np.take_along_axis(mags, channel, 2)[:, :, 0]
    dx = np.take_along_axis(dx, channel, 2)[:, :, 0]
    dy = np.take_along_axis(dy, channel, 2)[:, :, 0]
    candidate = (mag > low) & _local_maxima(mag, dx, dy)
    strong = candidate & (mag > high)
    edges = _hysteresis(strong, candidate & ~strong)
    return _image(edges.astype(np.uint8) * 255)


# ---------------------------------------------------------------------------------------------
# Blurs and resampling


def _gaussian_kernel(sigma: float, truncate: int) -> np.ndarray:
    """OpenCV's kernel for ``ksize=(0, 0)``: ``round(sigma * truncate * 2 + 1) | 1`` taps
    (truncate 3 for 8-bit images, 4 for float ones)."""
    size = int(np.floor(sigma * truncate * 2 + 1 + 0.5)) | 1
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(r**2) / (2 * sigma**2))
    return k / k.sum()


def _reflect_101(n: int, r: int) -> torch.Tensor:
    """Indices of a side of n pixels padded by r each way, mirrored without repeating the edge
    pixel (OpenCV's default border, BORDER_REFLECT_101), however many times r needs."""
    i = torch.arange(-r, n + r)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def _blur(pixels: np.ndarray, sigma: float, truncate: int) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, OpenCV's border."""
    kernel = torch.from_numpy(_gaussian_kernel(sigma, truncate))
    x = torch.from_numpy(pixels.astype(np.float64)).permute(2, 0, 1)[:, None]  # (C, 1, H, W)
    r = kernel.numel() // 2
    x = x.index_select(3, _reflect_101(x.shape[3], r))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _reflect_101(x.shape[2], r))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0].permute(1, 2, 0).numpy()


def blur_gaussian(image: Image.Image, sigma: float = 9.0):
    """Gaussian blur (the "tile" ControlNet's blur preprocessor), as OpenCV's GaussianBlur on an
    8-bit image."""
    blurred = _blur(_rgb(image).astype(np.float64), float(sigma), truncate=3)
    return _image(np.clip(np.floor(blurred + 0.5), 0, 255))


def tile_resample(image: Image.Image, down_sampling_rate: float = 1.0):
    """The "tile" ControlNet's input: the image shrunk by ``down_sampling_rate`` (area
    averaging), or unchanged below 1.1 (as the extension)."""
    image = image.convert("RGB")
    if down_sampling_rate < 1.1:
        return image
    w = int(image.width / down_sampling_rate)
    h = int(image.height / down_sampling_rate)
    return image.resize((w, h), Image.Resampling.BOX)


def color(image: Image.Image, grid: int = 64):
    """A colour grid: the image shrunk 64-fold with cubic interpolation, then enlarged back
    with nearest-neighbour sampling, so each 64x64 cell holds one colour."""
    pixels = torch.from_numpy(_rgb(image).astype(np.float32)).permute(2, 0, 1)[None]
    H, W = pixels.shape[-2:]
    small = F.interpolate(pixels, size=(max(1, H // grid), max(1, W // grid)), mode="bicubic",
                          align_corners=False)  # fmt: skip
    big = F.interpolate(small.round().clamp(0, 255), size=(H, W), mode="nearest")
    return _image(big[0].permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------
# Thresholds, inversion, lines


def invert(image: Image.Image):
    """The image's negative: black lines on white become the white-on-black that line
    ControlNets (lineart, scribble, canny) were trained on."""
    return _image(255 - _rgb(image))


def threshold(image: Image.Image, threshold: int = 127):
    """White where every channel is above ``threshold``, black elsewhere."""
    return _image((_rgb(image).min(axis=2) > threshold).astype(np.uint8) * 255)


def _otsu(gray: np.ndarray) -> int:
    """Otsu's threshold (1979): the level that maximises the between-class variance."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return int(np.argmax(np.nan_to_num(between, nan=-1.0)))


def binary(image: Image.Image, bin_threshold: int = 0):
    """White where the grey level is at most ``bin_threshold`` (dark strokes become white),
    black elsewhere; 0 or 255 chooses the threshold by Otsu's method."""
    gray = np.asarray(image.convert("L"))
    level = _otsu(gray) if bin_threshold in (0, 255) else int(bin_threshold)
    return _image((gray <= level).astype(np.uint8) * 255)


def scribble_xdog(image: Image.Image, threshold: int = 32):
    """Scribble lines from an image: a difference of Gaussians (sigma 0.5 and 5), thresholded."""
    pixels = _rgb(image).astype(np.float32)
    dog = _blur(pixels, 5.0, truncate=4) - _blur(pixels, 0.5, truncate=4)
    dog = np.clip(255 - dog.min(axis=2), 0, 255).astype(np.uint8)
    return _image((2 * (255 - dog.astype(np.int32)) > threshold).astype(np.uint8) * 255)


def lineart_standard(image: Image.Image):
    """Line art from an image: how much darker each pixel is than its surroundings (a Gaussian
    of sigma 6), normalised by the median over the lines."""
    pixels = _rgb(image).astype(np.float32)
    intensity = np.clip((_blur(pixels, 6.0, truncate=4) - pixels).min(axis=2), 0, 255)
    lines = intensity[intensity > 8]
    intensity = intensity / max(16.0, float(np.median(lines)) if lines.size else 16.0) * 127
    return _image(np.clip(intensity, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Shuffle


def _noise_disk(h: int, w: int, f: int, g: torch.Generator) -> torch.Tensor:
    """Smooth random noise (h, w) in [0, 1]: uniform noise on a grid of cell size f, cubic
    interpolation between, normalised to the full range."""
    noise = torch.rand(1, 1, h // f + 2, w // f + 2, generator=g, dtype=torch.float64)
    noise = F.interpolate(noise, size=(h + 2 * f, w + 2 * f), mode="bicubic", align_corners=False)
    noise = noise[0, 0, f : f + h, f : f + w]
    noise = noise - noise.min()
    return noise / noise.max()


def shuffle(image: Image.Image, seed: int | None = None, f: int = 256):
    """Content shuffle: each pixel is taken from a place given by two smooth random fields,
    keeping the colours and textures but not the layout (the shuffle ControlNet's input)."""
    pixels = torch.from_numpy(_rgb(image).astype(np.float64)).permute(2, 0, 1)[None]
    H, W = pixels.shape[-2:]
    g = torch.Generator().manual_seed(int(torch.seed() if seed is None else seed))
    x = _noise_disk(H, W, f, g) * (W - 1)
    y = _noise_disk(H, W, f, g) * (H - 1)
    # grid_sample's coordinates: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack([x / max(W - 1, 1), y / max(H - 1, 1)], dim=-1)[None] * 2 - 1
    out = F.grid_sample(pixels, grid, mode="bilinear", align_corners=True)
    return _image(np.clip(np.floor(out[0].permute(1, 2, 0).numpy() + 0.5), 0, 255))


def none(image: Image.Image):
    """No preprocessing: the image is the control image (a depth map, a pose, ...)."""
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor, the parameters it takes, and which of them the extension's API sends as
    threshold_a and threshold_b."""

    fn: Callable[..., Image.Image]
    params: tuple[str, ...] = ()
    api: tuple[str, ...] = ()  # (threshold_a's parameter, threshold_b's)


PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(none),
    "canny": Preprocessor(
        canny, ("low_threshold", "high_threshold"), ("low_threshold", "high_threshold")
    ),
    "invert": Preprocessor(invert),
    "threshold": Preprocessor(threshold, ("threshold",), ("threshold",)),
    "binary": Preprocessor(binary, ("bin_threshold",), ("bin_threshold",)),
    "tile_resample": Preprocessor(tile_resample, ("down_sampling_rate",), ("down_sampling_rate",)),
    "blur_gaussian": Preprocessor(blur_gaussian, ("sigma",), ("sigma",)),
    "color": Preprocessor(color, ("grid",)),
    "shuffle": Preprocessor(shuffle, ("seed", "f")),
    "scribble_xdog": Preprocessor(scribble_xdog, ("threshold",), ("threshold",)),
    "lineart_standard": Preprocessor(lineart_standard),
}
# The extension's longer names for the same preprocessors
ALIASES = {
    "invert (from white bg & black line)": "invert",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "t2ia_color_grid": "color",
}


def preprocess(
    name: str,
    image: Image.Image,
    *,
    processor_res: int | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    **params,
) -> Image.Image:
    """Run the preprocessor ``name`` on ``image``. Its parameters come by their names
    (``low_threshold=...``) or as the extension's API sends them (``threshold_a``,
    ``threshold_b``; -1 or None: the default); ``processor_res`` first scales the image's
    shorter side to that many pixels (the extension's "Preprocessor Resolution")."""
    key = ALIASES.get(name, name)
    if key not in PREPROCESSORS:
        raise ValueError(
            f"unknown preprocessor {name!r}; choose from: {', '.join(PREPROCESSORS)} "
            "(for depth, openpose and other preprocessors that need networks of their own, give "
            "their output as the control image with 'none')"
        )
    entry = PREPROCESSORS[key]
    unknown = [p for p in params if p not in entry.params]
    if unknown:
        raise ValueError(
            f"preprocessor {key!r} takes {', '.join(entry.params) or 'no parameters'}; got "
            f"{', '.join(unknown)}"
        )
    for value, param in zip((threshold_a, threshold_b), entry.api):
        if value is not None and value != -1:
            params.setdefault(param, value)
    if processor_res is not None and processor_res > 0:
        k = processor_res / min(image.size)
        size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
        shrink = Image.Resampling.BOX if k < 1 else Image.Resampling.LANCZOS
        image = image.convert("RGB").resize(size, shrink)
    return entry.fn(image, **params)
