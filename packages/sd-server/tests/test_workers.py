"""``sd-serve --workers 2 --devices cpu,cpu``: two worker processes behind the one queue, each
with its own copy of the model. Both serve concurrent requests with the pictures of the
single-process server; progress, interrupt and skip reach the worker that runs the job; a
worker killed mid-job is started again and the job retried once; a job that takes down two
workers fails with a clear error while the server goes on; a clean stop leaves no process.

One pool serves the whole module (spawning and loading two processes costs seconds on a busy
machine); the shutdown test stops it, so it comes last.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import start_server, stop_server, wait_for
from PIL import Image

from sd_server.pool import pool_devices

SMALL = {"width": 32, "height": 32}
LONG = 1000  # steps: a job that runs until the test stops it (or kills its worker)


@pytest.fixture(scope="module")
def pool(models, tmp_path_factory):
    root = models["root"]
    running = start_server(
        tmp_path_factory.mktemp("pool"),
        "--checkpoint", str(models["main"]), "--workers", "2", "--devices", "cpu,cpu",
        "--worker-threads", "1", "--log-level", "info", "--models-dir", str(root / "models"),
        "--lora-dir", str(root / "loras"), "--embeddings", str(root / "embeddings"),
        "--controlnet-dir", str(root / "controlnet"),
    )  # fmt: skip
    yield running
    if running.process.poll() is None:
        stop_server(running)


def post(server, **body):
    with server.client() as client:
        return client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL, **body})


def get(server, path):
    with server.client() as client:
        return client.get(path).json()


def pixels(answer) -> np.ndarray:
    import base64
    import io

    images = answer.json()["images"]
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in images])


def running_job(server, job_id=None, min_step=2):
    """A job of /progress's ``jobs`` that has made ``min_step`` steps (``job_id``: that one)."""
    for job in get(server, "/sdapi/v1/progress")["jobs"]:
        if (job_id is None or job["id"] == job_id) and job["sampling_step"] >= min_step:
            return job
    return None


def worker_pid(server, worker: int) -> int:
    return get(server, "/internal/queue")["workers"][worker]["pid"]


def in_thread(target) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(answer=target()))
    thread.start()
    return thread, box


