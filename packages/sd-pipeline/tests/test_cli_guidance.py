"""sd-generate's --guidance-rescale, --zero-terminal-snr and --prediction: in the PNG under
AUTOMATIC1111's field names, and read back by --from-png (also under the extensions' other
names)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_cli import run  # noqa: F401  (the fixture)

from sd_pipeline.metadata import GenerationParameters, read_parameters, save_image

SIZE = ("--width", "32", "--height", "32", "--seed", "3", "--sampler", "euler")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def test_rescale_and_zero_snr_round_trip_through_a_png(run, tmp_path):  # noqa: F811
    first, plain, again = (tmp_path / f"{n}.png" for n in ("first", "plain", "again"))
    code, _, err = run("a cat", "-o", str(first), *SIZE, "--guidance-rescale", "0.7",
                       "--zero-terminal-snr")  # fmt: skip
    assert code == 0, err
    params = read_parameters(first)
    assert params.extra["CFG Rescale φ"] == "0.7"
    assert params.extra["Noise Schedule"] == "Zero Terminal SNR"
    assert run("a cat", "-o", str(plain), *SIZE)[0] == 0
    assert "CFG Rescale φ" not in read_parameters(plain).extra
    assert np.abs(_pixels(first) - _pixels(plain)).max() > 0  # the options change the image
    code, _, err = run("--from-png", str(first), "-o", str(again))
    assert code == 0, err
    assert np.array_equal(_pixels(first), _pixels(again))
    assert read_parameters(again) == params


@pytest.mark.parametrize("field", ["CFG Rescale phi", "CFG Rescale"])
def test_from_png_reads_the_extensions_names(run, tmp_path, field):  # noqa: F811
    """Neutral Prompt writes "CFG Rescale phi", Seshelle's CFG Rescale extension "CFG
    Rescale": both are the same phi, written back as "CFG Rescale φ"."""
    source = tmp_path / "a1111.png"
    params = GenerationParameters(prompt="a dog", steps=2, sampler="euler", cfg_scale=5, seed=1,
                                  width=32, height=32, extra={field: "0.5"})  # fmt: skip
    save_image(Image.new("RGB", (32, 32)), source, params)
    out = tmp_path / "out.png"
    code, _, err = run("--from-png", str(source), "-o", str(out))
    assert code == 0, err
    assert read_parameters(out).extra["CFG Rescale φ"] == "0.5"


def test_bad_rescale_and_prediction(run, tmp_path, capsys):  # noqa: F811
    code, _, err = run("x", "--guidance-rescale", "1.5", "-o", str(tmp_path / "a.png"))
    assert code == 2 and "--guidance-rescale must be in [0, 1]" in err
    with pytest.raises(SystemExit):
        run("x", "--prediction", "sample", "-o", str(tmp_path / "a.png"))
    assert "invalid choice: 'sample'" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_prediction_flag_overrides_the_files(run, tmp_path):  # noqa: F811
    eps, v = tmp_path / "eps.png", tmp_path / "v.png"
    assert run("a cat", "-o", str(eps), *SIZE)[0] == 0
    code, _, err = run("a cat", "-o", str(v), *SIZE, "--prediction", "v")
    assert code == 0, err
    assert np.abs(_pixels(eps) - _pixels(v)).max() > 0


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(guidance_rescale=float("nan")), "guidance_rescale must be a finite number"),
        (dict(guidance_rescale=-0.1), r"guidance_rescale must be in \[0, 1\]"),
        (dict(zero_terminal_snr="yes"), "zero_terminal_snr must be True or False"),
    ],
)
def test_request_checks_the_new_fields(fields, message):
    from sd_pipeline.request import GenerationRequest, RequestError

    with pytest.raises(RequestError, match=message):
        GenerationRequest(**fields).check()
