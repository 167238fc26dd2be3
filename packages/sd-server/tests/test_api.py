"""The API driven by ``webuiapi`` (the PyPI client scripts use, written against AUTOMATIC1111):
pictures, metadata and seeds checked against sd-pipeline run directly on the same checkpoint."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import webuiapi
from conftest import wait_for as _wait_for
from PIL import Image

from sd_pipeline import GenerationParameters

SMALL = dict(width=32, height=32)


def api(server) -> webuiapi.WebUIApi:
    user, password = server.auth or (None, None)
    return webuiapi.WebUIApi(host=server.host, port=server.port, username=user, password=password)


def close(a: Image.Image, b: Image.Image) -> bool:
    """Same picture: float sums round apart between thread counts and batch shapes (the server
    runs on 2 threads, the test on 1), by a level of 255 on most pixels and, through the random
    weights' steep spots, a few more on some; different seeds differ by tens on average."""
    x, y = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    if x.shape != y.shape:
        return False
    difference = np.abs(x - y)
    return float(difference.mean()) < 0.5 and int(difference.max()) <= 32


def params_of(image: Image.Image) -> GenerationParameters:
    return GenerationParameters.from_text(image.info["parameters"])


def test_txt2img_matches_the_pipeline(server, pipe):
    result = api(server).txt2img(prompt="a red circle", negative_prompt="blurry", seed=1234,
                                 steps=3, cfg_scale=5, batch_size=2, sampler_name="Euler a",
                                 **SMALL)  # fmt: skip
    assert [im.size for im in result.images] == [(32, 32), (32, 32)]
    assert result.info["all_seeds"] == [1234, 1235]
    assert result.info["seed"] == 1234
    assert result.info["sd_model_name"] == "tiny"
    assert result.info["warnings"] == []
    for image, seed, text in zip(result.images, [1234, 1235], result.info["infotexts"]):
        p = params_of(image)
        assert image.info["parameters"] == text
        assert (p.prompt, p.negative_prompt, p.seed, p.steps) == ("a red circle", "blurry", seed, 3)
        assert (p.sampler, p.cfg_scale, p.width, p.height) == ("euler_a", 5.0, 32, 32)
    direct = pipe.txt2img("a red circle", "blurry", steps=3, guidance_scale=5, seed=1234,
                          sampler="euler_a", batch_size=2, progress=False, **SMALL)  # fmt: skip
    assert all(close(a, b) for a, b in zip(result.images, direct))
    assert not close(result.images[0], result.images[1])


def test_random_seed_is_reported_and_repeats(server):
    client = api(server)
    result = client.txt2img(prompt="x", seed=-1, steps=2, batch_size=2, **SMALL)
    first, second = result.info["all_seeds"]
    assert first >= 0 and second == first + 1
    again = client.txt2img(prompt="x", seed=second, steps=2, **SMALL)
    assert again.info["all_seeds"] == [second]
    assert close(again.images[0], result.images[1])


def test_n_iter_numbers_seeds_like_automatic1111(server):
    result = api(server).txt2img(prompt="x", seed=7, steps=2, batch_size=2, n_iter=2, **SMALL)
    assert result.info["all_seeds"] == [7, 8, 9, 10]
    assert [params_of(im).seed for im in result.images] == [7, 8, 9, 10]


