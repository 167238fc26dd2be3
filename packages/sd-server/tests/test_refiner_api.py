"""AUTOMATIC1111's refiner fields (``refiner_checkpoint``, ``refiner_switch_at``) on a tiny SDXL
base with a tiny refiner in its models folder, checked against sd-pipeline run directly; and
sd-pipeline's ``guidance_rescale`` / ``zero_terminal_snr`` (our extensions) on the shared
server."""

from __future__ import annotations

import base64
import io
import json

import pytest
from conftest import start_server, stop_server
from PIL import Image
from sdxl_files import write_sdxl
from test_api import close, params_of

from sd_pipeline import StableDiffusion

XL = dict(width=64, height=64, steps=4, sampler_name="Euler", seed=21, prompt="a cat")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    (root / "models").mkdir()
    base = write_sdxl(root / "base.safetensors", "base", seed=0)
    refiner = write_sdxl(root / "models" / "refiner.safetensors", "refiner", seed=1)
    running = start_server(tmp_path_factory.mktemp("sdxl-server"), "--checkpoint", str(base),
                           "--models-dir", str(root / "models"))  # fmt: skip
    yield running, base, refiner
    stop_server(running)


def _txt2img(server, **body):
    with server.client() as client:
        return client.post("/sdapi/v1/txt2img", json=body)


def _image(server, **body) -> Image.Image:
    """The first picture of a txt2img answer (webuiapi's txt2img has no refiner arguments)."""
    answer = _txt2img(server, **body)
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    image.load()
    return image


def test_refiner_checkpoint_refines_as_the_pipeline_does(sdxl):
    server, base, refiner = sdxl
    answer = _txt2img(server, **XL, refiner_checkpoint="refiner", refiner_switch_at=0.5)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["warnings"] == []
    image = _image(server, **XL, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5)
    pipe = StableDiffusion.from_checkpoint(base, device="cpu")
    refiner_pipe = StableDiffusion.from_checkpoint(refiner, device="cpu")
    p = params_of(image)
    assert p.extra["Refiner"] == f"refiner [{refiner_pipe.model_hash}]"
    assert p.extra["Refiner switch at"] == "0.5"
    assert info["infotexts"][0] == image.info["parameters"]
    direct = pipe.txt2img("a cat", refiner=refiner_pipe, refiner_switch=0.5, seed=21, steps=4,
                          sampler="euler", width=64, height=64, progress=False)[0]  # fmt: skip
    assert close(image, direct)
    plain = _image(server, **XL)
    assert not close(plain, direct) and "Refiner" not in params_of(plain).extra
    # "None" (what AUTOMATIC1111's UI sends without a refiner) is no refiner; no switch: 0.8
    none = _image(server, **XL, refiner_checkpoint="None")
    assert "Refiner" not in params_of(none).extra
    default = _image(server, **XL, refiner_checkpoint="refiner")
    assert params_of(default).extra["Refiner switch at"] == "0.8"


def test_unknown_or_unusable_refiners_are_clear_errors(sdxl):
    server = sdxl[0]
    answer = _txt2img(server, **XL, refiner_checkpoint="nope")
    assert answer.status_code == 422
    assert answer.json()["detail"] == (
        "refiner_checkpoint 'nope' is not a known model; one of: base.safetensors, "
        "refiner.safetensors"
    )
    broken = sdxl[2].with_name("broken.safetensors")
    broken.write_bytes(b"not a checkpoint")
    try:
        with server.client() as client:
            client.post("/sdapi/v1/refresh-checkpoints")
        answer = _txt2img(server, **XL, refiner_checkpoint="broken")
        assert answer.status_code == 422
        assert answer.json()["detail"].startswith("refiner_checkpoint does not load as a refiner")
        assert "broken.safetensors" in answer.json()["detail"]
    finally:
        broken.unlink()
    answer = _txt2img(server, **XL, refiner_checkpoint="refiner", refiner_switch_at=1.5)
    assert answer.status_code == 422 and answer.json()["detail"].startswith(
        "refiner_switch_at must be in [0, 1]"
    )


def test_guidance_rescale_and_zero_terminal_snr(server, pipe):
    small = dict(prompt="a red circle", seed=5, steps=3, cfg_scale=7, width=32, height=32,
                 sampler_name="Euler")  # fmt: skip
    image = _image(server, **small, guidance_rescale=0.7, zero_terminal_snr=True)
    p = params_of(image)
    assert p.extra["CFG Rescale φ"] == "0.7"
    assert p.extra["Noise Schedule"] == "Zero Terminal SNR"
    direct = pipe.txt2img("a red circle", seed=5, steps=3, guidance_scale=7, width=32, height=32,
                          sampler="euler", guidance_rescale=0.7, zero_terminal_snr=True,
                          progress=False)[0]  # fmt: skip
    assert close(image, direct)
    assert not close(_image(server, **small), direct)
    for field, value, message in (("guidance_rescale", 2, "guidance_rescale must be in [0, 1]"),
                                  ("zero_terminal_snr", "yes", "must be true or false")):  # fmt: skip
        with server.client() as client:
            answer = client.post("/sdapi/v1/txt2img", json={**small, field: value})
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
