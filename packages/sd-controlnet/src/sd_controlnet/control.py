"""How a control image and a ControlNet's residuals are used, as AUTOMATIC1111's ControlNet
extension does it: resize modes, control modes and their per-residual weights.

Names: each mode has a short name here and is also accepted under the extension's label (and
its API's number), so a request in the extension's terms needs no table of its own.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# short name: the extension's labels and numbers for the same mode
CONTROL_MODES = {
    "balanced": ("Balanced", 0),
    "prompt": ("My prompt is more important", 1),
    "control": ("ControlNet is more important", 2),
}
RESIZE_MODES = {
    "just_resize": ("Just Resize", 0),
    "crop_and_resize": ("Crop and Resize", "Scale to Fit (Inner Fit)", 1),
    "resize_and_fill": ("Resize and Fill", "Envelope (Outer Fit)", 2),
}
# "My prompt is more important": the residual of input block i (the middle block is i = 12 for
# SD 1.x) is scaled by SOFT_BASE ** (12 - i), so the deep, coarse residuals keep most of their
# weight and the fine ones little (the extension's soft injection).
SOFT_BASE = 0.825
SOFT_COUNT = 13  # the extension counts SD 1.x's 12 skips and the middle block, for every model


def _pick(kind: str, table: dict, value) -> str:
    key = value.lower() if isinstance(value, str) else value
    for name, aliases in table.items():
        if key in {name, *(a.lower() if isinstance(a, str) else a for a in aliases)}:
            return name
    choices = ", ".join(f"{n} ({aliases[0]!r})" for n, aliases in table.items())
    raise ValueError(f"unknown {kind} {value!r}; choose from: {choices}")


def control_mode(value) -> str:
    """The short name of a control mode given by short name, extension label or number."""
    return _pick("control mode", CONTROL_MODES, value)


def resize_mode(value) -> str:
    """The short name of a resize mode given by short name, extension label or number."""
    return _pick("resize mode", RESIZE_MODES, value)


def control_scales(weight: float, mode: str = "balanced", count: int = 13) -> list[float]:
    """The weight of each of ``count`` residuals (the skips, then the middle block): ``weight``
    for all in balanced mode; soft weights in the other two. For SDXL (10 residuals) the
    extension takes the first 10 of SD 1.x's 13 soft weights, and so does this."""
    mode = control_mode(mode)
    if mode == "balanced":
        return [float(weight)] * count
    soft = [weight * SOFT_BASE ** float(SOFT_COUNT - 1 - i) for i in range(SOFT_COUNT)]
    return (soft + [float(weight)] * count)[:count]


def uses_conditional_only(mode: str) -> bool:
    """ControlNet is more important (guess mode): only the conditional rows of classifier-free
    guidance get the residuals, so the unconditional prediction ignores the control and the
    guidance pushes towards it."""
    return control_mode(mode) == "control"


def resize_control_image(image: Image.Image, width: int, height: int, mode="crop_and_resize"):
    """``image`` at ``width`` x ``height``: stretched (just_resize), scaled to cover and cropped
    at the centre (crop_and_resize, the extension's default), or scaled to fit and centred on
    the median colour of its border (resize_and_fill)."""
    mode = resize_mode(mode)
    image = image.convert("RGB")
    w0, h0 = image.size
    if (w0, h0) == (width, height):
        return image
    if mode == "just_resize":
        return _resize(image, width, height)
    if mode == "crop_and_resize":
        k = max(width / w0, height / h0)
        scaled = _resize(image, max(width, round(w0 * k)), max(height, round(h0 * k)))
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    k = min(width / w0, height / h0)
    scaled = _resize(image, min(width, max(1, round(w0 * k))), min(height, max(1, round(h0 * k))))
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    # area averaging to shrink, Lanczos to enlarge (as the extension's high-quality resize)
    shrink = width * height < image.width * image.height
    return image.resize(
        (width, height), Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
    )


def hint_tensor(
    image: Image.Image | np.ndarray | torch.Tensor,
    width: int | None = None,
    height: int | None = None,
    mode="crop_and_resize",
    *,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """A control image as the ControlNet's ``hint``: (1, 3, height, width), RGB in [0, 1].
    A PIL image or a (H, W, 3) uint8 array is resized to ``width`` x ``height`` by ``mode``
    first; a tensor is taken as it is, (3, H, W) or (B, 3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        hint = image[None] if image.dim() == 3 else image
        return hint.to(device=device, dtype=dtype)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if width is not None and height is not None:
        image = resize_control_image(image, width, height, mode)
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1)[None].to(device=device, dtype=dtype)
