"""What sd-server adds to a generation (not a test): per-request overhead over calling the
pipeline directly, and progress updates per sampling step.

    python benchmarks/server.py                       # a tiny random model, 64 px, 4 steps
    python benchmarks/server.py --checkpoint model.safetensors --size 512 --steps 20
    python benchmarks/server.py --rounds 30 --threads 1 --out /tmp/server.json

The server runs as ``sd-serve`` in its own process on a free loopback port, on the same
checkpoint the direct side loads here. The sides alternate, request by request (the same
prompt, seed and settings: one ``POST /sdapi/v1/txt2img`` answered with its base64 PNG against
one ``pipe.run`` returning PIL images), so that whatever else the machine does weighs on both;
the overhead is the median of the paired differences. Progress: a server-sent-events stream
(``/internal/progress-stream``) is read during a longer generation and the distinct steps it
reported are counted against the steps run; ``GET /progress`` is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from sd_pipeline import GenerationRequest, StableDiffusion
from sd_pipeline.pipeline import random_tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: Path, threads: int, workdir: Path, *flags: str
) -> tuple[subprocess.Popen, str]:
    """``sd-serve`` on ``checkpoint`` (and ``flags``), once it answers: the process, its URL."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NO_PROXY": "127.0.0.1"}
    command = [sys.executable, "-m", "sd_server", "--checkpoint", str(checkpoint),
               "--port", str(port), "--log-level", "warning", *flags]  # fmt: skip
    log = open(workdir / "server.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            sys.exit(f"sd-serve exited: {(workdir / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/internal/ping", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    sys.exit("sd-serve did not start")


def overhead(pipe, client: httpx.Client, body: dict, rounds: int) -> dict:
    request = GenerationRequest(prompts=(body["prompt"],), steps=body["steps"],
                                sampler="euler", guidance_scale=body["cfg_scale"],
                                seed=body["seed"], width=body["width"], height=body["height"])  # fmt: skip
    direct, served = [], []
    for i in range(rounds + 1):  # the first round warms both up
        t = time.perf_counter()
        pipe.run(request, progress=False)
        d = time.perf_counter() - t
        t = time.perf_counter()
        answer = client.post("/sdapi/v1/txt2img", json=body)
        answer.raise_for_status()
        answer.json()
        s = time.perf_counter() - t
        if i:
            direct.append(d)
            served.append(s)
    differences = [s - d for s, d in zip(served, direct)]
    return {
        "direct_median_s": statistics.median(direct),
        "server_median_s": statistics.median(served),
        "overhead_median_ms": 1000 * statistics.median(differences),
        "overhead_of_medians_ms": 1000 * (statistics.median(served) - statistics.median(direct)),
        "rounds": rounds,
    }


def progress_updates(url: str, client: httpx.Client, body: dict) -> dict:
    steps_seen, events = set(), [0]
    ready = threading.Event()

    def listen():
        with httpx.stream("GET", f"{url}/internal/progress-stream?preview=false",
                          timeout=None) as stream:  # fmt: skip
            ready.set()
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                state = json.loads(line[6:])["state"]
                events[0] += 1
                if state["job"] == "txt2img" and state["sampling_step"] > 0:
                    steps_seen.add(state["sampling_step"])
                if state["job"] == "" and steps_seen:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(10)
    time.sleep(0.2)
    client.post("/sdapi/v1/txt2img", json=body).raise_for_status()
    listener.join(30)
    polls = []
    for _ in range(50):
        t = time.perf_counter()
        client.get("/sdapi/v1/progress").raise_for_status()
        polls.append(time.perf_counter() - t)
    return {
        "steps": body["steps"],
        "distinct_steps_streamed": len(steps_seen),
        "events": events[0],
        "updates_per_step": len(steps_seen) / body["steps"],
        "progress_get_median_ms": 1000 * statistics.median(polls),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="default: a tiny random model written here")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--steps", type=int, default=4, help="steps of the overhead requests")
    p.add_argument("--progress-steps", type=int, default=30, help="steps of the progress run")
    p.add_argument("--rounds", type=int, default=20, help="timed requests per side")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or random_tiny().save(workdir / "tiny.safetensors")
        pipe = StableDiffusion.from_checkpoint(checkpoint, device="cpu")
        process, url = start_server(checkpoint, args.threads, workdir)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                body = {"prompt": "a red circle", "steps": args.steps, "seed": 1, "cfg_scale": 7,
                        "sampler_name": "Euler", "width": args.size, "height": args.size}  # fmt: skip
                results = {
                    "overhead": overhead(pipe, client, body, args.rounds),
                    "progress": progress_updates(
                        url, client, {**body, "steps": args.progress_steps}
                    ),
                    "settings": {
                        **vars(args),
                        "checkpoint": str(args.checkpoint or "tiny"),
                        "out": str(args.out),
                    },
                }
        finally:
            process.terminate()
            process.wait(20)
    o, g = results["overhead"], results["progress"]
    print(f"direct pipe.run: {o['direct_median_s'] * 1000:.1f} ms, through the server: "
          f"{o['server_median_s'] * 1000:.1f} ms (medians of {o['rounds']})")  # fmt: skip
    print(f"per-request overhead: {o['overhead_median_ms']:.1f} ms (median of paired differences;"
          f" {o['overhead_of_medians_ms']:.1f} ms between the medians); target < 50 ms")  # fmt: skip
    print(f"progress: {g['distinct_steps_streamed']} of {g['steps']} steps streamed "
          f"({g['updates_per_step']:.2f} per step, {g['events']} events); "
          f"GET /progress {g['progress_get_median_ms']:.1f} ms")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
