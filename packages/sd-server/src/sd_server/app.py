"""The FastAPI application: AUTOMATIC1111's ``/sdapi/v1`` paths and the web page at ``/``.

Requests pass two plain ASGI layers before any route: credentials (``--api-auth``: a request
without them gets 401 before its body is read, so nothing runs) and the body size limit (413).
Routes check their input fully before a job is queued; every bad value is a 422
``{"detail": "<field> <problem>"}`` naming the API's field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from sd_pipeline import RequestError, StableDiffusion, save_image
from sd_pipeline.images import tensor_to_pil
from sd_samplers import SAMPLERS
from sd_server import generation
from sd_server.api_models import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from sd_server.controlnet import PREPROCESSOR_NAMES, ControlNets
from sd_server.images import BadInput, encode_png, png_info
from sd_server.models import Catalog, Checkpoint
from sd_server.pool import WorkerDied, WorkerPool, pool_devices
from sd_server.worker import Job, QueueFull, Worker

__all__ = ["ServerConfig", "create_app"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there
SCHEDULERS = [  # AUTOMATIC1111's names for the sigma ladders sd-samplers has
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1},
    {"name": "uniform", "label": "Uniform", "aliases": ["normal"], "default_rho": -1},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0},
    {"name": "exponential", "label": "Exponential", "aliases": None, "default_rho": -1},
]


@dataclass
class ServerConfig:
    """What ``sd-serve``'s flags say. ``pipe``: an already built pipeline to serve (tests,
    benchmarks) instead of loading ``catalog.initial``.

    ``workers`` / ``devices``: more than one runs that many worker processes behind the one
    queue (:mod:`sd_server.pool`), one per device (``["cuda:0", "cuda:1"]``; ``workers`` alone:
    one per GPU, else on the CPU), each loading ``catalog.initial`` itself;
    ``worker_threads`` is each one's torch threads (default: the cores shared out)."""

    catalog: Catalog = field(default_factory=Catalog)
    device: str | None = None
    dtype: str | None = None
    api_auth: Sequence[tuple[str, str]] = ()
    max_waiting: int = 32
    max_body_bytes: int = 64 * 2**20
    outdir: Path = Path("outputs")
    pipe: StableDiffusion | None = None
    controlnet_dir: Path | None = None
    workers: int | None = None
    devices: Sequence[str] = ()
    worker_threads: int | None = None


