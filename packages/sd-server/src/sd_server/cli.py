"""``sd-serve``: the HTTP API and web page on one model.

    sd-serve                                      # the bundled model on http://127.0.0.1:7860
    sd-serve --checkpoint v1-5.safetensors --models-dir models/ --device cuda --dtype float16
    sd-serve --host 0.0.0.0 --api-auth alice:secret,bob:other
    sd-serve --devices cuda:0,cuda:1                # a worker process per GPU, one queue

It binds to the loopback interface unless ``--host`` says otherwise, and says which when it
starts. A bad flag or a model that does not load is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

import uvicorn

EXIT_USAGE = 2
EXIT_FAILURE = 1

log = logging.getLogger("sd_server")


class _Uvicorn(uvicorn.Server):
    """uvicorn waits for open connections before it stops, and progress streams never end by
    themselves: the first exit signal ends them (the page's EventSource reconnects)."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sd-serve",
        description="Serve Stable Diffusion over AUTOMATIC1111's HTTP API (/sdapi/v1) with a "
        "web page at /. Without --checkpoint the model bundled with sd-pipeline is served.",
    )
    p.add_argument("--checkpoint", type=Path, help="the model to start with (SD 1.x file/folder)")
    p.add_argument("--models-dir", type=Path, help="a folder of checkpoints to switch between")
    p.add_argument(
        "--controlnet-dir",
        type=Path,
        help="a folder of ControlNet files (the ControlNet extension's API)",
    )
    p.add_argument("--lora-dir", type=Path, help="a folder of LoRA files (listed at /loras)")
    p.add_argument("--embeddings", type=Path, help="a folder of embeddings (listed at /embeddings)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if any)")
    p.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes, each with its own model copy (default 1: no extra process)",
    )
    p.add_argument(
        "--devices",
        help="a device per worker process, e.g. cuda:0,cuda:1 or cpu,cpu (default: one per GPU)",
    )
    p.add_argument(
        "--worker-threads",
        type=int,
        help="torch threads per worker process (default: the CPU cores shared out)",
    )
    p.add_argument(
        "--api-auth", help="user:password[,user2:password2]: HTTP Basic credentials required"
    )
    p.add_argument(
        "--queue-size", type=int, default=32, help="jobs that may wait (past it: 503; default 32)"
    )
    p.add_argument(
        "--max-body-mb", type=float, default=64, help="largest request body (default: 64 MiB)"
    )
    p.add_argument(
        "--outdir", type=Path, default=Path("outputs"), help="where save_images writes PNGs"
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning (default: info)")
    return p


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """``user:pass,user2:pass2`` as pairs; a ValueError names a malformed entry."""
    if not text:
        return []
    pairs = []
    for entry in text.split(","):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth entry {entry!r} must be user:password")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(logging, args.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="sd-serve: %(message)s", stream=sys.stderr)
    try:
        auth = parse_auth(args.api_auth)
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        if args.queue_size < 0:
            raise ValueError(f"--queue-size must be at least 0, got {args.queue_size}")
        if not args.max_body_mb > 0:
            raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
        devices = args.devices.split(",") if args.devices else []
        from sd_server.pool import pool_devices

        pool_devices(args.workers, devices, args.device)  # a bad value fails here, not later
        if args.worker_threads is not None and args.worker_threads < 1:
            raise ValueError(f"--worker-threads must be at least 1, got {args.worker_threads}")
        for flag in ("models_dir", "lora_dir", "embeddings", "controlnet_dir"):
            folder = getattr(args, flag)
            if folder is not None and not folder.is_dir():
                raise ValueError(f"--{flag.replace('_', '-')} {folder}: no such folder")
        from sd_server.app import ServerConfig, create_app
        from sd_server.models import Catalog

        catalog = Catalog(args.checkpoint, args.models_dir, args.lora_dir, args.embeddings)
        config = ServerConfig(
            catalog=catalog,
            controlnet_dir=args.controlnet_dir,
            device=args.device,
            dtype=args.dtype,
            api_auth=auth,
            max_waiting=args.queue_size,
            max_body_bytes=int(args.max_body_mb * 2**20),
            outdir=args.outdir,
            workers=args.workers,
            devices=devices,
            worker_threads=args.worker_threads,
        )
        log.info("loading %s", catalog.initial.title)
        app = create_app(config)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"sd-serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_FAILURE
    where = "loopback only" if is_loopback(args.host) else "REACHABLE FROM OTHER MACHINES"
    log.info(
        "serving %s on http://%s:%d (%s%s)",
        catalog.initial.title,
        args.host,
        args.port,
        where,
        "" if auth else ", no authentication" if not is_loopback(args.host) else "",
    )
    if not is_loopback(args.host) and not auth:
        log.warning("anyone who can reach this address can use the API: consider --api-auth")
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                    access_log=False, timeout_graceful_shutdown=5)  # fmt: skip
    _Uvicorn(uvicorn_config, on_exit=app.state.server.close_streams).run()
    return 0
