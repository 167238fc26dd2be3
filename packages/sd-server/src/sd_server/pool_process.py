"""What runs inside a worker process of :class:`sd_server.pool.WorkerPool`, and the two ways
the server reaches it: the pipe (the server sends ``("load", spec)``, ``("run", job id,
generation)`` or ``("stop",)``; the process answers ``("ready", ModelInfo)`` or ``("failed",
error)`` to a load, and a ``("step", ...)`` per sampling step, then ``("done", result)`` or
``("failed", error)`` to a job), and the word of shared memory the stop requests are written to
(:class:`_Signals`).

:func:`_serve` is the spawned process's target: ``spawn`` pickles it by its qualified name, so
the new process imports this module (and what it needs to run jobs), not the pool.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from typing import Any

import torch

from sd_server.models import ModelInfo
from sd_server.worker import Job

INTERRUPT, SKIP, GONE = 1, 2, 4  # the stop requests, as bits of the shared word


class _Signals:
    """The job a worker process runs and the stop requests for it, in shared memory:
    [job id, INTERRUPT | GONE bits, skips asked]. Only the server writes (under a lock of its
    own), so the word needs no lock across processes; the worker counts the skips it took."""

    def __init__(self, ctx):
        self._word = ctx.RawArray("q", 3)
        self._lock = threading.Lock()
        self._seen = (0, 0)  # in the worker: (job id, skips taken)

    def __getstate__(self):
        return {"_word": self._word}

    def __setstate__(self, state):
        self._word, self._lock, self._seen = state["_word"], threading.Lock(), (0, 0)

    def arm(self, job_id: int, bits: int = 0) -> None:
        with self._lock:
            self._word[0] = 0  # no stale request is read as the new job's
            self._word[1], self._word[2] = bits, 0
            self._word[0] = job_id

    def send(self, job_id: int, bit: int) -> None:
        with self._lock:
            if self._word[0] == job_id:
                if bit == SKIP:
                    self._word[2] += 1
                else:
                    self._word[1] |= bit

    def take(self, job_id: int) -> int:
        """The requests for ``job_id``; a skip is taken once (it ends one iteration)."""
        if self._word[0] != job_id:
            return 0
        bits, skips = self._word[1], self._word[2]
        seen = self._seen[1] if self._seen[0] == job_id else 0
        self._seen = (job_id, skips)
        return bits | (SKIP if skips != seen else 0)


# the worker process


@dataclasses.dataclass(eq=False)
class _RemoteJob(Job):
    """The worker process's side of a job: every step is reported to the server, and the stop
    requests read from the shared word."""

    conn: Any = None
    signals: _Signals | None = None

    def _notify(self) -> None:
        bits = self.signals.take(self.id)
        self.interrupted = self.interrupted or bool(bits & INTERRUPT)
        self.skipped = self.skipped or bool(bits & SKIP)
        if bits & GONE:
            self.gone.set()
        preview = None if self.preview is None else self.preview.float().cpu().numpy()
        state = (self.iteration, self.step, self.steps, self.size, self.skipped, self.interrupted)
        self.conn.send(("step", state, preview))


def _serve(conn, signals, spec, threads, controlnet_dir, level, index) -> None:
    """A worker process: load the model, then do what the server sends until it says stop or
    goes away."""
    from sd_server import generation
    from sd_server.controlnet import ControlNets

    # Ctrl+C reaches the whole process group: the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level, format=f"sd-serve: worker {index}: %(message)s",
                        stream=sys.stderr)  # fmt: skip
    torch.set_num_threads(threads)
    _thread_lock_for_tqdm()
    try:
        pipe = spec.load()
    except Exception as e:
        return _answer(conn, ("failed", _portable(e)))
    if not _answer(conn, ("ready", ModelInfo.of(pipe))):
        return
    controlnets = ControlNets(controlnet_dir)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if message[0] == "stop":
            return
        try:
            if message[0] == "load":  # on failure the old model stays
                pipe = message[1].load()
                answer = ("ready", ModelInfo.of(pipe))
            else:
                _, job_id, gen = message
                job = _RemoteJob(kind=gen.task, iterations=gen.n_iter, id=job_id, conn=conn,
                                 signals=signals)  # fmt: skip
                request = controlnets.attach(gen.request, pipe)
                result = generation.run(job, pipe, dataclasses.replace(gen, request=request))
                answer = ("done", _sendable(result, gen))
        except Exception as e:
            answer = ("failed", _portable(e))
        if not _answer(conn, answer):
            return


def _thread_lock_for_tqdm() -> None:
    """tqdm guards its bars with a multiprocessing lock, a semaphore that a killed worker
    leaves behind (and the resource tracker then warns about); a thread lock does here."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _answer(conn, message) -> bool:
    try:
        conn.send(message)
        return True
    except OSError:  # the server is gone
        return False


def _sendable(result, gen):
    """The result without the ControlNet weights in its requests (the server has the units
    as it sent them)."""
    requests = [dataclasses.replace(r, controls=gen.request.controls) for r in result.requests]
    return dataclasses.replace(result, requests=requests)


def _portable(e: Exception) -> Exception:
    """``e`` as the server can unpickle it: as it is where it survives the trip, else a
    RuntimeError that says what it was."""
    import pickle

    from sd_pipeline import RequestError
    from sd_server.generation import api_error

    if isinstance(e, RequestError):
        return api_error(e)
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