class Server:
    """The state behind the routes: the worker(s), options, progress listeners."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.catalog = config.catalog
        self.checkpoint: Checkpoint = self.catalog.initial
        devices = pool_devices(config.workers, config.devices, config.device)
        device = config.devices[0] if config.devices and not devices else config.device
        spec = self.catalog.spec(self.checkpoint, device, config.dtype)
        self.controlnets = ControlNets(config.controlnet_dir, by_file=bool(devices))
        self.worker: Worker | WorkerPool
        if not devices:
            pipe = spec.load() if config.pipe is None else spec.equip(config.pipe)
            self.worker = Worker(pipe, max_waiting=config.max_waiting)
        elif config.pipe is not None:
            raise ValueError("worker processes load the model from a file: give "
                             "catalog=Catalog(checkpoint) rather than pipe")  # fmt: skip
        else:
            self.worker = WorkerPool(spec, devices, max_waiting=config.max_waiting,
                                     threads=config.worker_threads,
                                     controlnet_dir=config.controlnet_dir)  # fmt: skip
        self.load_error: str | None = None  # of the last model switch
        self.loading: str | None = None  # the title of a model being switched to
        self.clip_skip: int | None = None  # CLIP_stop_at_last_layers, when set
        self.options: dict[str, Any] = {}  # other options clients set, kept and shown
        self.tick = asyncio.Event()
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the app starts
        self._preview: tuple[tuple, str] | None = None

    # progress

    def changed(self) -> None:
        """Wake every progress stream (called in the event loop)."""
        self.tick.set()
        self.tick = asyncio.Event()

    def close_streams(self) -> None:
        """End every progress stream: the server is stopping (called from a signal handler)."""
        self.closing = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.changed)

    def progress(self, with_image: bool = True) -> dict[str, Any]:
        """AUTOMATIC1111's ``/progress`` answer about the job in flight that started first (the
        only one, with one worker), ``jobs`` listing every one; ``current_image`` is a
        preview made in the worker (``sd_pipeline.previews.model_preview``)."""
        running = self.worker.running
        job = running[0] if running else None
        state = {
            "skipped": bool(job and job.skipped),
            "interrupted": bool(job and job.interrupted),
            "stopping_generation": False,
            "job": job.kind if job else "",
            "job_count": job.iterations if job else 0,
            "job_timestamp": _timestamp(job.started if job else None),
            "job_no": job.iteration if job else 0,
            "sampling_step": job.step if job else 0,
            "sampling_steps": job.steps if job else 0,
            "queued": self.worker.waiting,
        }
        progress, eta = _fraction(job)
        image = self._current_image(job) if with_image and job is not None else None
        jobs = [{"id": j.id, "job": j.kind, "worker": j.worker, "progress": _fraction(j)[0],
                 "job_no": j.iteration, "job_count": j.iterations, "sampling_step": j.step,
                 "sampling_steps": j.steps, "interrupted": j.interrupted, "skipped": j.skipped,
                 "attempt": j.attempts + 1}
                for j in running]  # fmt: skip
        return {
            "progress": progress,
            "eta_relative": eta,
            "state": state,
            "current_image": image,
            "textinfo": None,
            "jobs": jobs,
        }

    def _current_image(self, job: Job) -> str | None:
        rgb = job.preview
        if rgb is None:
            return None
        key = (job.id, job.iteration, job.step)
        if self._preview is None or self._preview[0] != key:
            picture = tensor_to_pil(rgb)[0]
            if all(job.size):
                picture = picture.resize(job.size, Image.Resampling.BILINEAR)
            self._preview = (key, encode_png(picture))
        return self._preview[1]

    # generation

    async def generate(self, body, task: str, request: Request) -> JSONResponse:
        args = (body, task, self.worker.info, self.clip_skip, self.controlnets, self.catalog)
        gen = await run_in_threadpool(generation.build, *args)
        if gen.warnings:
            log.warning("%s: %s", task, "; ".join(gen.warnings))
        job = Job(kind=task, iterations=gen.n_iter, payload=gen,
                  run=lambda job, pipe: generation.run(job, pipe, gen))  # fmt: skip
        self.worker.submit(job)
        result = await self._wait(job, request)
        if gen.save_images:
            await run_in_threadpool(self._save, task, result)
        images = []
        if gen.send_images:
            images = await run_in_threadpool(lambda: [encode_png(im) for im in result.images])
        info = {**generation.info(gen, result), "worker": job.worker}
        return JSONResponse(
            {"images": images, "parameters": gen.parameters, "info": json.dumps(info)}
        )

    async def _wait(self, job: Job, request: Request):
        """The job's result; a client that goes away takes its job with it."""
        future = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    log.info("%s #%d: the client left; job stopped", job.kind, job.id)
                    self.worker.abandon(job)
                    raise ClientGone
        finally:
            if not job.future.done():
                self.worker.abandon(job)

    def _save(self, task: str, result) -> None:
        folder = self.config.outdir / f"{task}-images"
        folder.mkdir(parents=True, exist_ok=True)
        start = len(list(folder.glob("*.png")))
        for i, (image, params) in enumerate(zip(result.images, result.parameters)):
            save_image(image, folder / f"{start + i:05d}-{params.seed}.png")

    # models and options

    def find(self, name: object) -> Checkpoint:
        checkpoint = self.catalog.find(name) if isinstance(name, str) else None
        if checkpoint is None:
            titles = ", ".join(c.title for c in self.catalog.checkpoints)
            raise BadInput(
                "sd_model_checkpoint", f"{name!r} is not a known model; one of: {titles}"
            )
        return checkpoint

    def switch(self, checkpoint: Checkpoint) -> None:
        """Queue a model switch (it runs after the jobs already waiting, in the worker(s))."""
        if checkpoint == self.checkpoint and self.loading is None:
            return

        def done(future) -> None:  # in the worker thread, before it takes the next job
            error = future.exception() if not future.cancelled() else None
            if error is None and not future.cancelled():
                self.checkpoint, self.load_error = checkpoint, None
                log.info("model switched to %s", checkpoint.title)
            elif error is not None:  # nobody waits on a switch: keep the old model, say why
                self.load_error = f"{checkpoint.title}: {error}"
                log.error("model %s not loaded, keeping %s: %s", checkpoint.title,
                          self.checkpoint.title, error)  # fmt: skip
            if self.loading == checkpoint.title:
                self.loading = None

        spec = self.catalog.spec(checkpoint, self.config.device, self.config.dtype)
        previous, self.loading = self.loading, checkpoint.title
        try:
            future = self.worker.switch(spec)
        except QueueFull:
            self.loading = previous
            raise
        future.add_done_callback(done)

    def set_options(self, options: dict[str, Any]) -> None:
        """Check every option first, then apply them (all or none)."""
        checkpoint = None
        if "sd_model_checkpoint" in options:
            checkpoint = self.find(options["sd_model_checkpoint"])
        clip_skip = options.get(generation.CLIP_SKIP, self.clip_skip)
        if clip_skip is not None and (
            isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1
        ):
            raise BadInput(generation.CLIP_SKIP, f"must be a positive integer, got {clip_skip!r}")
        layers = self.worker.info.clip_layers
        if clip_skip is not None and clip_skip > layers:
            raise BadInput(generation.CLIP_SKIP, f"must be at most {layers} (the model's CLIP "
                           f"layers), got {clip_skip}")  # fmt: skip
        if checkpoint is not None:
            self.switch(checkpoint)
        self.clip_skip = clip_skip
        unknown = sorted(set(options) - {"sd_model_checkpoint", generation.CLIP_SKIP})
        if unknown:
            self.options.update({k: options[k] for k in unknown})
            log.warning("options not used by this server, kept as given: %s", ", ".join(unknown))

    def get_options(self) -> dict[str, Any]:
        return {
            **self.options,
            "sd_model_checkpoint": self.checkpoint.title,
            "sd_checkpoint_hash": self.worker.info.model_hash,
            "sd_model_loading": self.loading,
            "sd_model_error": self.load_error,
            "CLIP_stop_at_last_layers": self.clip_skip or 1,
            "sd_vae": "Automatic",
            "samples_format": "png",
            "outdir_samples": str(self.config.outdir),
        }

    def sd_models(self) -> list[dict[str, Any]]:
        current, info = self.checkpoint, self.worker.info
        return [
            {
                "title": c.title,
                "model_name": c.model_name,
                "hash": info.model_hash if c == current else None,
                "sha256": info.sha256 if c == current else None,
                "filename": str(c.path) if c.path is not None else c.title,
                "config": None,
            }
            for c in self.catalog.checkpoints
        ]


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


