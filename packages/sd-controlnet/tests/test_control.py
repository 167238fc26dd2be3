"""Control options as AUTOMATIC1111's ControlNet extension defines them."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sd_controlnet import (
    control_mode,
    control_scales,
    hint_tensor,
    resize_control_image,
    resize_mode,
    uses_conditional_only,
)


def test_balanced_weights_every_residual_alike():
    assert control_scales(0.7, "balanced") == [0.7] * 13


@pytest.mark.parametrize("mode", ["prompt", "My prompt is more important", 1, "control"])
def test_soft_weights(mode):
    scales = control_scales(2.0, mode)
    assert scales[-1] == 2.0 and scales[0] == pytest.approx(2.0 * 0.825**12)
    assert all(a < b for a, b in itertools.pairwise(scales))
    assert control_scales(2.0, mode, count=10) == scales[:10]  # SDXL: the extension's first 10


def test_modes_by_label_and_number():
    assert control_mode("ControlNet is more important") == control_mode(2) == "control"
    assert control_mode("balanced") == control_mode("Balanced") == control_mode(0) == "balanced"
    assert uses_conditional_only("control") and not uses_conditional_only("prompt")
    assert resize_mode("Crop and Resize") == resize_mode(1) == "crop_and_resize"
    assert resize_mode("Envelope (Outer Fit)") == resize_mode(2) == "resize_and_fill"
    with pytest.raises(ValueError, match=r"unknown control mode 'strong'; choose from: balanced"):
        control_mode("strong")
    with pytest.raises(ValueError, match=r"unknown resize mode 'fit'; choose from: just_resize"):
        resize_mode("fit")


def wide_image() -> Image.Image:
    """200x100: a red band at the left and right ends, a black square in the middle, on a
    white ground."""
    image = Image.new("RGB", (200, 100), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 24, 99), fill="red")
    draw.rectangle((175, 0, 199, 99), fill="red")
    draw.rectangle((90, 40, 109, 59), fill="black")
    return image


def test_just_resize_stretches():
    out = np.asarray(resize_control_image(wide_image(), 100, 100, "just_resize"))
    assert out.shape == (100, 100, 3)
    assert out[50, 5].tolist() == [255, 0, 0] and out[50, 94].tolist() == [255, 0, 0]


def test_crop_and_resize_covers_and_crops_the_sides():
    out = np.asarray(resize_control_image(wide_image(), 100, 100, "crop_and_resize"))
    assert out.shape == (100, 100, 3)
    assert (out[:, :, 1] > 200).mean() > 0.9  # the red ends are cut away ...
    assert out[50, 50].tolist() == [0, 0, 0]  # ... the centre kept at full scale
    assert (out[:, :, 1] < 50).sum() == pytest.approx(400, abs=60)


def test_resize_and_fill_fits_and_pads_with_the_border_colour():
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    ImageDraw.Draw(image).rectangle((90, 40, 109, 59), fill="white")
    out = np.asarray(resize_control_image(image, 100, 100, "resize_and_fill"))
    assert out.shape == (100, 100, 3)
    assert (out[:20] == [10, 20, 30]).all() and (out[-20:] == [10, 20, 30]).all()
    assert out[50, 50].tolist() == [255, 255, 255]


def test_hint_tensor():
    hint = hint_tensor(wide_image(), 64, 32, "just_resize")
    assert hint.shape == (1, 3, 32, 64) and hint.dtype == torch.float32
    assert hint.min() >= 0 and hint.max() <= 1 and hint[0, :, 16, 2].tolist() == [1.0, 0.0, 0.0]