def test_sampler_labels_schedulers_and_our_names(server):
    client = api(server)
    for name, scheduler, ours in [("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
                                  ("DPM++ 2M Karras", "automatic", "dpmpp_2m_karras"),
                                  ("dpmpp_2m", None, "dpmpp_2m"), ("DDIM", None, "ddim")]:  # fmt: skip
        result = client.txt2img(prompt="x", seed=1, steps=2, sampler_name=name,
                                scheduler=scheduler, **SMALL)  # fmt: skip
        assert params_of(result.images[0]).sampler == ours


def test_img2img_and_inpaint(server, pipe):
    client = api(server)
    start = Image.new("RGB", (32, 32), (200, 30, 30))
    result = client.img2img(images=[start], prompt="x", denoising_strength=0.5, steps=4, seed=3,
                            cfg_scale=7, sampler_name="Euler", **SMALL)  # fmt: skip
    p = params_of(result.image)
    assert result.image.size == (32, 32) and p.denoising_strength == 0.5 and p.seed == 3
    direct = pipe.img2img("x", start, strength=0.5, steps=4, seed=3, guidance_scale=7,
                          sampler="euler", progress=False)  # fmt: skip
    assert close(result.image, direct[0])

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    result = client.img2img(images=[start], mask_image=mask, prompt="x", denoising_strength=1.0,
                            steps=3, seed=3, mask_blur=0, **SMALL)  # fmt: skip
    pixels = np.asarray(result.image.convert("RGB"))
    assert (pixels[:, 16:] == (200, 30, 30)).all()  # kept: the original pixels pasted back
    assert not (pixels[:, :16] == (200, 30, 30)).all()
    # webuiapi sends AUTOMATIC1111's inpaint_full_res=True, which this server does not do
    assert any("inpaint_full_res" in w for w in result.info["warnings"])

    inverted = client.img2img(images=[start], mask_image=mask, inpainting_mask_invert=1,
                              prompt="x", denoising_strength=1.0, steps=3, seed=3, mask_blur=0,
                              **SMALL)  # fmt: skip
    pixels = np.asarray(inverted.image.convert("RGB"))
    assert (pixels[:, :16] == (200, 30, 30)).all()


def test_png_info_reads_what_txt2img_wrote(server):
    client = api(server)
    image = client.txt2img(prompt="a blue square", seed=42, steps=2, **SMALL).image
    info = client.png_info(image)
    assert info.info == image.info["parameters"]
    assert info.json["parameters"]["Seed"] == 42
    assert info.json["parameters"]["Prompt"] == "a blue square"
    plain = client.png_info(Image.new("RGB", (8, 8)))
    assert plain.info == ""


def test_lists(server, models):
    client = api(server)
    labels = [s["name"] for s in client.get_samplers()]
    assert "Euler a" in labels and "DPM++ 2M Karras" in labels
    assert {"automatic", "karras"} <= {s["name"] for s in client.get_schedulers()}
    titles = [m["title"] for m in client.get_sd_models()]
    assert titles[:2] == ["tiny.safetensors", "other.safetensors"]
    assert [lora["name"] for lora in client.get_loras()] == ["style"]
    assert list(client.get_embeddings()["loaded"]) == ["badhands"]
    assert client.get_sd_vae() == []
    (models["root"] / "models" / "late.safetensors").write_bytes(b"")
    client.refresh_checkpoints()
    assert "late.safetensors" in client.util_get_model_names()
    (models["root"] / "models" / "late.safetensors").unlink()
    client.refresh_checkpoints()


def test_set_options_switches_the_model(server):
    client = api(server)
    assert client.get_options()["sd_model_checkpoint"] == "tiny.safetensors"
    client.set_options({"sd_model_checkpoint": "other.safetensors", "CLIP_stop_at_last_layers": 2})
    try:
        # queued behind the switch, so it runs on the new model
        result = client.txt2img(prompt="x", seed=1, steps=2, **SMALL)
        assert result.info["sd_model_name"] == "other"
        assert params_of(result.image).clip_skip == 2
        options = client.get_options()
        assert options["sd_model_checkpoint"] == "other.safetensors"
        assert options["CLIP_stop_at_last_layers"] == 2
    finally:
        client.set_options({"sd_model_checkpoint": "tiny.safetensors",
                            "CLIP_stop_at_last_layers": 1})  # fmt: skip
    assert client.txt2img(prompt="x", seed=1, steps=2, **SMALL).info["sd_model_name"] == "tiny"


def test_a_model_that_does_not_load_leaves_the_current_one(server, models):
    broken = models["root"] / "models" / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    client = api(server)
    try:
        client.refresh_checkpoints()
        client.set_options({"sd_model_checkpoint": "broken.safetensors"})
        options = _wait_for(lambda: (o := client.get_options())["sd_model_loading"] is None and o)
        assert options["sd_model_checkpoint"] == "tiny.safetensors"
        assert "broken.safetensors" in options["sd_model_error"]
        result = client.txt2img(prompt="x", seed=1, steps=1, **SMALL)
        assert result.info["sd_model_name"] == "tiny"
    finally:
        broken.unlink()
        client.refresh_checkpoints()


def test_progress_interrupt_and_skip(server):
    client = api(server)
    answers = {}

    def long_job():
        answers["result"] = client.txt2img(prompt="x", seed=5, steps=400, n_iter=2, **SMALL)

    worker = threading.Thread(target=long_job)
    worker.start()
    seen = _wait_for(lambda: (p := client.get_progress())["state"]["sampling_step"] >= 2 and p)
    assert seen["state"]["job"] == "txt2img" and seen["state"]["sampling_steps"] == 400
    assert seen["state"]["job_count"] == 2 and 0 < seen["progress"] < 0.5
    preview = Image.open(io.BytesIO(__import__("base64").b64decode(seen["current_image"])))
    assert preview.size == (32, 32)
    client.skip()  # the first iteration stops, the second starts
    _wait_for(lambda: (s := client.get_progress()["state"])["job_no"] == 1 and s["sampling_step"])
    client.interrupt()
    worker.join(60)
    assert not worker.is_alive()
    result = answers["result"]
    assert len(result.images) == 2 and result.info["interrupted"] is True
    assert result.info["all_seeds"] == [5, 6]
    assert client.get_progress()["state"]["job"] == ""
    client.util_wait_for_ready(check_interval=0.1)  # webuiapi's own idea of idle


def test_concurrent_requests_are_all_answered_in_their_own_order(server, pipe):
    def one(i: int):
        result = api(server).txt2img(prompt=f"prompt {i}", seed=100 + i, steps=2, **SMALL)
        return i, result

    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(one, range(16)))
    assert sorted(results) == list(range(16))
    for i, result in results.items():
        assert len(result.images) == 1
        assert result.info["all_seeds"] == [100 + i]
        assert params_of(result.images[0]).prompt == f"prompt {i}"
    for i in (0, 11):  # the pictures too belong to their requests
        # webuiapi's defaults: Euler a, CFG 7
        direct = pipe.txt2img(f"prompt {i}", steps=2, seed=100 + i, sampler="euler_a",
                              guidance_scale=7, progress=False, **SMALL)  # fmt: skip
        assert close(results[i].images[0], direct[0])


