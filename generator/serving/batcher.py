"""Micro-batching: the histories of concurrent requests are decoded as one batch by one worker thread.

The event loop never runs torch: a request hands its checked histories to :meth:`MicroBatcher.submit` and awaits a
future; the worker thread takes the first waiting request, then gathers more for at most ``max_wait_ms`` (up to
``max_batch`` histories), groups the histories by what decides their ranking and decodes each group with one
``Recommender.recommend`` call.

Same results as one-by-one calls: a group holds the histories with the same Recommender (version), decoder, k,
``exclude_history`` and beam count, the beam count a one-by-one call would use (``max(loaded beams, k + the distinct
items to exclude)``). A call asking for more items than another of its group (``exclude_history``) then only reads
further down the same beams' ranking, whose first items are the same.

A lone client pays no wait: the worker waits for more requests only when requests queued up while it was decoding
the previous batch, or more than one was already waiting (signs of concurrent clients); otherwise it decodes at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from generator.runs.recommender import Recommendation, Recommender

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class Job:
    """One request: B checked histories for one Recommender, decoded with the same k, decoder and exclusion.

    beams: int (B,), the beam count a one-by-one call would use for each history (see the module doc).
    """

    rec: Recommender
    histories: list[np.ndarray]
    beams: list[int]
    k: int
    decoder: str
    exclude_history: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    results: list[Recommendation | None] = field(default_factory=list)
    error: BaseException | None = None


def beams_for(rec: Recommender, histories: list[np.ndarray], k: int, exclude_history: bool) -> list[int]:
    """The beam count ``rec.recommend([h], k, exclude_history=...)`` would use for each history alone."""
    extra = [len(np.unique(h)) for h in histories] if exclude_history else [0] * len(histories)
    return [max(rec.num_beams, k + e) for e in extra]


def _resolve(job: Job) -> None:
    """On the event loop: hand the job's results (or error) to its waiting request, unless it went away."""
    if job.future.done():  # the client disconnected and the request was cancelled
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.results)


class MicroBatcher:
    """One worker thread that decodes queued requests in batches.

    Args:
        max_batch: the most histories decoded as one batch (a request with more is decoded alone, in chunks).
        max_wait_ms: the longest a request waits for others to join its batch.
        threads: torch threads of the worker (``torch.set_num_threads``).
        on_batch: called on the worker after each batch with (histories, requests, seconds decoding).
    """

    def __init__(self, *, max_batch: int = 256, max_wait_ms: float = 5.0, threads: int = 1,
                 on_batch: Callable[[int, int, float], None] | None = None) -> None:
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"`max_batch` must be a positive int, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or not 0 <= max_wait_ms <= 10_000:
            raise ValueError(f"`max_wait_ms` must be a number in [0, 10000], got {max_wait_ms!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"`threads` must be a positive int, got {threads!r}")
        self.max_batch, self.max_wait, self.threads = max_batch, max_wait_ms / 1000, threads
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._contended = False  # requests queued up during the last decode

    # ---- the event loop's side -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="semid-decode", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Decode what is queued, then end the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, rec: Recommender, histories: list[np.ndarray], k: int, decoder: str,
                     exclude_history: bool) -> list[Recommendation]:
        """Top-k of each history (checked already), decoded on the worker with whatever else is queued."""
        if not self.alive:
            raise RuntimeError("the decoding worker is not running")
        loop = asyncio.get_running_loop()
        job = Job(rec, histories, beams_for(rec, histories, k, exclude_history), k, decoder, exclude_history,
                  loop.create_future(), loop)
        self._queue.put(job)
        return await job.future

    # ---- the worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, stopping = self._gather(first)
            t0 = time.perf_counter()
            n = self._decode(jobs)
            seconds = time.perf_counter() - t0
            self._contended = not self._queue.empty()
            for job in jobs:
                job.loop.call_soon_threadsafe(_resolve, job)
            if self.on_batch is not None:
                self.on_batch(n, len(jobs), seconds)

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and the requests that join it (module doc); True as second value when a stop was queued."""
        jobs, n = [first], len(first.histories)
        deadline = time.monotonic() + self.max_wait
        wait = self._contended
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait() if not wait else self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                if wait or len(jobs) == 1 or self.max_wait == 0:
                    break
                wait = True  # more than one was waiting: others are likely on their way
                continue
            if job is _STOP:
                return jobs, True
            jobs.append(job)
            n += len(job.histories)
            if wait and time.monotonic() >= deadline:
                break
        return jobs, False

    def _decode(self, jobs: list[Job]) -> int:
        """Decode every job's histories, grouped so that each gets what a call of its own would (module doc)."""
        groups: dict[tuple, list[tuple[Job, int]]] = {}
        for job in jobs:  # loop over requests (and a batch request's histories)
            job.results = [None] * len(job.histories)
            for i, beams in enumerate(job.beams):
                key = (id(job.rec), job.decoder, job.k, job.exclude_history, beams)
                groups.setdefault(key, []).append((job, i))
        for (_, decoder, k, exclude, beams), members in groups.items():
            rec = members[0][0].rec
            try:
                out = rec.recommend([job.histories[i] for job, i in members], k, decoder, exclude_history=exclude,
                                    num_beams=beams, batch_size=self.max_batch)
            except Exception as e:  # noqa: BLE001 - handed to each request of the group, the worker lives on
                if not isinstance(e, (ValueError, TypeError)):
                    log.exception("decoding a batch of %d histories failed", len(members))
                for job, _ in members:
                    job.error = e
                continue
            for (job, i), rec_out in zip(members, out, strict=True):
                job.results[i] = rec_out
        return sum(len(job.histories) for job in jobs)
