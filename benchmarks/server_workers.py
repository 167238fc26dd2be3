"""Images per minute from sd-server with one worker against several (not a test).

    python benchmarks/server_workers.py                        # tiny random model, 1 vs 2 CPU workers
    python benchmarks/server_workers.py --devices cuda:0,cuda:1 --checkpoint v1-5.safetensors \\
        --size 512 --steps 20 --requests 16
    python benchmarks/server_workers.py --requests 8 --out /tmp/workers.json

Each configuration is one ``sd-serve`` on a free loopback port: ``--workers 1`` is the default
single-process server (on the first device, all the cores), the others ``--devices`` with one
worker process per entry. After one untimed request per worker (warm-up), ``--requests``
txt2img requests (distinct seeds) are sent from as many client threads as there are workers
times two, so a queue always waits, and the wall time from the first sent to the last answered
gives images per minute. The machine's load average is printed with each figure: on a shared
CPU the second process competes with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from server import start_server  # benchmarks/server.py, beside this file

from sd_pipeline.pipeline import random_tiny


def throughput(url: str, body: dict, requests: int, clients: int, warmup: int) -> dict:
    def one(seed: int) -> int:
        with httpx.Client(base_url=url, timeout=3600) as client:
            answer = client.post("/sdapi/v1/txt2img", json={**body, "seed": seed})
            answer.raise_for_status()
            return json.loads(answer.json()["info"])["worker"]

    with ThreadPoolExecutor(clients) as threads:
        list(threads.map(one, range(10_000, 10_000 + warmup)))
        load = os.getloadavg()[0]
        start = time.perf_counter()
        workers = list(threads.map(one, range(requests)))
        wall = time.perf_counter() - start
    images = requests * body["batch_size"]
    return {
        "images": images,
        "wall_s": wall,
        "images_per_minute": 60 * images / wall,
        "jobs_per_worker": {str(w): workers.count(w) for w in sorted(set(workers))},
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="default: a tiny random model written here")
    p.add_argument("--devices", default="cpu,cpu", help="the workers of the pool (cpu,cpu)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--steps", type=int, default=8, help="sampling steps per image (default 8)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--requests", type=int, default=12, help="timed requests per configuration")
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    body = {"prompt": "a red circle", "steps": args.steps, "cfg_scale": 7, "sampler_name": "Euler",
            "width": args.size, "height": args.size, "batch_size": args.batch_size}  # fmt: skip
    results = {"settings": {**vars(args), "checkpoint": str(args.checkpoint or "tiny"),
                            "out": str(args.out), "cpu_cores": os.cpu_count()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = args.checkpoint or random_tiny().save(workdir / "tiny.safetensors")
        for name, pool in (("1 worker", devices[:1]), (f"{len(devices)} workers", devices)):
            flags = ["--device", pool[0]] if len(pool) == 1 else ["--devices", ",".join(pool)]
            process, url = start_server(checkpoint, os.cpu_count() or 1, workdir, *flags)
            try:
                results[name] = throughput(url, body, args.requests, 2 * len(pool), len(pool))
            finally:
                process.terminate()
                process.wait(60)
            r = results[name]
            print(f"{name} ({','.join(pool)}): {r['images_per_minute']:.1f} images/min "
                  f"({r['images']} in {r['wall_s']:.1f} s; jobs per worker {r['jobs_per_worker']}; "
                  f"load average {r['load_average_before']:.1f} -> "
                  f"{r['load_average_after']:.1f} on {os.cpu_count()} cores)")  # fmt: skip
    one, many = results["1 worker"], results[f"{len(devices)} workers"]
    results["speedup"] = many["images_per_minute"] / one["images_per_minute"]
    print(
        f"{len(devices)} workers / 1: {results['speedup']:.2f}x "
        f"(ideal {len(devices)}x where each worker has a device of its own)"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
