"""Images in and out of JSON: base64 PNGs, decoded with a size check before any pixel is.

A PNG of a few kilobytes can declare 100,000 x 100,000 pixels (an "image bomb"); PIL reads the
size from the header, so it is checked against sd-pipeline's side limit before decoding.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any

from PIL import Image, PngImagePlugin

from sd_pipeline import LIMITS, GenerationParameters
from sd_samplers import SAMPLERS, sampler_label

__all__ = ["FORMATS", "BadInput", "decode_image", "encode_png", "png_info"]

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what clients send; fewer decoders, fewer surprises


class BadInput(ValueError):
    """A request value that cannot be used: ``field`` is the API's name for it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self):  # a worker process sends it back to the server
        return type(self), (self.field, self.problem)


def decode_image(data: object, field: str, *, rgb: bool = True) -> Image.Image:
    """A PIL image from a base64 string (a ``data:image/...;base64,`` URL prefix allowed), its
    pixels loaded; converted to RGB when ``rgb``. Raises BadInput naming ``field``."""
    if not isinstance(data, str) or not data:
        raise BadInput(field, "must be a base64-encoded image (PNG, JPEG, WebP or BMP)")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(field, "is not valid base64 (give a base64-encoded PNG)") from None
    side = LIMITS.side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
            width, height = image.size
            if width > side or height > side:
                raise BadInput(
                    field, f"is {width}x{height} pixels; at most {side} pixels a side are accepted"
                )
            image.load()
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(field, "declares more pixels than are accepted (an image bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInput(field, f"is not a readable PNG, JPEG, WebP or BMP image ({e})") from None
    return image.convert("RGB") if rgb else image


def encode_png(image: Image.Image) -> str:
    """Base64 PNG carrying the image's ``parameters`` text (AUTOMATIC1111's metadata)."""
    info = None
    text = image.info.get("parameters")
    if isinstance(text, str):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    # zlib's fastest level: the answer goes once over a (usually local) link, where the time a
    # request takes matters more than its bytes.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_info(body) -> dict[str, Any]:
    """AUTOMATIC1111's ``/png-info``: the ``parameters`` text, the other text chunks, and the
    parameters parsed (its ``parse_generation_parameters`` keys)."""
    image = decode_image(body.image, "image", rgb=False)
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    if not text:
        return {"info": "", "items": items, "parameters": {}}
    try:
        p = GenerationParameters.from_text(text)
    except ValueError as e:
        raise BadInput("image", f"carries parameters that do not parse: {e}") from None
    parsed: dict[str, Any] = {
        "Prompt": p.prompt,
        "Negative prompt": p.negative_prompt,
        "Steps": p.steps,
        "Sampler": sampler_label(p.sampler) if p.sampler in SAMPLERS else p.sampler,
        "CFG scale": p.cfg_scale,
        "Seed": p.seed,
        "Size-1": p.width,
        "Size-2": p.height,
        "Model hash": p.model_hash,
        "Model": p.model,
        "Denoising strength": p.denoising_strength,
        "Clip skip": p.clip_skip,
        **p.extra,
    }
    return {"info": text, "items": items, "parameters": {k: v for k, v in parsed.items()
                                                          if v is not None}}  # fmt: skip
