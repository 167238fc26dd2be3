"""PIL / NumPy / tensor conversions and masks."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd_pipeline.images import (
    image_grid,
    mask_to_tensor,
    numpy_to_pil,
    pil_to_numpy,
    pil_to_tensor,
    tensor_to_pil,
    to_mask,
    to_pil,
)


def _random_image(w=24, h=16, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_pil_tensor_round_trip_is_exact():
    im = _random_image()
    t = pil_to_tensor(im)
    assert t.shape == (1, 3, 16, 24) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)[0]), np.asarray(im))


def test_tensor_values_map_to_pixels_like_diffusers():
    t = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert np.asarray(tensor_to_pil(t)[0])[0, :, 0].tolist() == [0, 128, 255, 255]


def test_numpy_round_trip():
    im = _random_image()
    a = pil_to_numpy(im)
    assert a.shape == (16, 24, 3) and a.dtype == np.float32 and a.max() <= 1
    assert np.array_equal(np.asarray(numpy_to_pil(a)[0]), np.asarray(im))
    assert len(numpy_to_pil(np.zeros((2, 4, 4, 3), np.uint8))) == 2


def test_to_pil_accepts_all_kinds():
    im = _random_image()
    for x in (im, np.asarray(im), pil_to_tensor(im), pil_to_tensor(im)[0]):
        assert np.array_equal(np.asarray(to_pil(x)), np.asarray(im))
    with pytest.raises(TypeError, match="PIL image"):
        to_pil("image.png")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tensor_to_pil(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="share a size"):
        pil_to_tensor([_random_image(8, 8), _random_image(16, 8)])


def test_masks():
    # Transparency makes the alpha the mask (AUTOMATIC1111's create_binary_mask): a fully
    # transparent white mask keeps everything; a fully opaque one is read by its grey level.
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert to_mask(rgba).mode == "L" and np.asarray(to_mask(rgba)).max() == 0
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert np.asarray(to_mask(opaque)).min() == 255
    arr = np.zeros((8, 8), bool)
    arr[:4] = True
    m = mask_to_tensor(to_mask(arr))
    assert m.shape == (1, 1, 8, 8) and m[0, 0, :4].eq(1).all() and m[0, 0, 4:].eq(0).all()
    soft = mask_to_tensor(to_mask(arr), blur=2)
    assert 0 < soft[0, 0, 4, 0] < 1  # the edge is soft
    grey = Image.fromarray(np.full((8, 8), 100, np.uint8))
    assert mask_to_tensor(grey).eq(0).all()  # binarised at 0.5
    with pytest.raises(ValueError, match="greyscale"):
        to_mask(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="mask is 8x8 but the image is 16x8"):
        to_mask(arr, size=(16, 8))


def test_grid():
    g = image_grid([_random_image(8, 8, s) for s in range(5)])
    assert g.size == (24, 16)
