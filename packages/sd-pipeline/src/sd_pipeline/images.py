"""Conversions between PIL images, NumPy arrays and the tensors the models use.

Conventions (the same as diffusers and the original code):
- model tensors are ``(B, 3, H, W)`` floats in ``[-1, 1]``;
- NumPy arrays are ``(H, W, 3)`` or ``(B, H, W, 3)``, either ``uint8`` in ``[0, 255]`` or floats
  in ``[0, 1]``;
- masks are single-channel: white (1) is the part to repaint, black (0) the part to keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

ImageLike = Image.Image | np.ndarray | torch.Tensor


def pil_to_numpy(image: Image.Image) -> np.ndarray:
    """An RGB ``(H, W, 3)`` float32 array in ``[0, 1]``."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def numpy_to_pil(array: np.ndarray) -> list[Image.Image]:
    """PIL images from ``(H, W, 3)`` / ``(B, H, W, 3)`` arrays (uint8, or floats in [0, 1])."""
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) or (B, H, W, 3) array, got shape {array.shape}")
    if array.dtype != np.uint8:
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
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        return numpy_to_pil(image)[0].convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        return tensor_to_pil(image)[0]
    raise TypeError(f"expected a PIL image, a NumPy array or a tensor, got {type(image).__name__}")


def load_image(path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def to_mask(mask: ImageLike, size: tuple[int, int] | None = None) -> Image.Image:
    """A greyscale (mode ``L``) PIL mask; white repaints, black keeps.

    Accepts a PIL image of any mode PIL can convert to greyscale (an alpha channel is ignored),
    a 2-D array (bool, uint8, or floats in [0, 1]) or a 2-D / ``(1, H, W)`` tensor in [0, 1].
    ``size`` (width, height), when given, must match the mask's size.
    """
    if isinstance(mask, Image.Image):
        if mask.mode in ("RGBA", "LA", "PA"):
            mask = mask.convert(mask.mode[:-1] if mask.mode != "PA" else "P")
        try:
            mask = mask.convert("L")
        except (ValueError, OSError) as e:
            raise ValueError(f"mask of mode {mask.mode!r} cannot be converted to greyscale") from e
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
