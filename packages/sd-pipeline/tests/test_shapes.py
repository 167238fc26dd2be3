import math

import numpy as np
import pytest
from PIL import Image

from sd_pipeline.training import shapes
from sd_pipeline.training.shapes import (
    COLORS,
    SHAPES,
    Scene,
    ShapesConfig,
    held_out_combinations,
    iter_batches,
    render,
    scenes,
    shape_mask,
    train_combinations,
    write_dataset,
)

# Issue 8's palette, typed out independently of the module.
ISSUE_PALETTE = {
    "red": (0xDC, 0x26, 0x26),
    "orange": (0xF9, 0x73, 0x16),
    "yellow": (0xFA, 0xCC, 0x15),
    "green": (0x16, 0xA3, 0x4A),
    "cyan": (0x06, 0xB6, 0xD4),
    "blue": (0x25, 0x63, 0xEB),
    "purple": (0x7C, 0x3A, 0xED),
    "pink": (0xEC, 0x48, 0x99),
    "white": (0xF5, 0xF5, 0xF5),
    "black": (0x17, 0x17, 0x17),
    "gray": (0x73, 0x73, 0x73),
    "brown": (0x92, 0x40, 0x0E),
}


def test_palette_matches_issue():
    assert set(COLORS) == set(ISSUE_PALETTE)
    for name, value in ISSUE_PALETTE.items():
        assert shapes.rgb(name) == value
    assert SHAPES == ("circle", "square", "triangle")


def test_render_uses_exact_colours_and_caption():
    scene = Scene("orange", "triangle", "cyan", size=40, cx=32, cy=32)
    image = render(scene, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    colours = {tuple(int(v) for v in p) for p in image.reshape(-1, 3)}
    assert colours == {ISSUE_PALETTE["orange"], ISSUE_PALETTE["cyan"]}
    assert scene.caption == "a orange triangle on a cyan background"
    assert tuple(image[0, 0]) == ISSUE_PALETTE["cyan"]
    assert tuple(image[40, 32]) == ISSUE_PALETTE["orange"]


@pytest.mark.parametrize(
    ("shape", "fill"), [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)]
)
def test_shape_geometry(shape, fill):
    mask = shape_mask(shape, 200, 150, 150, 300)
    rows, cols = np.nonzero(mask)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(h - 200) <= 1 and abs(w - 200) <= 1
    assert mask.sum() / (h * w) == pytest.approx(fill, abs=0.01)
    widths = mask[rows.min() : rows.max() + 1].sum(axis=1)
    if shape == "triangle":  # upright: apex at the top
        assert widths[5] < widths[-5] / 10
    else:
        assert widths[50] == pytest.approx(widths[-51], abs=1)


def test_held_out_rule():
    held = held_out_combinations()
    train = train_combinations()
    assert len(held) + len(train) == 12 * 11 * 3
    assert len(held) == 32
    assert not set(held) & set(train)
    # Every pairing of two of the three attributes is still seen in training.
    for c, s, b in held:
        assert any(t[0] == c and t[1] == s for t in train)
        assert any(t[0] == c and t[2] == b for t in train)
        assert any(t[1] == s and t[2] == b for t in train)
    assert ("red", "circle", "red") not in held + train


def test_scenes_deterministic_and_respect_held_out():
    config = ShapesConfig()
    a, b = scenes(3, 50, config), scenes(3, 50, config)
    assert a == b
    assert a != scenes(4, 50, config)
    held = set(held_out_combinations())
    assert all((s.color, s.shape, s.background) not in held for s in scenes(0, 500))
    only = scenes(0, 50, ShapesConfig(held_out="only"))
    assert all((s.color, s.shape, s.background) in held for s in only)
    for s in a:  # within the margins
        lo = config.margin * 64
        assert s.cx - s.size / 2 >= lo - 1e-9 and s.cx + s.size / 2 <= 64 - lo + 1e-9
        assert 0.45 * 64 <= s.size <= 0.75 * 64


def test_iter_batches_matches_render():
    images, captions = next(iter_batches(7, 4))
    assert images.shape == (4, 64, 64, 3) and len(captions) == 4
    again, captions2 = next(iter_batches(7, 4))
    assert captions == captions2 and np.array_equal(images, again)
    assert all(c.startswith("a ") and c.endswith(" background") for c in captions)


def test_write_dataset(tmp_path):
    drawn = write_dataset(tmp_path / "d", 3, seed=1, config=ShapesConfig(resolution=72))
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files == [f"00000{i}.{e}" for i in range(3) for e in ("png", "txt")]
    for i, scene in enumerate(drawn):
        pixels = np.asarray(Image.open(tmp_path / "d" / f"00000{i}.png"))
        assert np.array_equal(pixels, render(scene, 72))
        text = (tmp_path / "d" / f"00000{i}.txt").read_text().strip()
        assert text == f"a {scene.color} {scene.shape} on a {scene.background} background"


def test_cli(tmp_path):
    shapes.main([str(tmp_path), "--count", "2", "--seed", "5", "--no-jitter"])
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_bad_config():
    with pytest.raises(ValueError, match="at least 64"):
        ShapesConfig(resolution=32)
    with pytest.raises(ValueError, match="max_size"):
        ShapesConfig(min_size=0.9, max_size=0.95)
    with pytest.raises(ValueError, match="held_out"):
        ShapesConfig(held_out="maybe")
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        shapes.rgb("teal")
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        shape_mask("star", 10, 5, 5, 64)