def test_a_client_that_leaves_takes_its_job_with_it(server):
    import httpx

    with server.client() as client:
        before = client.get("/internal/queue").json()["completed"]
        with pytest.raises(httpx.ReadTimeout):
            client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1000, **SMALL},
                        timeout=2.0)  # fmt: skip
        queue = _wait_for(lambda: (q := client.get("/internal/queue").json())["running"] is None
                          and q, timeout=30)  # fmt: skip
        assert queue["completed"] == before + 1
        # stopped well before its 1000 steps: the next request is answered at once
        start = time.monotonic()
        assert client.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **SMALL}
        ).is_success
        assert time.monotonic() - start < 20


def test_a_waiting_client_that_leaves_is_dropped_from_the_queue(server):
    import httpx

    answers = {}

    def long_job():
        with server.client() as c:
            answers["long"] = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1000,
                                                                **SMALL})  # fmt: skip

    with server.client() as client:
        before = client.get("/internal/queue").json()["completed"]
        runner = threading.Thread(target=long_job)
        runner.start()
        _wait_for(lambda: client.get("/internal/queue").json()["running"] == "txt2img")
        with pytest.raises(httpx.ReadTimeout):
            client.post("/sdapi/v1/txt2img", json={"prompt": "y", **SMALL}, timeout=1.5)
        _wait_for(lambda: client.get("/internal/queue").json()["waiting"] == 0, timeout=10)
        client.post("/sdapi/v1/interrupt")
        runner.join(60)
        assert answers["long"].status_code == 200
        # the long job ran (interrupted); the one whose client left never did
        _wait_for(lambda: client.get("/internal/queue").json()["running"] is None)
        assert client.get("/internal/queue").json()["completed"] == before + 1


