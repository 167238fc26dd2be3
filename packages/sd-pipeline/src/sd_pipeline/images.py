"""Conversions between PIL images, NumPy arrays and the tensors the models use.

Conventions (the same as diffusers and the original code):
- model tensors are ``(B, 3, H, W)`` floats in ``[-1, 1]``;
- NumPy arrays are ``(H, W, 3)`` or ``(B, H, W, 3)``, either ``uint8`` in ``[0, 255]`` or floats
  in ``[0, 1]``;
- masks are single-channel: white (1) is the part to repaint, black (0) the part to keep.

Any PIL mode converts (:func:`to_rgb`, :func:`to_mask`): transparency is composited on white for
pictures (AUTOMATIC1111 flattens init images on its default white background) and is the mask
itself for masks that have any (as AUTOMATIC1111 reads alpha masks); 16-bit and 32-bit integer
images are scaled from 0..65535, float (``F``) images from 0..1, and ``LAB`` goes through an ICC
transform to sRGB.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from sd_pipeline.files import open_regular

ImageLike = Image.Image | np.ndarray | torch.Tensor

# The most pixels an image file may declare before it is decoded (8192 x 8192: 192 MiB as RGB,
# far past what Stable Diffusion uses). PIL's own guard (``Image.MAX_IMAGE_PIXELS``, about
# 89 Mpx, an error above twice that) catches larger ones first; raise both to read bigger files.
MAX_IMAGE_PIXELS = 8192 * 8192

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integers: 0..65535 is black..white


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _grey_8bit(image: Image.Image) -> Image.Image:
    """Mode ``L`` from a 16/32-bit integer or float greyscale image, scaled from its range
    (PIL's own ``convert`` clips those values at 255: a 16-bit picture comes out white)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("the image has non-finite (NaN or infinite) pixels")
        values = values * 255.0
    else:
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


@lru_cache(maxsize=1)
def _lab_to_srgb():
    from PIL import ImageCms

    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image of any mode (see the module's notes on each mode)."""
    if image.mode in _WIDE_GREY or image.mode == "F":
        return _grey_8bit(image).convert("RGB")
    if image.mode == "LAB":
        from PIL import ImageCms

        return ImageCms.applyTransform(image, _lab_to_srgb())
    if _has_alpha(image):
        background = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"an image of mode {image.mode!r} cannot be converted to RGB") from e


def pil_to_numpy(image: Image.Image) -> np.ndarray:
    """An RGB ``(H, W, 3)`` float32 array in ``[0, 1]`` (any mode, as :func:`to_rgb`)."""
    return np.asarray(to_rgb(image), dtype=np.float32) / 255.0


def numpy_to_pil(array: np.ndarray) -> list[Image.Image]:
    """PIL images from ``(H, W, 3)`` / ``(B, H, W, 3)`` arrays (uint8, or floats in [0, 1])."""
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) or (B, H, W, 3) array, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ValueError(
                "the image has non-finite (NaN or infinite) values; not making a picture"
            )
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in array]
    return [Image.fromarray(a) for a in array]