def _fraction(job: Job | None) -> tuple[float, float]:
    """How far ``job`` is (0 to 1, its iterations counted) and the seconds it has left."""
    if job is None or job.started is None or not job.steps:
        return 0.0, 0.0
    progress = (job.iteration + job.step / job.steps) / job.iterations
    elapsed = time.monotonic() - job.started
    return progress, elapsed / progress - elapsed if progress > 0 else 0.0


def _timestamp(started: float | None) -> str:
    if started is None:
        return "0"
    wall = time.time() - (time.monotonic() - started)
    return time.strftime("%Y%m%d%H%M%S", time.localtime(wall))


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    """One line naming the first bad field, in the API's terms."""
    messages = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('msg', '')})"
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        where = ".".join(loc) or "the request body"
        value = error.get("input")
        got = "" if isinstance(value, (dict, list)) else f" (got {value!r:.80})"
        messages.append(f"{where}: {error.get('msg', 'invalid')}{got}")
    return "; ".join(messages) or "invalid request"


class LimitsAndAuth:
    """ASGI middleware: HTTP Basic credentials (when configured), then the body size limit.

    Both answer before the application sees the request. The body is read here, up to the
    limit, and handed on unchanged; a client that announces or sends more gets 413.
    """

    def __init__(self, app, credentials: Sequence[tuple[str, str]], max_body: int):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.credentials and not self._authorised(headers.get(b"authorization", b"")):
            response = _error(401, "Not authenticated: give a user and password (HTTP Basic)",
                              {"WWW-Authenticate": 'Basic realm="sd-server"'})  # fmt: skip
            return await response(scope, receive, send)
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        ok = False
        for u, p in self.credentials:  # compare with every pair, in constant time
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p) & bool(sep)
        return ok

    async def _too_large(self, scope, receive, send):
        limit = self.max_body / 2**20
        response = _error(413, f"the request body is larger than {limit:g} MiB (the server's "
                               "--max-body-mb limit)")  # fmt: skip
        await response(scope, receive, send)


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The application serving ``config``'s model (loaded here, before it answers)."""
    server = Server(config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = server.loop = asyncio.get_running_loop()
        server.worker.listeners.append(lambda: loop.call_soon_threadsafe(server.changed))
        yield
        await run_in_threadpool(server.worker.close)

    app = FastAPI(title="sd-server", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = server
    _add_error_handlers(app)
    _add_routes(app, server)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(LimitsAndAuth, credentials=server.config.api_auth,
                       max_body=server.config.max_body_bytes)  # fmt: skip
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(422, _validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body": say what it was
            return _error(422, "the request body is not valid JSON (nested too deeply, or not "
                               "UTF-8 text)")  # fmt: skip
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return _error(422, str(exc))

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        return _error(422, str(generation.api_error(exc)))

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull):
        return _error(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(WorkerDied)
    async def died(request: Request, exc: WorkerDied):
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return _error(499, "the client closed the connection; the job was stopped")

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"the server failed: {type(exc).__name__}: {exc}")


def _add_routes(app: FastAPI, server: Server) -> None:
    api = "/sdapi/v1"

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.post(f"{api}/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await server.generate(body, "txt2img", request)

    @app.post(f"{api}/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        return await server.generate(body, "img2img", request)

    @app.get(f"{api}/progress")
    async def progress(skip_current_image: bool = False):
        return server.progress(with_image=not skip_current_image)

    @app.get("/internal/progress-stream")
    async def progress_stream(request: Request, preview: bool = True):
        """Server-sent events: the ``/progress`` answer after every step (and every job
        change), a keep-alive comment every 15 s."""

        async def events():
            while not server.closing and not await request.is_disconnected():
                tick = server.tick
                yield f"data: {json.dumps(server.progress(with_image=preview))}\n\n"
                try:
                    await asyncio.wait_for(tick.wait(), timeout=15)
                except TimeoutError:
                    yield ": keep-alive\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.post(f"{api}/interrupt")
    async def interrupt(job: int | None = None):
        """Stop the jobs in flight (``?job=ID``, an id of ``/progress``'s ``jobs``: that one)."""
        server.worker.interrupt(job)
        return {}

    @app.post(f"{api}/skip")
    async def skip(job: int | None = None):
        server.worker.skip(job)
        return {}

    @app.get(f"{api}/samplers")
    async def samplers():
        return [{"name": s.label, "aliases": [name], "options": {}} for name, s in SAMPLERS.items()]

    @app.get(f"{api}/schedulers")
    async def schedulers():
        return [{**s, "need_inner_model": False} for s in SCHEDULERS]

    @app.get(f"{api}/sd-models")
    async def sd_models():
        return server.sd_models()

    @app.post(f"{api}/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(server.catalog.refresh)

    @app.get(f"{api}/sd-vae")
    async def sd_vae():
        return []

    @app.get(f"{api}/loras")
    async def loras():
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
                for p in server.catalog.loras()]  # fmt: skip

    @app.get("/controlnet/model_list")
    async def controlnet_models():
        return {"model_list": server.controlnets.names()}

    @app.get("/controlnet/module_list")
    async def controlnet_modules():
        return {"module_list": PREPROCESSOR_NAMES}

    @app.get(f"{api}/embeddings")
    async def embeddings():
        # AUTOMATIC1111's shape: those the model can use, and those it cannot (another width)
        info = server.worker.info
        width = info.text_width
        loaded, skipped = {}, {}
        for name, (widths, vectors) in info.embeddings.items():
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                     "shape": width, "vectors": vectors}  # fmt: skip
            (loaded if width in widths else skipped)[name] = entry
        return {"loaded": loaded, "skipped": skipped}

    @app.get(f"{api}/options")
    async def get_options():
        return server.get_options()

    @app.post(f"{api}/options")
    async def set_options(request: Request):
        try:
            options = await request.json()
        except (ValueError, RecursionError) as e:
            raise BadInput("the request body", f"is not valid JSON ({e})") from None
        if not isinstance(options, dict):
            raise BadInput("the request body", "must be a JSON object of option: value")
        server.set_options(options)

    @app.get(f"{api}/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.post(f"{api}/png-info")
    async def png_info_route(body: PngInfoRequest):
        return await run_in_threadpool(png_info, body)

    @app.get("/internal/ping")
    async def ping():
        return {}

    @app.get("/internal/queue")
    async def queue():
        """The job in flight that started first, how many run, wait and finished, and each
        worker: its process id, device, job, jobs done and restarts."""
        running = server.worker.running
        return {"running": running[0].kind if running else None, "in_flight": len(running),
                "waiting": server.worker.waiting, "completed": server.worker.completed,
                "workers": server.worker.workers()}  # fmt: skip
