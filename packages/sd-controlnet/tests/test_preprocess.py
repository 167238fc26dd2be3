"""The preprocessors against OpenCV (what AUTOMATIC1111's extension runs) and against what
they must give on simple synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sd_controlnet import PREPROCESSORS, preprocess
from sd_controlnet.preprocess import blur_gaussian, canny

cv2 = pytest.importorskip("cv2")


def square(size=64, box=(16, 20, 47, 43), fill=200, back=30) -> Image.Image:
    image = Image.new("RGB", (size, size), (back, back, back))
    ImageDraw.Draw(image).rectangle(box, fill=(fill, fill // 2, fill))
    return image


def photo(seed=0, size=(72, 56)) -> Image.Image:
    """A smooth random colour image with some sharp shapes: edges of every direction."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (size[1] // 8, size[0] // 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 8, 40, 38), fill=(250, 20, 90))
    draw.polygon([(50, 5), (70, 30), (45, 50)], fill=(10, 200, 40))
    draw.line((0, 55, 71, 0), fill=(255, 255, 255), width=2)
    return image


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_canny_of_a_square_is_its_outline():
    edges = arr(canny(square()))[:, :, 0] > 0
    ys, xs = np.nonzero(edges)
    # every edge pixel is within a pixel of the square's border, and the border is closed
    near_x = (np.abs(xs - 16) <= 1) | (np.abs(xs - 47) <= 1)
    near_y = (np.abs(ys - 20) <= 1) | (np.abs(ys - 43) <= 1)
    assert edges.any() and (near_x | near_y).all()
    assert (edges[20:44, 14:19].any(axis=1)).all() and (edges[20:44, 45:50].any(axis=1)).all()
    assert (edges[18:23, 16:48].any(axis=0)).all() and (edges[41:46, 16:48].any(axis=0)).all()
    assert not edges[25:39, 21:43].any()  # nothing inside


@pytest.mark.parametrize("low, high", [(100, 200), (30, 90), (200, 100)])
@pytest.mark.parametrize("seed", [0, 1])
def test_canny_matches_opencv(seed, low, high):
    image = photo(seed)
    want = cv2.Canny(arr(image), low, high)
    got = arr(canny(image, low_threshold=low, high_threshold=high))
    assert (got[:, :, 0] == want).all(), (got[:, :, 0] != want).sum()  # pixel for pixel
    assert (got[:, :, 0] == got[:, :, 2]).all()


@pytest.mark.parametrize("sigma", [1.0, 2.5, 9.0])
def test_blur_gaussian_matches_opencv(sigma):
    image = photo(2)
    want = cv2.GaussianBlur(arr(image), (0, 0), sigma)
    got = arr(blur_gaussian(image, sigma=sigma))
    assert np.abs(got.astype(int) - want).max() <= 1


def test_tile_resample_matches_opencv_area():
    image = photo(3, size=(80, 64))
    want = cv2.resize(arr(image), (40, 32), interpolation=cv2.INTER_AREA)
    got = arr(preprocess("tile_resample", image, down_sampling_rate=2.0))
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1
    assert preprocess("tile_resample", image).size == image.size  # below 1.1: unchanged


def test_color_grid_matches_opencv():
    image = photo(4, size=(256, 192))
    small = cv2.resize(arr(image), (4, 3), interpolation=cv2.INTER_CUBIC)
    want = cv2.resize(small, (256, 192), interpolation=cv2.INTER_NEAREST)
    got = arr(preprocess("color", image))
    assert np.abs(got.astype(int) - want).max() <= 2


def test_scribble_xdog_matches_opencv():
    image = photo(5)
    x = arr(image).astype(np.float32)
    g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    want = (2 * (255 - dog.astype(int)) > 32) * 255
    got = arr(preprocess("scribble_xdog", image, threshold=32))[:, :, 0]
    assert (got == want).mean() > 0.995


def test_lineart_standard_matches_opencv():
    image = photo(6)
    x = arr(image).astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    want = intensity.clip(0, 255).astype(np.uint8)
    got = arr(preprocess("lineart_standard", image))[:, :, 0]
    assert np.abs(got.astype(int) - want).max() <= 1


def test_binary_otsu_matches_opencv():
    image = photo(7)
    gray = cv2.cvtColor(arr(image), cv2.COLOR_RGB2GRAY)
    _, want = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    got = arr(preprocess("binary", image))[:, :, 0]
    assert (got == want).mean() > 0.99
    _, want = cv2.threshold(gray, 100, 255, cv2.THRESH_BINARY_INV)
    got = arr(preprocess("binary", image, threshold_a=100))[:, :, 0]
    assert (got == want).mean() > 0.99


def test_threshold_and_invert():
    image = square(fill=200, back=30)
    out = arr(preprocess("threshold", image, threshold=127))
    assert out[30, 30].tolist() == [0, 0, 0]  # the square's green is 100: below 127
    assert arr(preprocess("threshold", image, threshold=90))[30, 30].tolist() == [255] * 3
    assert out[0, 0].tolist() == [0, 0, 0]
    assert (arr(preprocess("invert", image)) == 255 - arr(image)).all()


def test_shuffle_keeps_colours_moves_layout():
    image = photo(8, size=(64, 64))
    a = arr(preprocess("shuffle", image, seed=1))
    assert (a == arr(preprocess("shuffle", image, seed=1))).all()
    assert not (a == arr(preprocess("shuffle", image, seed=2))).all()
    assert not (a == arr(image)).all()
    src = arr(image)
    assert (a.min(axis=(0, 1)) >= src.min(axis=(0, 1))).all()
    assert (a.max(axis=(0, 1)) <= src.max(axis=(0, 1))).all()
    flat = Image.new("RGB", (40, 30), (12, 34, 56))
    assert (arr(preprocess("shuffle", flat, seed=0)) == [12, 34, 56]).all()


def test_api_thresholds_and_processor_res():
    image = photo(9)
    by_name = preprocess("canny", image, low_threshold=50, high_threshold=120)
    by_api = preprocess("canny", image, threshold_a=50, threshold_b=120)
    assert (arr(by_name) == arr(by_api)).all()
    assert (arr(preprocess("canny", image, threshold_a=-1, threshold_b=-1))
            == arr(canny(image))).all()  # fmt: skip
    assert preprocess("invert", image, processor_res=28).size == (36, 28)


def test_every_preprocessor_gives_an_rgb_image_of_the_size():
    image = photo(10)
    for name in PREPROCESSORS:
        out = preprocess(name, image)
        assert out.mode == "RGB" and (name == "tile_resample" or out.size == image.size), name


def test_unknown_preprocessor_and_parameter_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"unknown preprocessor 'depth_midas'; choose from: none, canny"
    ):
        preprocess("depth_midas", square())
    with pytest.raises(ValueError, match="'canny' takes low_threshold, high_threshold; got sigma"):
        preprocess("canny", square(), sigma=3)