def test_devices_from_the_flags():
    assert pool_devices(None, [], None) == []  # the default: no worker process
    assert pool_devices(1, ["cpu"], None) == []
    assert pool_devices(2, ["cpu"], None) == ["cpu", "cpu"]
    assert pool_devices(None, ["cuda:0", "cuda:1"], None) == ["cuda:0", "cuda:1"]
    assert pool_devices(3, [], "cpu") == ["cpu"] * 3
    for workers, devices, message in [(0, [], "at least 1"), (3, ["cpu", "cpu"], "does not fit"),
                                      (None, ["gpu0", "cpu"], "not a device")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            pool_devices(workers, devices, None)


def test_worker_processes_want_a_model_file_not_a_pipeline():
    from sd_server import ServerConfig, create_app

    with pytest.raises(ValueError, match="give catalog=Catalog"):
        create_app(ServerConfig(pipe=object(), workers=2, devices=["cpu"]))


def test_two_workers_answer_concurrent_requests_as_one_process(pool, server, pipe):
    def one(i: int):
        return i, post(pool, prompt=f"prompt {i}", seed=200 + i, steps=3, batch_size=2)

    with ThreadPoolExecutor(4) as threads:
        answers = dict(threads.map(one, range(8)))
    assert all(a.status_code == 200 for a in answers.values())
    infos = {i: json.loads(a.json()["info"]) for i, a in answers.items()}
    assert all(infos[i]["all_seeds"] == [200 + i, 201 + i] for i in infos)
    assert {info["worker"] for info in infos.values()} == {0, 1}  # both served
    workers = get(pool, "/internal/queue")["workers"]
    assert all(w["completed"] > 0 and w["alive"] for w in workers)
    assert workers[0]["pid"] != workers[1]["pid"] != pool.process.pid
    for i in (0, 5):
        single = post(server, prompt=f"prompt {i}", seed=200 + i, steps=3, batch_size=2)
        # the same computation on one thread each: the same bytes as the pipeline run here
        direct = pipe.txt2img(f"prompt {i}", steps=3, seed=200 + i, batch_size=2,
                              progress=False, **SMALL)  # fmt: skip
        assert (pixels(answers[i]) == np.stack([np.asarray(im) for im in direct])).all()
        # the single-process server runs on all the cores: float sums round apart a little
        assert np.abs(pixels(answers[i]).astype(int) - pixels(single)).mean() < 0.5


def test_model_switch_loras_embeddings_and_controlnets_in_the_workers(pool, server):
    """A model switch reaches every worker, after the jobs queued before it; the LoRA folder,
    embeddings and ControlNets (loaded by each worker onto its device) work as in one process."""
    import base64
    import io

    with pool.client() as client:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
        with ThreadPoolExecutor(2) as threads:
            names = list(threads.map(lambda i: json.loads(post(pool, seed=i, steps=2).json()[
                "info"])["sd_model_name"], range(4)))  # fmt: skip
        assert names == ["other"] * 4
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny.safetensors"})
        assert json.loads(post(pool, steps=1).json()["info"])["sd_model_name"] == "tiny"
        options = client.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == "tiny.safetensors"
        assert options["sd_model_error"] is None
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["badhands"]["vectors"] == 2

    plain, styled = (post(pool, prompt=p, seed=5, steps=1) for p in ("x", "x <lora:style:1>"))
    assert styled.json()["images"] != plain.json()["images"]
    assert "Lora hashes" in json.loads(styled.json()["info"])["infotexts"][0]

    image = Image.new("RGB", (32, 32), "white")
    image.paste((0, 0, 0), (8, 8, 24, 24))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    unit = {"input_image": base64.b64encode(buffer.getvalue()).decode(), "module": "canny",
            "model": "control_tiny"}  # fmt: skip
    body = dict(seed=4, steps=2, alwayson_scripts={"controlnet": {"args": [unit]}})
    controlled, single = post(pool, **body), post(server, **body)
    assert controlled.status_code == 200, controlled.text
    assert "ControlNet 0" in json.loads(controlled.json()["info"])["infotexts"][0]
    assert np.abs(pixels(controlled).astype(int) - pixels(single)).mean() < 0.5
    assert controlled.json()["images"] != post(pool, seed=4, steps=2).json()["images"]


def test_progress_interrupt_and_skip_reach_the_worker_running_the_job(pool):
    first, answer_a = in_thread(lambda: post(pool, seed=1, steps=LONG, n_iter=2))
    job_a = wait_for(lambda: running_job(pool))
    second, answer_b = in_thread(lambda: post(pool, seed=2, steps=LONG))
    progress = wait_for(lambda: (p := get(pool, "/sdapi/v1/progress"))["jobs"][1:]
                        and all(j["sampling_step"] >= 2 for j in p["jobs"]) and p)  # fmt: skip
    jobs = {j["id"]: j for j in progress["jobs"]}
    assert len(jobs) == 2 and {j["worker"] for j in jobs.values()} == {0, 1}
    assert progress["state"]["sampling_steps"] == LONG and progress["current_image"]
    assert progress["state"]["job_count"] == 2  # the first job in flight: n_iter 2
    job_b = next(j for j in jobs.values() if j["id"] != job_a["id"])

    with pool.client() as client:
        client.post("/sdapi/v1/skip", params={"job": job_a["id"]})
        wait_for(lambda: (j := running_job(pool, job_a["id"], 1)) and j["job_no"] == 1)
        client.post("/sdapi/v1/interrupt", params={"job": job_b["id"]})
        second.join(60)
        assert not second.is_alive()
        assert running_job(pool, job_a["id"], 0) is not None  # only job b was stopped
        client.post("/sdapi/v1/interrupt")  # no job named: every job in flight
    first.join(60)
    info_a = json.loads(answer_a["answer"].json()["info"])
    info_b = json.loads(answer_b["answer"].json()["info"])
    assert info_b["interrupted"] and info_b["all_seeds"] == [2]
    assert info_a["interrupted"] and info_a["all_seeds"] == [1, 2]  # skipped, then stopped
    assert get(pool, "/sdapi/v1/progress")["jobs"] == []


def kill_worker_running(server, attempt=1) -> tuple[int, int]:
    """SIGKILL the process that runs a job (``attempt``: its retry) a few steps in."""

    def found():
        job = next((j for j in get(server, "/sdapi/v1/progress")["jobs"]
                    if j["attempt"] == attempt and j["sampling_step"] >= 2), None)  # fmt: skip
        workers = get(server, "/internal/queue")["workers"]
        pid = next((w["pid"] for w in workers if job and w["job"] == job["id"]), None)
        return pid and (job["id"], pid)

    job, pid = wait_for(found, timeout=120)
    os.kill(pid, signal.SIGKILL)
    return job, pid


def test_a_killed_worker_is_started_again_and_its_job_retried(pool):
    before = {w["id"]: w for w in get(pool, "/internal/queue")["workers"]}
    thread, box = in_thread(lambda: post(pool, seed=11, steps=300, batch_size=2))
    _, pid = kill_worker_running(pool)
    thread.join(120)
    answer = box["answer"]
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.json()["info"])["all_seeds"] == [11, 12]
    assert len(answer.json()["images"]) == 2
    killed = next(i for i, w in before.items() if w["pid"] == pid)
    workers = wait_for(lambda: (w := get(pool, "/internal/queue")["workers"])[killed]["alive"]
                       and w, timeout=120)  # fmt: skip
    assert workers[killed]["restarts"] == before[killed]["restarts"] + 1
    assert workers[killed]["pid"] != pid
    assert "was killed by SIGKILL" in pool.output() and "trying it again" in pool.output()


def test_a_job_that_kills_two_workers_fails_clearly_and_the_server_goes_on(pool):
    thread, box = in_thread(lambda: post(pool, seed=21, steps=LONG))
    job, _ = kill_worker_running(pool)
    assert kill_worker_running(pool, attempt=2)[0] == job  # the retry, in another process
    thread.join(120)
    answer = box["answer"]
    assert answer.status_code == 500
    detail = answer.json()["detail"]
    assert f"#{job}" in detail and "was killed by SIGKILL" in detail
    assert "not tried again" in detail and "Traceback" not in detail
    assert post(pool, seed=22, steps=2).status_code == 200  # once a worker is back
    wait_for(lambda: all(w["alive"] for w in get(pool, "/internal/queue")["workers"]), 120)


def test_a_clean_stop_leaves_no_worker_process(pool):
    pids = [w["pid"] for w in get(pool, "/internal/queue")["workers"]]
    assert len(pids) == 2
    pool.process.send_signal(signal.SIGTERM)
    assert pool.process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert "worker processes stopped" in pool.output()
    assert "leaked" not in pool.output()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert all(gone(pid) for pid in pids)
