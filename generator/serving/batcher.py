"""Micro-batching: the histories of concurrent requests are decoded as one batch by one worker thread.

The event loop never runs torch: a request hands its checked histories to :meth:`MicroBatcher.submit` and awaits a
future; the worker thread takes the first waiting request, then gathers more for at most ``max_wait_ms`` (up to
``max_batch`` histories), groups the histories by what decides their ranking and decodes each group with one
``Recommender.recommend`` call.

What decides a ranking (:func:`plan`), so that a batched answer is what the request would get alone:

- **Beams, in buckets.** A history that asks for ``want`` items (k, plus its distinct items with ``exclude_history``)
  is decoded with ``bucket(want)`` beams (``protocol.call_beams``): the smallest of the loaded beams times 1, 2, 4, ...
  that holds ``want`` (capped at the catalogue), what ``rec.recommend`` gives such a call by default too. Its answer is
  what ``rec.recommend([history], k, decoder, exclude_history=...)`` returns alone; the service reports the count
  (``num_beams``). A few buckets instead of one count per ``want`` let concurrent requests share a batch.
- **Decoders without beams** (:data:`BEAMLESS`: exact, dense) rank the same whatever the beams: one group. The
  hybrid ranks max(beams, C) candidates per list (C its candidates per list): beams up to C are one group.
- **k and the exclusion do not split a group** for the decoders whose top-k is the first k of their top-n
  (:data:`PREFIX`): the group is decoded for the largest ``want`` in it, and each history keeps the first k of that
  ranking that are not in its history (when it excludes them), which is what its own call keeps. Other decoders
  (cold-beam's cold quota depends on k, ...) are grouped by k, exclusion and ``want`` as well.

A lone client pays no wait: the worker waits for more requests only when requests queued up while it was decoding
the previous batch, or more than one was already waiting (signs of concurrent clients); otherwise it decodes at once.

No request waits behind a large one: a batch holds at most ``max_batch`` histories, and at most ``max_batch // 4``
of one request's (its slice); a request of more is decoded a slice per batch. Requests not started yet have a turn
of their own (up to ``max_batch`` histories, a large one's first slice among them), taking turns with the next
slices of those under way (the room left going to new ones; at most two new turns in a row while one is under
way): a one-history request waits at most one turn, not the whole of a 1,024-history request queued before it, and
a large one keeps moving under any load of small ones (``experiments/head_of_line.py``, the four-member default's
hybrid: 3.9 s before, 0.15 s now at the median).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from generator.decoding.protocol import call_beams as bucket
from generator.decoding.registry import BEAMLESS, PREFIX_CONSISTENT
from generator.runs.exclusion import distinct_counts, drop_history
from generator.runs.recommender import Recommendation, Recommender
from semid.safe_read import is_int

log = logging.getLogger(__name__)

_STOP = object()
WIDENING = frozenset({"hybrid"})  # ranks max(beams, C) candidates per list: any beams up to C rank the same
PREFIX = PREFIX_CONSISTENT  # top-k = the first k of top-n (n > k)


@dataclass(eq=False)  # a request is itself only (compared and hashed by identity)
class Job:
    """One request: B checked histories for one Recommender, decoded with the same k, decoder and exclusion.

    wants, beams, keys: per history (:func:`plan`); ``next``: its first history not yet handed to a batch.
    """

    rec: Recommender
    histories: list[np.ndarray]
    k: int
    decoder: str
    exclude_history: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    user_ids: list[int] | None = None  # one per history, or None (none sent)
    wants: list[int] = field(default_factory=list)
    beams: list[int | None] = field(default_factory=list)
    keys: list[tuple] = field(default_factory=list)
    results: list[Recommendation | None] = field(default_factory=list)
    error: BaseException | None = None
    next: int = 0

    @property
    def left(self) -> int:
        return len(self.histories) - self.next


Piece = tuple[Job, int, int]  # a job's histories [lo, hi) in one batch


def plan(rec: Recommender, histories: list[np.ndarray], k: int, decoder: str, exclude_history: bool, *,
         users: bool = False) -> tuple[list[int], list[int | None], list[tuple]]:
    """Per history: the items its decoder is asked for (``want``), the beams it is decoded with (None: the decoder
    has none) and its group key (module doc; ``users``: the request sent user ids, and a group decodes with them or
    without)."""
    wants = (k + distinct_counts(histories)).tolist() if exclude_history else [k] * len(histories)
    N = rec.run.ids.num_items
    beams = [None if decoder in BEAMLESS else bucket(w, rec.num_beams, N) for w in wants]
    params = [max(b, rec.num_candidates) for b in beams] if decoder in WIDENING else beams
    if decoder in PREFIX:
        keys = [(id(rec), decoder, p, users) for p in params]
    else:
        keys = [(id(rec), decoder, p, users, k, exclude_history, w) for p, w in zip(params, wants, strict=True)]
    return wants, beams, keys


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
        max_batch: the most histories decoded as one batch; a request's slice of it, at most ``max_batch // 4``
            (module doc).
        max_wait_ms: the longest a request waits for others to join its batch.
        threads: torch threads of the worker (``torch.set_num_threads``).
        on_batch: called on the worker after each batch with (histories, requests, groups decoded, seconds decoding).
    """

    def __init__(self, *, max_batch: int = 256, max_wait_ms: float = 5.0, threads: int = 1,
                 on_batch: Callable[[int, int, int, float], None] | None = None) -> None:
        if not is_int(max_batch) or max_batch < 1:
            raise ValueError(f"`max_batch` must be a positive int, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or isinstance(max_wait_ms, bool) or not 0 <= max_wait_ms <= 10_000:
            raise ValueError(f"`max_wait_ms` must be a number in [0, 10000], got {max_wait_ms!r}")
        if not is_int(threads) or threads < 1:
            raise ValueError(f"`threads` must be a positive int, got {threads!r}")
        self.max_batch, self.max_wait, self.threads = int(max_batch), max_wait_ms / 1000, int(threads)
        self.slice = max(1, self.max_batch // 4)  # the most histories of one request in a batch
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._contended = False  # requests queued up during the last decode
        self._new_turns = 0  # new requests' turns in a row (:meth:`_fill`)

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
                     exclude_history: bool, user_ids: list[int] | None = None) -> tuple[list[Recommendation], list[int | None]]:
        """Top-k of each history (checked already), decoded on the worker with whatever else is queued; and the beams
        each was decoded with (None: the decoder has none). Each answer is what ``rec.recommend([history], k, decoder,
        exclude_history=exclude_history, num_beams=beams, user_ids=...)`` returns alone (module doc); ``user_ids``:
        one per history (a run trained with user tokens), or None."""
        if not self.alive:
            raise RuntimeError("the decoding worker is not running")
        if not histories:  # (nothing to decode: answered here, never queued)
            return [], []
        loop = asyncio.get_running_loop()
        job = Job(rec, histories, k, decoder, exclude_history, loop.create_future(), loop, user_ids=user_ids)
        job.wants, job.beams, job.keys = plan(rec, histories, k, decoder, exclude_history, users=user_ids is not None)
        self._queue.put(job)
        return await job.future, job.beams

    # ---- the worker ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        waiting: deque[Job] = deque()  # taken from the queue, not yet wholly handed to a batch (arrival order)
        stopping = False
        while waiting or not stopping:
            stopping = self._gather(waiting) or stopping
            pieces = self._fill(waiting)
            if not pieces:
                continue
            t0 = time.perf_counter()
            groups = self._decode(pieces)
            seconds = time.perf_counter() - t0
            self._contended = not self._queue.empty()
            jobs = [job for job, _, _ in pieces]  # (each request at most once in a batch)
            for job in jobs:  # loop over this batch's requests: answer those done (or failed)
                if job.left == 0 or job.error is not None:
                    job.loop.call_soon_threadsafe(_resolve, job)
            for job in [j for j in waiting if j.error is not None]:  # a failed request's slices left: dropped
                waiting.remove(job)
            if self.on_batch is not None:
                self.on_batch(sum(hi - lo for _, lo, hi in pieces), len(jobs), groups, seconds)

    def _gather(self, waiting: deque[Job]) -> bool:
        """Move queued requests to ``waiting`` (module doc): when none waits, block for the first and gather those
        that join it; while a large one is under way, take what is queued without waiting. True when a stop was
        queued."""
        if waiting:  # work left (a large request under way, or more new ones than a batch holds): what queued up
            # meanwhile joins the next batch's choice, without waiting for more
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    return False
                if job is _STOP:
                    return True
                waiting.append(job)
        first = self._queue.get()
        if first is _STOP:
            return True
        waiting.append(first)
        n = len(first.histories)
        deadline = time.monotonic() + self.max_wait
        wait = self._contended
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait() if not wait else self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                if wait or len(waiting) == 1 or self.max_wait == 0:
                    break
                wait = True  # more than one was waiting: others are likely on their way
                continue
            if job is _STOP:
                return True
            waiting.append(job)
            n += len(job.histories)
            if wait and time.monotonic() >= deadline:
                break
        return False

    def _fill(self, waiting: deque[Job]) -> list[Piece]:
        """One batch of at most ``max_batch`` histories from ``waiting``, at most a slice of each request (module
        doc): new requests' turn (a large one's first slice among them), else, while one is under way, theirs (oldest
        first, the room left to new requests), at the latest after two new turns in a row. Jobs wholly handed out,
        or whose client went away, leave ``waiting``."""
        for job in [j for j in waiting if j.future is not None and j.future.done()]:  # its client went away: the
            waiting.remove(job)  # rest of it is not decoded
        fresh = [job for job in waiting if job.next == 0]
        started = [job for job in waiting if job.next > 0]
        new_turn = bool(fresh) and (not started or self._new_turns < 2)  # (at most two new turns in a row while one
        order = fresh if new_turn else started + fresh  # is under way: new large ones cannot starve it)
        room, pieces = self.max_batch, []
        for job in order:  # loop over requests, in turn
            take = min(job.left, room, self.slice)
            if take > 0:
                pieces.append((job, job.next, job.next + take))
                job.next += take
                room -= take
        for job in [j for j in waiting if j.left == 0]:
            waiting.remove(job)
        self._new_turns = self._new_turns + 1 if new_turn else 0
        return pieces

    def _decode(self, pieces: list[Piece]) -> int:
        """Decode each piece's histories, grouped so that each gets what a call of its own would (module doc); returns
        the number of groups."""
        groups: dict[tuple, list[tuple[Job, int]]] = {}
        for job, lo, hi in pieces:  # loop over requests (and a batch request's histories)
            if not job.results:
                job.results = [None] * len(job.histories)
            for i in range(lo, hi):
                groups.setdefault(job.keys[i], []).append((job, i))
        for key, members in groups.items():
            self._decode_group(key, members)
        return len(groups)

    def _decode_group(self, key: tuple, members: list[tuple[Job, int]]) -> None:
        """One ``Recommender.recommend`` call for histories that rank alike (module doc); where it fails and they are
        of several requests, each request's are decoded again alone, so that one request's history cannot fail
        another's (a 1,024-history request beside a one-item one that the decoder refuses)."""
        first = members[0][0]
        rec, decoder, beams = first.rec, first.decoder, key[2]
        histories = [job.histories[i] for job, i in members]
        users = None if first.user_ids is None else [job.user_ids[i] for job, i in members]  # (all or none: the key)
        try:
            if decoder in PREFIX:  # one ranking as long as the longest ask, cut per history
                out = rec.recommend(histories, max(job.wants[i] for job, i in members), decoder, num_beams=beams,
                                    exclude_history=False, batch_size=self.max_batch, user_ids=users)  # (dropped below)
                out = _cut(out, members)
            else:
                out = rec.recommend(histories, first.k, decoder, exclude_history=first.exclude_history,
                                    num_beams=beams, batch_size=self.max_batch, user_ids=users)
        except Exception as e:  # noqa: BLE001 - handed to the request(s) it came from, the worker lives on
            jobs = list(dict.fromkeys(job for job, _ in members))
            if len(jobs) > 1:
                for job in jobs:  # loop over the group's requests, each alone
                    self._decode_group(key, [m for m in members if m[0] is job])
                return
            if not isinstance(e, (ValueError, TypeError)):
                log.exception("decoding a batch of %d histories failed", len(members))
            first.error = e
            return
        for (job, i), rec_out in zip(members, out, strict=True):
            job.results[i] = rec_out


def _cut(out: list[Recommendation], members: list[tuple[Job, int]]) -> list[Recommendation]:
    """Per member, the first k items of its ranking ``out[j]`` (best first) that are not in its history when its job
    excludes the history: what ``Recommender.recommend`` keeps for a call of its own. One membership test over all
    members' (row, item) pairs, one stable sort."""
    items = np.stack([o.items for o in out])  # (G, n)
    scores = np.stack([o.scores for o in out])
    excluded = [job.histories[i] if job.exclude_history else np.empty(0, np.int64) for job, i in members]
    items, scores = drop_history(items, scores, excluded, items.shape[1])
    return [Recommendation(items[j, :job.k], scores[j, :job.k]) for j, (job, _) in enumerate(members)]
