"""Every class of bad request gets a 422 (413 for a body too large) whose one-line detail names
the API field; never a 500, never a traceback. And a guarded server: credentials (401, and
nothing runs without them) and a bounded queue (503)."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

SMALL = {"width": 32, "height": 32, "steps": 1}


def png(size=(32, 32), colour=(10, 20, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_declaring(width: int, height: int) -> str:
    """A few hundred bytes of PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + data).decode()


TXT2IMG = [
    ({"steps": 0}, "steps"),
    ({"steps": "many"}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"steps": 100000}, "steps"),
    ({"cfg_scale": 1e9}, "cfg_scale"),
    ({"cfg_scale": "high"}, "cfg_scale"),
    ({"width": 33}, "width"),
    ({"width": 100000}, "width"),
    ({"height": -8}, "height"),
    ({"sampler_name": "Eular a"}, "sampler_name"),
    ({"sampler_name": "Euler a", "scheduler": "beta"}, "scheduler"),
    ({"seed": -5}, "seed"),
    ({"seed": "lucky"}, "seed"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 1000}, "batch_size"),
    ({"n_iter": 0}, "n_iter"),
    ({"n_iter": 500}, "n_iter"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x" * 100_001}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),  # a lone surrogate: not encodable text
    ({"steps": True}, "steps"),
    ({"negative_prompt": None}, "negative_prompt"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 9}}, "CLIP_stop_at_last_layers"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "CLIP_stop_at_last_layers"),
    ({"override_settings": "none"}, "override_settings"),
    ({"send_images": "perhaps"}, "send_images"),
]
IMG2IMG = [
    ({}, "init_images"),
    ({"init_images": []}, "init_images"),
    ({"init_images": "abc"}, "init_images"),
    ({"init_images": ["not base64 at all!"]}, "init_images[0]"),
    ({"init_images": [base64.b64encode(b"hello, world").decode()]}, "init_images[0]"),
    ({"init_images": [png_declaring(100_000, 100_000)]}, "init_images[0]"),  # PIL's bomb check
    ({"init_images": [png_declaring(5000, 5000)]}, "init_images[0]"),  # past 4096 a side
    ({"init_images": [png((30, 30))], "width": None}, "width"),
    ({"init_images": [png()], "denoising_strength": 2}, "denoising_strength"),
    ({"init_images": [png()], "mask": png((16, 16))}, "mask"),
    ({"init_images": [png()], "mask": "???"}, "mask"),
    ({"init_images": [png()], "mask": png(), "mask_blur": -1}, "mask_blur"),
]


def check_422(answer: httpx.Response, field: str) -> None:
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert field in detail, detail
    assert "Traceback" not in answer.text


@pytest.mark.parametrize(("fields", "field"), TXT2IMG, ids=[f for _, f in TXT2IMG])
def test_txt2img_422(server, fields, field):
    body = json.dumps({**SMALL, **fields})  # ASCII with \u escapes: a lone surrogate survives
    with server.client() as client:
        answer = client.post("/sdapi/v1/txt2img", content=body,
                             headers={"Content-Type": "application/json"})  # fmt: skip
        check_422(answer, field)


@pytest.mark.parametrize(("fields", "field"), IMG2IMG, ids=[str(i) for i in range(len(IMG2IMG))])
def test_img2img_422(server, fields, field):
    body = {k: v for k, v in {**SMALL, **fields}.items() if v is not None}
    with server.client() as client:
        check_422(client.post("/sdapi/v1/img2img", json=body), field)


def test_bodies_that_are_not_requests(server):
    with server.client() as client:
        deep = b"[" * 100_000 + b"]" * 100_000
        for content in (b'{"prompt": "x",', b"[1, 2]", b"prompt=x", b"", b"\xff\xfe", deep):
            answer = client.post("/sdapi/v1/txt2img", content=content,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
            assert answer.status_code == 422, (content, answer.text)
            assert isinstance(answer.json()["detail"], str)
        nan = client.post("/sdapi/v1/txt2img", content=b'{"cfg_scale": NaN, "steps": 1}',
                          headers={"Content-Type": "application/json"})  # fmt: skip
        check_422(nan, "cfg_scale")
        check_422(client.post("/sdapi/v1/png-info", json={"image": "garbage"}), "image")
        check_422(client.post("/sdapi/v1/png-info", json={}), "image")
        check_422(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}),
                  "sd_model_checkpoint")  # fmt: skip
        for value in ("x", 0, 9, True):
            check_422(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": value}),
                      "CLIP_stop_at_last_layers")  # fmt: skip
        # all or none: a bad option leaves the good ones unapplied
        check_422(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2,
                                                         "sd_model_checkpoint": "nope"}),
                  "sd_model_checkpoint")  # fmt: skip
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
        check_422(client.post("/sdapi/v1/options", json=[1]), "body")
        check_422(client.post("/sdapi/v1/options", content=deep), "body")


def test_oversize_body_is_refused(server):
    with server.client() as client:
        big = {"prompt": "x", "init_images": ["A" * (5 * 2**20)]}  # the server takes 4 MiB
        answer = client.post("/sdapi/v1/img2img", json=big)
        assert answer.status_code == 413 and "MiB" in answer.json()["detail"]
        assert client.get("/internal/ping").status_code == 200


def test_auth(guarded):
    url = guarded.url
    job = {"prompt": "x", **SMALL}
    with guarded.client() as client:
        before = client.get("/internal/queue").json()["completed"]
    for auth in (None, ("alice", "wrong"), ("mallory", "secret"), ("alice", "hunter2")):
        for method, path in [("POST", "/sdapi/v1/txt2img"), ("GET", "/sdapi/v1/progress"),
                             ("GET", "/"), ("GET", "/internal/ping"),
                             ("POST", "/sdapi/v1/options")]:  # fmt: skip
            answer = httpx.request(method, url + path, json=job, auth=auth, timeout=30)
            assert answer.status_code == 401, (auth, path)
            assert answer.headers["WWW-Authenticate"].startswith("Basic")
    with guarded.client() as client:
        assert client.get("/internal/queue").json()["completed"] == before  # nothing ran
    import webuiapi

    for user, password in [("alice", "secret"), ("bob", "hunter2")]:
        api = webuiapi.WebUIApi(host=guarded.host, port=guarded.port, username=user,
                                password=password)  # fmt: skip
        assert len(api.txt2img(prompt="x", steps=1, width=32, height=32).images) == 1


def test_queue_bound(guarded):
    with guarded.client() as client:
        answers = {}

        def post(name, steps):
            with guarded.client() as c:
                answers[name] = c.post("/sdapi/v1/txt2img", json={**SMALL, "steps": steps})

        running = threading.Thread(target=post, args=("running", 1000))
        running.start()
        deadline = time.monotonic() + 60
        while client.get("/internal/queue").json()["running"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        waiting = threading.Thread(target=post, args=("waiting", 1))
        waiting.start()
        while client.get("/internal/queue").json()["waiting"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = client.post("/sdapi/v1/txt2img", json=SMALL)
        assert refused.status_code == 503 and "queue is full" in refused.json()["detail"]
        client.post("/sdapi/v1/interrupt")
        running.join(60)
        waiting.join(60)
    assert answers["running"].status_code == 200 and answers["waiting"].status_code == 200
