import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd_pipeline.training import evaluate as ev
from sd_pipeline.training.shapes import (
    Scene,
    ShapesConfig,
    all_combinations,
    is_held_out,
    random_scene,
    render,
    rgb,
)


def centred(combo, res=64):
    return Scene(*combo, size=0.6 * res, cx=res / 2, cy=res / 2)


def test_reads_every_combination():
    wrong = []
    for combo in all_combinations():
        r = ev.analyse(render(centred(combo)))
        if (r.color, r.shape, r.background) != combo:
            wrong.append((combo, r))
    assert not wrong


def test_reads_random_sizes_positions_and_resolutions():
    rng = np.random.default_rng(1)
    for res in (64, 96):
        config = ShapesConfig(resolution=res, held_out="include")
        for _ in range(40):
            s = random_scene(rng, config)
            r = ev.analyse(Image.fromarray(render(s, res)))
            assert (r.color, r.shape, r.background) == (s.color, s.shape, s.background), s


def test_robust_to_blur_and_noise():
    rng = np.random.default_rng(2)
    for combo in [
        ("red", "circle", "blue"),
        ("black", "triangle", "gray"),
        ("white", "square", "yellow"),
    ]:
        img = Image.fromarray(render(centred(combo))).filter(ImageFilter.GaussianBlur(1.5))
        a = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (64, 64, 3))
        r = ev.analyse(np.clip(a, 0, 255).astype(np.uint8))
        assert (r.color, r.shape, r.background) == combo


def test_tells_shapes_apart():
    for shape in ("circle", "square", "triangle"):
        r = ev.analyse(render(centred(("green", shape, "pink"))))
        assert r.shape == shape
    # An upside-down triangle is not read as a triangle (apex must be up).
    img = render(centred(("green", "triangle", "pink")))[::-1]
    assert ev.analyse(img).shape != "triangle"
    # A wide rectangle (fill 1, taper 1) is a square to the analyser, a half disc is not.
    img = np.full((64, 64, 3), rgb("blue"), np.uint8)
    y, x = np.mgrid[0:64, 0:64] + 0.5
    img[((x - 32) ** 2 + (y - 40) ** 2 <= 400) & (y >= 40)] = rgb("red")
    assert ev.analyse(img).shape != "square"


def test_blank_and_bad_images():
    r = ev.analyse(np.full((64, 64, 3), rgb("gray"), np.uint8))
    assert r.background == "gray" and r.color is None and r.shape is None
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ev.analyse(np.zeros((64, 64), np.uint8))


def test_evaluation_prompts():
    scenes = ev.evaluation_prompts(240)
    assert len(scenes) == 240 and scenes == ev.evaluation_prompts(240)
    held = [s for s in scenes if is_held_out(*s)]
    assert len(held) == 80
    assert len({s for s in scenes if not is_held_out(*s)}) == 160


class FakePipe:
    """Draws the prompt's scene exactly, or a fixed wrong answer."""

    def __init__(self, fixed=None):
        self.fixed = fixed
        self.calls = 0

    def txt2img(self, prompts, steps=20, seed=0, progress=True, **kw):
        out = []
        for prompt in prompts:
            self.calls += 1
            m = re.fullmatch(r"a (\w+) (\w+) on a (\w+) background", prompt)
            out.append(Image.fromarray(render(centred(self.fixed or m.groups()))))
        return out


def test_evaluate_perfect_and_wrong_pipes():
    result = ev.evaluate(FakePipe(), 30, steps=1)
    for group in ("seen", "held_out", "total"):
        assert result[group]["color"] == result[group]["shape"] == 1.0
        assert result[group]["background"] == result[group]["all"] == 1.0
    assert result["held_out"]["count"] == 10 and result["seen"]["count"] == 20
    pipe = FakePipe(("red", "circle", "blue"))
    result = ev.evaluate(pipe, 30, steps=1)
    assert pipe.calls == 30
    scenes = ev.evaluation_prompts(30)
    expect = sum(s[0] == "red" for s in scenes) / 30
    assert result["total"]["color"] == pytest.approx(expect)
    assert result["total"]["all"] < 0.2
    assert "held_out" in ev.format_report(result)


def test_score_length_mismatch():
    with pytest.raises(ValueError, match="2 scenes but 1 images"):
        ev.score([("red", "circle", "blue")] * 2, [np.zeros((64, 64, 3), np.uint8)])