def test_unknown_and_unsupported_fields_are_listed(server):
    with server.client() as client:
        answer = client.post("/sdapi/v1/txt2img", json={
            "prompt": "x <lora:missing:0.8>", "steps": 1, "foo": 1, "restore_faces": True,
            "styles": [], "tiling": False, "override_settings": {"sd_vae": "x"}, **SMALL})  # fmt: skip
    assert answer.status_code == 200
    info = __import__("json").loads(answer.json()["info"])
    text = " | ".join(info["warnings"])
    assert "foo" in text and "restore_faces" in text and "sd_vae" in text and "<lora:" in text
    assert "styles" not in text and "tiling" not in text
    assert info["prompt"] == "x "


def test_send_and_save_images(server):
    with server.client() as client:
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "seed": 77,
                             "send_images": False, "save_images": True, **SMALL}).json()  # fmt: skip
    assert answer["images"] == []
    saved = list((server.log.parent / "outputs" / "txt2img-images").glob("*-77.png"))
    assert len(saved) == 1
    assert "Seed: 77" in Image.open(saved[0]).info["parameters"]


def test_starts_on_loopback_and_says_so(server):
    assert "127.0.0.1" in server.output() and "loopback only" in server.output()


def test_loras_and_embeddings_apply(server):
    """<lora:...> tags in a prompt merge the --lora-dir LoRA for the run (AUTOMATIC1111's Lora
    hashes in the infotext); --embeddings are loaded and listed."""
    import json

    with server.client() as client:
        base = {"prompt": "x", "steps": 1, "seed": 5, **SMALL}
        plain = client.post("/sdapi/v1/txt2img", json=base).json()
        styled = client.post(
            "/sdapi/v1/txt2img", json={**base, "prompt": "x <lora:style:1>"}
        ).json()
        again = client.post("/sdapi/v1/txt2img", json=base).json()
        listed = client.get("/sdapi/v1/embeddings").json()
    assert styled["images"][0] != plain["images"][0]
    assert again["images"][0] == plain["images"][0]  # taken out after the run
    info = json.loads(styled["info"])
    assert "Lora hashes" in info["infotexts"][0] and not info.get("warnings")
    assert listed["loaded"]["badhands"]["vectors"] == 2


def test_controlnet_units_as_webuiapi_sends_them(server):
    """alwayson_scripts.controlnet.args (webuiapi.ControlNetUnit) runs the unit; the model list
    and module list are the extension's."""
    from PIL import Image as _Image

    api = globals()["api"](server)
    assert api.controlnet_model_list() == ["control_tiny"]
    assert "canny" in api.controlnet_module_list()
    image = _Image.new("RGB", (32, 32), "white")
    image.paste((0, 0, 0), (8, 8, 24, 24))
    base = dict(prompt="x", steps=2, seed=4, **SMALL)
    plain = api.txt2img(**base)
    unit = webuiapi.ControlNetUnit(image=image, module="canny", model="control_tiny [0123abcd]",
                                   weight=1.0)  # fmt: skip
    # a fresh alwayson_scripts each call: webuiapi fills its shared default dict in place, so
    # the unit would ride along with every later request of this process
    controlled = api.txt2img(**base, controlnet_units=[unit], alwayson_scripts={})
    assert controlled.image.tobytes() != plain.image.tobytes()
    assert "ControlNet 0" in controlled.info["infotexts"][0]
    missing = webuiapi.ControlNetUnit(image=image, model="nope")
    with pytest.raises(Exception, match="nope"):
        api.txt2img(**base, controlnet_units=[missing], alwayson_scripts={})
