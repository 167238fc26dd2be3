"""The default worker: one thread beside the event loop, one model. Jobs run one at a time,
in the order they came, from a bounded queue; interrupt, skip and an abandoned job stop at the
next sampling step. (:mod:`sd_server.pool` runs several worker processes behind the same
interface.)

The HTTP side never touches the model: it submits a :class:`Job` and waits on its future, so
the event loop stays free to answer progress requests while a picture is made.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sd_pipeline import StableDiffusion, StopSampling
from sd_pipeline.previews import model_preview
from sd_server.models import ModelInfo, ModelSpec

__all__ = ["Job", "JobQueue", "QueueFull", "Worker"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More jobs wait than the queue holds."""


@dataclass(eq=False)
class Job:
    """One unit of work for the worker: ``run(job, pipe)`` is called in the worker thread and
    returns the result (a generation, or a new pipeline for a model switch)."""

    kind: str  # "txt2img" | "img2img" | "load model"
    run: Callable[[Job, StableDiffusion], Any] | None = None
    iterations: int = 1  # AUTOMATIC1111's n_iter: the progress counts them
    payload: Any = None  # what a worker process needs instead of ``run``: the Generation
    worker: int | None = None  # the worker that runs (ran) it
    attempts: int = 0  # how many worker processes died running it
    future: Future = field(default_factory=Future)
    id: int = field(default_factory=itertools.count(1).__next__)
    # set from other threads, read by the step callback
    gone: threading.Event = field(default_factory=threading.Event)  # the client left
    interrupted: bool = False
    skipped: bool = False
    # progress, written by the worker thread
    started: float | None = None
    iteration: int = 0
    step: int = 0
    steps: int = 0
    size: tuple[int, int] = (0, 0)
    preview: Any = None  # a preview of the first image's current estimate (RGB in [-1, 1])
    preview_vae: Any = None  # the running model's VAE, which says how to preview its latents

    @property
    def stopping(self) -> bool:
        return self.interrupted or self.skipped or self.gone.is_set()

    def on_step(self, d: dict) -> None:
        """sd-pipeline's step callback: record the step, stop when asked to."""
        self.step = int(d["i"]) + 1
        if self.preview_vae is not None:
            self.preview = model_preview(d["denoised"][:1].detach(), self.preview_vae)
        self._notify()
        if self.stopping:
            raise StopSampling

    def _notify(self) -> None:  # replaced by the worker
        pass


class JobQueue:
    """The bounded queue in front of the worker(s): jobs wait in the order they came;
    ``max_waiting`` bounds them; ``listeners`` are called (from a worker thread) at every
    change. :class:`Worker` and :class:`sd_server.pool.WorkerPool` take jobs from it."""

    def __init__(self, max_waiting: int = 32):
        self.max_waiting = max_waiting
        self.completed = 0
        self.listeners: list[Callable[[], None]] = []
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def current(self) -> Job | None:
        """The job in flight that started first."""
        running = self.running
        return running[0] if running else None

    @property
    def running(self) -> list[Job]:
        raise NotImplementedError

    def submit(self, job: Job) -> Future:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} jobs wait behind the running "
                    "one); try again later"
                )
            job._notify = self._changed
            self._waiting.append(job)
            self._cond.notify_all()
        self._changed()
        return job.future

    def abandon(self, job: Job) -> None:
        """The client gave up: drop the job if it waits, stop it at its next step if it runs."""
        job.gone.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                _cancel(job, "the client left")
        self._changed()

    def interrupt(self, job_id: int | None = None) -> None:
        """Stop the running jobs (``job_id``: only that one) at their next step."""
        for job in self.running:
            if job_id is None or job.id == job_id:
                job.interrupted = True

    def skip(self, job_id: int | None = None) -> None:
        for job in self.running:
            if job_id is None or job.id == job_id:
                job.skipped = True

    def _drop_waiting(self, why: str) -> None:
        """Cancel every waiting job (called holding ``_cond``)."""
        for job in self._waiting:
            _cancel(job, why)
        self._waiting.clear()
        self._cond.notify_all()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a listener's failure must not stop a generation
                log.exception("progress listener failed")


def _cancel(job: Job, why: str) -> None:
    """Cancel a waiting job's future; one that already ran once (a retry after its worker
    died) cannot be cancelled, so it gets an error instead."""
    if not job.future.cancel() and not job.future.done():
        job.future.set_exception(RuntimeError(f"{job.kind} #{job.id} was dropped: {why}"))


class Worker(JobQueue):
    """Runs jobs on one pipeline, in a thread of this process, one at a time."""

    def __init__(self, pipe: StableDiffusion, max_waiting: int = 32):
        super().__init__(max_waiting)
        self.pipe = pipe
        self.info = ModelInfo.of(pipe)
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="sd-server-worker", daemon=True)
        self._thread.start()

    @property
    def running(self) -> list[Job]:
        """The job in flight (here at most one)."""
        job = self._current
        return [] if job is None else [job]

    def workers(self) -> list[dict[str, Any]]:
        job = self._current
        return [{"id": 0, "pid": os.getpid(), "device": str(self.pipe.device), "alive": True,
                 "job": job.id if job else None, "completed": self.completed,
                 "restarts": 0}]  # fmt: skip

    def switch(self, spec: ModelSpec) -> Future:
        """Queue loading another model, after the jobs already waiting; the future gives its
        ModelInfo, or the error that kept the old model."""

        def load(job: Job, pipe: StableDiffusion) -> ModelInfo:
            self.pipe = spec.load()
            self.info = ModelInfo.of(self.pipe)
            return self.info

        return self.submit(Job(kind="load model", run=load))

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._drop_waiting("the server is stopping")
        self.interrupt()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            job.worker = 0
            self._current = job
            return job

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            if job.future.set_running_or_notify_cancel():
                job.started = time.monotonic()
                self._changed()
                try:
                    job.future.set_result(job.run(job, self.pipe))
                except BaseException as e:  # handed to the waiting request, which answers it
                    job.future.set_exception(e)
            with self._cond:
                self._current = None
                self.completed += 1
            self._changed()
