"""Several worker processes behind the server's one queue: one per GPU (``--devices
cuda:0,cuda:1``) or several on the CPU (``--workers 2``), each with its own copy of the model,
so N devices make about N times the pictures.

The usual design for serving one model on several devices: a process per device, started
with ``spawn`` (a forked child would inherit the parent's CUDA context and thread pools, which
do not survive a fork), loads the model once onto its device, then runs the jobs it is sent.
In the server, one thread per worker takes the next job from the shared queue (so jobs start
in the order they came), sends it down the worker's pipe and relays what comes back: a message
per sampling step (progress and the preview latents), then the result or the error.
Interrupt, skip and "the client left" reach the process through a shared-memory word that it
reads at every step, so they cost the job no more than a lock. What runs inside a worker
process, and that word, are in :mod:`sd_server.pool_process`; this module is the server's side.

A worker process that dies (killed, out of memory, a crash in native code) is started again;
the job it ran goes back to the front of the queue, once: a job that kills a second worker
fails with :class:`WorkerDied`, which says what happened. No job is dropped without an answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from sd_server.models import ModelInfo, ModelSpec
from sd_server.pool_process import GONE, INTERRUPT, SKIP, _serve, _Signals
from sd_server.worker import Job, JobQueue

__all__ = ["MAX_ATTEMPTS", "WorkerDied", "WorkerPool", "pool_devices"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # worker processes a job may take down before it fails
STOP_TIMEOUT = 10.0  # seconds a worker gets to finish its step and exit before it is killed


class WorkerDied(RuntimeError):
    """A worker process died running a job (twice), or no worker process is left."""


def pool_devices(workers: int | None, devices: Sequence[str], device: str | None) -> list[str]:
    """One device per worker process from ``--workers`` / ``--devices`` / ``--device``, or []
    for the default single-process server. Raises ValueError naming the flag."""
    devices = [d.strip() for d in devices if d.strip()]
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if devices and workers is not None and len(devices) not in (1, workers):
        raise ValueError(f"--workers {workers} does not fit the {len(devices)} --devices "
                         f"({','.join(devices)}): give one device per worker, or one for all")  # fmt: skip
    for d in devices:
        try:
            torch.device(d)
        except RuntimeError:
            raise ValueError(f"--devices: {d!r} is not a device (cpu, cuda:0, mps)") from None
    n = workers or len(devices) or 1
    if n == 1 and len(devices) <= 1:
        return []
    if len(devices) == 1:
        return devices * n
    if devices:
        return devices
    if device is not None:
        return [device] * n
    if torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n)]
    return ["cpu"] * n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclasses.dataclass
class _Slot:
    """One worker process, and what the server knows of it."""

    index: int
    device: str
    process: Any = None
    conn: Any = None
    signals: _Signals | None = None
    job: Job | None = None  # the job it runs (or the model switch it makes)
    version: int = -1  # of the model it holds (WorkerPool.version)
    completed: int = 0
    restarts: int = 0
    failure: str | None = None  # why it serves no more jobs
    thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"worker {self.index} ({self.device}, pid {pid})"

    def exit_reason(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"


class _Died(Exception):
    """The worker process went away while the server waited on it."""


class WorkerPool(JobQueue):
    """Worker processes, one per entry of ``devices``, each loading ``spec`` there; the same
    interface as :class:`sd_server.worker.Worker`. ``threads``: torch threads per process
    (default: the cores divided between the workers). Blocks until every worker has loaded
    the model, and raises the first one's error if one cannot."""

    def __init__(
        self,
        spec: ModelSpec,
        devices: Sequence[str],
        *,
        max_waiting: int = 32,
        threads: int | None = None,
        controlnet_dir: Path | None = None,
    ):
        super().__init__(max_waiting)
        self.spec, self.version = spec, 0
        self.threads = threads or max(1, _cores() // len(devices))
        self.controlnet_dir = controlnet_dir
        self._ctx = multiprocessing.get_context("spawn")
        self._switching = False
        self.slots = [_Slot(i, d, signals=_Signals(self._ctx)) for i, d in enumerate(devices)]
        try:  # all load at once: N copies take about as long as one where devices are apart
            for slot in self.slots:
                self._start(slot)
            for slot in self.slots:
                self.info = self._ready(slot)
        except BaseException:
            self.close()
            raise
        for slot in self.slots:
            slot.thread = threading.Thread(target=self._feed, args=(slot,), daemon=True,
                                           name=f"sd-server-worker-{slot.index}")  # fmt: skip
            slot.thread.start()
        log.info("%d worker processes on %s, %d torch threads each", len(self.slots),
                 ", ".join(devices), self.threads)  # fmt: skip

    # the interface the routes use

    @property
    def running(self) -> list[Job]:
        jobs = [s.job for s in self.slots if s.job is not None and s.job is not _RELOAD]
        return sorted(jobs, key=lambda j: j.started or 0.0)

    def workers(self) -> list[dict[str, Any]]:
        return [{"id": s.index, "pid": s.process.pid if s.process else None,
                 "device": s.device, "alive": bool(s.process and s.process.is_alive()),
                 "job": s.job.id if s.job and s.job is not _RELOAD else None,
                 "loading": s.job is _RELOAD or bool(s.job and s.job.kind == "load model"),
                 "completed": s.completed,
                 "restarts": s.restarts, "failure": s.failure}
                for s in self.slots]  # fmt: skip

    def submit(self, job: Job) -> Future:
        if all(s.failure for s in self.slots):
            failures = "; ".join(f"worker {s.index}: {s.failure}" for s in self.slots)
            raise WorkerDied(f"no worker process is left to run the job ({failures})")
        return super().submit(job)

    def switch(self, spec: ModelSpec) -> Future:
        """Queue loading another model in every worker, after the jobs already waiting."""
        return self.submit(Job(kind="load model", payload=spec))

    def abandon(self, job: Job) -> None:
        super().abandon(job)
        self._signal(job.id, GONE)

    def interrupt(self, job_id: int | None = None) -> None:
        super().interrupt(job_id)
        self._signal(job_id, INTERRUPT)

    def skip(self, job_id: int | None = None) -> None:
        super().skip(job_id)
        self._signal(job_id, SKIP)

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop taking jobs, stop the running ones at their next step, end every process."""
        with self._cond:
            self._closed = True
            self._drop_waiting("the server is stopping")
        self.interrupt()
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if slot.thread is not None:
                slot.thread.join(max(0.0, deadline - time.monotonic()))
        for slot in self.slots:
            self._stop(slot)
        log.info("worker processes stopped")

    def _signal(self, job_id: int | None, bit: int) -> None:
        for slot in self.slots:
            job = slot.job
            if job is not None and slot.signals and (job_id is None or job.id == job_id):
                slot.signals.send(job.id, bit)

    # the worker processes

    def _start(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe()
        level = logging.getLogger("sd_server").getEffectiveLevel()
        with self._cond:  # the model and its version together (a switch may be under way)
            spec, version = self.spec, self.version
        slot.process = self._ctx.Process(
            target=_serve,
            args=(
                child,
                slot.signals,
                spec.on(slot.device),
                self.threads,
                self.controlnet_dir,
                level,
                slot.index,
            ),
            name=f"sd-server-worker-{slot.index}",
            daemon=True,  # ended with the server, whatever way it ends
        )
        slot.process.start()
        child.close()
        slot.conn, slot.version = parent, version

    def _ready(self, slot: _Slot) -> ModelInfo:
        """Wait for the worker's answer to a (re)load: its ModelInfo, or its error raised."""
        try:
            kind, value = slot.conn.recv()
        except (EOFError, OSError):
            raise WorkerDied(f"{slot.name} {slot.exit_reason()} while loading the model") from None
        if kind == "failed":
            raise value
        return value

    def _stop(self, slot: _Slot) -> None:
        process = slot.process
        if process is None:
            return
        if process.is_alive():
            with contextlib.suppress(OSError):
                slot.conn.send(("stop",))
            process.join(STOP_TIMEOUT)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        if slot.conn is not None:
            slot.conn.close()

    def _revive(self, slot: _Slot) -> bool:
        """Start a new process for a worker that died; False (and the worker retired) when it
        does not load."""
        self._stop(slot)
        if self._closed:
            return False
        slot.restarts += 1
        try:
            self._start(slot)
            self._ready(slot)
        except Exception as e:
            self._retire(slot, f"its restart failed: {e}")
            return False
        log.info("%s started again (restart %d)", slot.name, slot.restarts)
        return True

    def _retire(self, slot: _Slot, why: str) -> None:
        log.error("%s serves no more jobs: %s", slot.name, why)
        with self._cond:
            slot.failure = why
            if all(s.failure for s in self.slots):  # nobody will run what waits: say so
                self._drop_waiting(f"no worker process is left ({why})")
            self._cond.notify_all()

    # one thread per worker: take a job, hand it over, relay what comes back

    def _feed(self, slot: _Slot) -> None:
        while (job := self._next(slot)) is not None:
            try:
                if job.kind == "load model":
                    self._switch_all(slot, job)
                elif job is _RELOAD:
                    self._reload(slot)
                else:
                    self._run(slot, job)
            except Exception as e:  # a fault here must not leave a request waiting forever
                log.exception("%s failed handling %s #%d", slot.name, job.kind, job.id)
                if not job.future.done():
                    job.future.set_exception(e)
            with self._cond:
                slot.job = None
                self._cond.notify_all()
            self._changed()
        self._stop(slot)

    def _next(self, slot: _Slot) -> Job | None:
        """The next job for ``slot``: none before it holds the current model, and a model
        switch only once every other worker is idle (so that it comes after the jobs queued
        before it, and before those queued after it, on every worker)."""
        with self._cond:
            while True:
                if self._closed or slot.failure:
                    return None
                if not self._switching and slot.version != self.version:
                    slot.job = _RELOAD
                    return _RELOAD
                head = self._waiting[0] if self._waiting and not self._switching else None
                others_idle = all(s.job is None for s in self.slots if s is not slot)
                if head is not None and (head.kind != "load model" or others_idle):
                    self._waiting.popleft()
                    self._switching = head.kind == "load model"
                    slot.job, head.worker = head, slot.index
                    return head
                self._cond.wait()

    def _run(self, slot: _Slot, job: Job) -> None:
        if not job.future.running() and not job.future.set_running_or_notify_cancel():
            return  # cancelled while it waited
        job.started = job.started or time.monotonic()
        if not slot.process.is_alive():  # died while idle: not the job's doing
            log.error("%s %s while idle", slot.name, slot.exit_reason())
            if not self._revive(slot):
                return self._requeue(job, slot)
        self._changed()
        slot.signals.arm(job.id, INTERRUPT * job.interrupted | GONE * job.gone.is_set())
        try:
            slot.conn.send(("run", job.id, job.payload))
            self._relay(slot, job)
        except (_Died, OSError):  # OSError: the pipe broke as the job was sent
            self._died(slot, job)
        except Exception as e:  # the job could not be sent (not picklable)
            job.future.set_exception(e)
        if job.future.done():  # not when it went back to the queue
            slot.completed += 1
            with self._cond:
                self.completed += 1

    def _relay(self, slot: _Slot, job: Job) -> None:
        while True:
            try:
                kind, *value = slot.conn.recv()
            except (EOFError, OSError):
                raise _Died from None
            if kind == "step":
                (job.iteration, job.step, job.steps, job.size, skipped, interrupted), preview = (
                    value
                )
                job.skipped, job.interrupted = skipped, job.interrupted or interrupted
                if preview is not None:
                    job.preview = torch.from_numpy(preview)
                self._changed()
            elif kind == "done":
                return job.future.set_result(value[0])
            else:
                return job.future.set_exception(value[0])

    def _died(self, slot: _Slot, job: Job) -> None:
        """The process running ``job`` died: start another; retry the job once."""
        job.attempts += 1
        what = f"{slot.name} {slot.exit_reason()} while it ran {job.kind} #{job.id}"
        log.error("%s", what)
        stopped = job.interrupted or job.gone.is_set()
        if job.attempts < MAX_ATTEMPTS and not stopped and not self._closed:
            log.warning("%s #%d: trying it again (attempt %d of %d)", job.kind, job.id,
                        job.attempts + 1, MAX_ATTEMPTS)  # fmt: skip
            self._requeue(job, slot)  # another worker may take it while this one restarts
        elif stopped:
            job.future.set_exception(WorkerDied(f"{what}; it had been stopped, so it is not "
                                                "tried again"))  # fmt: skip
        else:
            job.future.set_exception(WorkerDied(f"{what}; it had taken down a worker before, "
                                                f"so it is not tried again ({job.attempts} "
                                                "attempts)"))  # fmt: skip
        self._revive(slot)

    def _requeue(self, job: Job, slot: _Slot | None = None) -> None:
        with self._cond:
            if slot is not None and slot.job is job:
                slot.job = None
            job.step, job.preview = 0, None  # the next attempt starts from the beginning
            if self._closed or all(s.failure for s in self.slots):
                job.future.set_exception(WorkerDied(f"{job.kind} #{job.id} could not run: "
                                                    "no worker process is left"))  # fmt: skip
                return
            self._waiting.appendleft(job)  # first in line: it came before those waiting
            self._cond.notify_all()

    # model switches

    def _switch_all(self, slot: _Slot, job: Job) -> None:
        """Load ``job.payload`` (a ModelSpec) here first; if it loads, the other workers
        follow (each reloads before its next job); if not, all keep the old model."""
        if not job.future.set_running_or_notify_cancel():
            self._switching = False
            return
        job.started = time.monotonic()
        spec: ModelSpec = job.payload
        try:
            info = self._load(slot, spec)
        except Exception as e:
            job.future.set_exception(e)
        else:
            with self._cond:
                self.spec, self.info = spec, info
                self.version += 1
                slot.version = self.version
            job.future.set_result(info)
        finally:
            with self._cond:
                self._switching = False
                self.completed += 1

    def _reload(self, slot: _Slot) -> None:
        version = self.version
        try:
            self._load(slot, self.spec)
            slot.version = version
        except Exception as e:
            self._retire(slot, f"it could not load {self.spec.checkpoint.title}: {e}")

    def _load(self, slot: _Slot, spec: ModelSpec) -> ModelInfo:
        """Have ``slot``'s process load ``spec``; a process that dies doing so is started
        again on the model it had."""
        try:
            slot.conn.send(("load", spec.on(slot.device)))
            return self._ready(slot)
        except (WorkerDied, OSError) as e:
            self._revive(slot)
            raise WorkerDied(f"{slot.name} died loading {spec.checkpoint.title}: {e}") from None


_RELOAD = Job(kind="reload")  # the marker _next gives a worker whose model is out of date