def pil_to_tensor(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """A ``(B, 3, H, W)`` float32 tensor in ``[-1, 1]`` from one PIL image or a list of them."""
    if isinstance(images, Image.Image):
        images = [images]
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
    array = np.stack([pil_to_numpy(im) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from a ``(B, 3, H, W)`` (or ``(3, H, W)``) tensor in ``[-1, 1]``."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
    array = (images.detach().float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return numpy_to_pil(array)


def to_pil(image: ImageLike) -> Image.Image:
    """One RGB PIL image from a PIL image, an ``(H, W, 3)`` array or a ``(3, H, W)`` tensor."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        return numpy_to_pil(image)[0].convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        return tensor_to_pil(image)[0]
    raise TypeError(f"expected a PIL image, a NumPy array or a tensor, got {type(image).__name__}")


def open_image(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Read an image file, in its own mode, upright (its EXIF orientation applied, as
    AUTOMATIC1111 does for photos), with errors that name the file and say what was wrong.

    Refused at once, never blocking: a FIFO, socket, device or folder; an image of more than
    ``MAX_IMAGE_PIXELS`` pixels (checked from its header, before decoding). Errors are
    ``FileNotFoundError``, ``PermissionError`` or ``ValueError``.
    """
    with open_regular(path, f"{what} file") as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    _check_pixels(path, *im.size)
                    im.load()
                    image = im.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(
                f"{path}: too large to read safely ({e}); the limit is {MAX_IMAGE_PIXELS:,} "
                "pixels (sd_pipeline.images.MAX_IMAGE_PIXELS)"
            ) from None
        except _TooManyPixels:
            raise
        except Image.UnidentifiedImageError:
            raise ValueError(f"{path}: not a readable {what} ({unknown_format(f)})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ValueError(f"{path}: not a readable {what} ({e})") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: the pixels are still good
        return image


def unknown_format(f) -> str:
    """Why PIL could not identify the open file ``f``, in words."""
    if os.fstat(f.fileno()).st_size == 0:
        return "the file is empty"
    f.seek(0)
    if f.read(8) == b"\x89PNG\r\n\x1a\n":
        return "a PNG that is cut short or damaged"
    return "not in a format PIL reads, such as PNG, JPEG or WebP"


class _TooManyPixels(ValueError):
    pass


def _check_pixels(path, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise _TooManyPixels(
            f"{path}: {width}x{height} is {width * height:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} (sd_pipeline.images.MAX_IMAGE_PIXELS); "
            "give a smaller image or raise the limit"
        )


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB (see :func:`open_image` and :func:`to_rgb`)."""
    image = open_image(path, "image")
    try:
        return to_rgb(image)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_mask(path: str | os.PathLike) -> Image.Image:
    """Read a mask file as greyscale (see :func:`open_image` and :func:`to_mask`)."""
    image = open_image(path, "mask image")
    try:
        return to_mask(image)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def to_mask(mask: ImageLike, size: tuple[int, int] | None = None) -> Image.Image:
    """A greyscale (mode ``L``) PIL mask; white repaints, black keeps.

    Accepts a PIL image of any mode, a 2-D array (bool, uint8, or floats in [0, 1]) or a 2-D /
    ``(1, H, W)`` tensor in [0, 1]. An image with transparency anywhere is masked by its alpha
    (opaque repaints, transparent keeps), as AUTOMATIC1111 reads its inpainting masks; an
    opaque one by its grey level (16-bit and float scaled as in :func:`to_rgb`).
    ``size`` (width, height), when given, must match the mask's size.
    """
    if isinstance(mask, Image.Image):
        mask = _grey_mask(mask)
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else mask
        array = np.squeeze(array)
        if array.ndim != 2:
            raise ValueError(
                f"a mask must be greyscale: a 2-D array, got shape {tuple(np.shape(mask))}"
            )
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif array.dtype != np.uint8:
            if not np.isfinite(array).all():
                raise ValueError("the mask has non-finite (NaN or infinite) values")
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        mask = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise TypeError(f"expected a mask image, array or tensor, got {type(mask).__name__}")
    if size is not None and mask.size != tuple(size):
        raise ValueError(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
            "give a mask of the same size as the image"
        )
    return mask


def _grey_mask(mask: Image.Image) -> Image.Image:
    if mask.mode in _WIDE_GREY or mask.mode == "F":
        return _grey_8bit(mask)
    if _has_alpha(mask):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
        mask = mask.convert("RGB")
    if mask.mode == "L":
        return mask.copy()
    try:
        return to_rgb(mask).convert("L")
    except (ValueError, OSError) as e:
        raise ValueError(f"a mask of mode {mask.mode!r} cannot be converted to greyscale") from e


def mask_to_tensor(mask: Image.Image, blur: float = 0.0) -> torch.Tensor:
    """A ``(1, 1, H, W)`` float tensor in [0, 1] from a greyscale mask.

    Without blur the mask is binarised at 0.5 (as diffusers does); with ``blur`` (a Gaussian
    radius in pixels) the edge is softened first and the mask stays soft.
    """
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)[None, None]
    if blur <= 0:
        tensor = (tensor >= 0.5).float()
    return tensor


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste same-sized images into one grid picture (``cols`` defaults to a square-ish grid)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def latent_mask(mask: torch.Tensor, scale: int, count: int) -> torch.Tensor:
    """A pixel mask (1, 1, H, W) at latent resolution (1/``scale``), ``count`` rows: nearest
    (as diffusers) when binary, area average when blurred."""
    h, w = mask.shape[-2] // scale, mask.shape[-1] // scale
    binary = bool(((mask == 0) | (mask == 1)).all())
    small = torch.nn.functional.interpolate(mask, size=(h, w), mode="nearest" if binary else "area")
    return small.expand(count, -1, -1, -1).contiguous()
