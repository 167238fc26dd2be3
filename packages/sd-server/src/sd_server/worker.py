"""One worker thread per device: jobs run one at a time, in the order they came, from a bounded
queue; interrupt, skip and an abandoned job stop at the next sampling step.

The HTTP side never touches the model: it submits a :class:`Job` and waits on its future, so
the event loop stays free to answer progress requests while a picture is made.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from sd_pipeline import StableDiffusion, StopSampling

__all__ = ["Job", "QueueFull", "Worker"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More jobs wait than the queue holds."""


@dataclass(eq=False)
class Job:
    """One unit of work for the worker: ``run(job, pipe)`` is called in the worker thread and
    returns the result (a generation, or a new pipeline for a model switch)."""

    kind: str  # "txt2img" | "img2img" | "load model"
    run: Callable[[Job, StableDiffusion], Any]
    iterations: int = 1  # AUTOMATIC1111's n_iter: the progress counts them
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
    preview: Any = None  # the first image's current estimate of its latents (a tensor)

    @property
    def stopping(self) -> bool:
        return self.interrupted or self.skipped or self.gone.is_set()

    def on_step(self, d: dict) -> None:
        """sd-pipeline's step callback: record the step, stop when asked to."""
        self.step = int(d["i"]) + 1
        self.preview = d["denoised"][:1].detach().clone()
        self._notify()
        if self.stopping:
            raise StopSampling

    def _notify(self) -> None:  # replaced by the worker
        pass


class Worker:
    """Runs jobs on one pipeline, one at a time. ``max_waiting`` bounds the jobs waiting behind
    the running one; ``listeners`` are called (from the worker thread) at every change."""

    def __init__(self, pipe: StableDiffusion, max_waiting: int = 32):
        self.pipe = pipe
        self.max_waiting = max_waiting
        self.current: Job | None = None
        self.completed = 0
        self.last_error: str | None = None  # of the last model switch
        self.listeners: list[Callable[[], None]] = []
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sd-server-worker", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} jobs wait behind the running "
                    "one); try again later"
                )
            job._notify = self._changed
            self._waiting.append(job)
            self._cond.notify()
        self._changed()
        return job.future

    def abandon(self, job: Job) -> None:
        """The client gave up: drop the job if it waits, stop it at its next step if it runs."""
        job.gone.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()
        self._changed()

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupted = True

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.skipped = True

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            self._cond.notify()
        self.interrupt()
        self._thread.join(timeout)

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a listener's failure must not stop a generation
                log.exception("progress listener failed")

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            self.current = job
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
                self.current = None
                self.completed += 1
            self._changed()
