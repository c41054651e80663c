"""How the service's micro-batcher groups histories (generator.serving.batcher): requests that rank alike share one
decoder call whatever their k, exclusion or beam need within a bucket, and each still gets what it would get alone
with the beams it reports; the hybrid serves a history whose excluded items leave it short of candidates."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from generator.runs.recommender import Recommender
from generator.serving.app import create_app
from generator.serving.batcher import Job, MicroBatcher, bucket, plan
from tests.serve_helpers import holder_for


def _job(rec: Recommender, histories: list[list[int]], k: int, decoder: str, exclude: bool) -> Job:
    hs = [np.asarray(h, dtype=np.int64) for h in histories]
    job = Job(rec, hs, k, decoder, exclude, future=None, loop=None)  # decoded directly below: no event loop
    job.wants, job.beams, job.keys = plan(rec, hs, k, decoder, exclude)
    return job


def test_bucket() -> None:
    assert [bucket(w, 20, 1000) for w in (1, 20, 21, 40, 41, 300)] == [20, 20, 40, 40, 80, 320]
    assert bucket(39, 20, 30) == 30 and bucket(5, 8, 6) == 6  # capped at the catalogue


def test_histories_that_rank_alike_share_one_call_and_get_their_own_answer(serve_world: dict[str, Path]) -> None:
    rec = Recommender.from_run(serve_world["v1"])  # 40 items, 20 beams loaded, hybrid C = 40
    short = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8], [30, 31, 30]]  # k + distinct <= 20: bucket 20
    long = [list(range(10, 24))]  # 14 distinct: k 10 + 14 = 24 > 20 with the exclusion: bucket 40
    jobs = []
    for decoder in ("beam", "exact", "dense", "hybrid"):
        for k in (1, 5, 10):
            for exclude in (False, True):
                jobs.append(_job(rec, short, k, decoder, exclude))
        jobs.append(_job(rec, long, 10, decoder, True))
    batcher = MicroBatcher(max_batch=64)
    groups = batcher._decode([(job, 0, len(job.histories)) for job in jobs])
    # one call per decoder, k and exclusion notwithstanding; beam alone splits on the long history's bucket
    assert groups == 5
    for job in jobs:
        assert job.error is None, job.error
        assert job.beams == [None if job.decoder in ("exact", "dense") else bucket(w, 20, 40) for w in job.wants]
        for h, beams, got in zip(job.histories, job.beams, job.results, strict=True):
            want = rec.recommend([h], job.k, job.decoder, exclude_history=job.exclude_history, num_beams=beams)[0]
            assert got.items.tolist() == want.items.tolist(), (job.decoder, job.k, job.exclude_history, h)
            alone = rec.recommend([h], job.k, job.decoder, exclude_history=job.exclude_history)[0]  # its default beams
            assert got.items.tolist() == alone.items.tolist(), (job.decoder, job.k, job.exclude_history, h)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5)
            if job.exclude_history:
                assert not set(got.items.tolist()) & set(h.tolist())


def test_the_hybrid_serves_histories_longer_than_its_candidates(serve_world: dict[str, Path]) -> None:
    # C = 10 candidates per list: a history of 8 distinct items, k = 5, excluded, asks for 13 (was a 422 naming
    # `request`: the hybrid refused k + 8 > C)
    app = create_app(holder_for(serve_world["v1"], alpha=0.5, num_candidates=10))
    rec = app.state.holder.current.rec
    wide = Recommender.from_run(serve_world["v1"], alpha=0.5, num_candidates=20)  # C = max(10, 20 beams), built so
    history, short = [5, 6, 7, 8, 9, 10, 11, 12, 5], [3, 4]
    expected = wide.recommend([history], 5, "hybrid", exclude_history=True)[0].items.tolist()
    assert rec.recommend([history], 5, "hybrid", exclude_history=True)[0].items.tolist() == expected  # the Python API
    with TestClient(app) as c:
        r = c.post("/recommend", json={"history": history, "k": 5, "decoder": "hybrid", "exclude_history": True})
        assert r.status_code == 200, r.text
        got = [i["item_id"] for i in r.json()["items"]]
        assert got == expected and len(got) == 5 and not set(got) & set(history) and r.json()["num_beams"] == 20
        r = c.post("/recommend/batch", json={"histories": [short, history], "k": 5, "decoder": "hybrid"})
        assert r.status_code == 200, r.text
        assert [i["item_id"] for i in r.json()["results"][1]] == expected
        assert [i["item_id"] for i in r.json()["results"][0]] == rec.recommend([short], 5, "hybrid", exclude_history=True)[
            0].items.tolist()


@pytest.mark.parametrize("decoder", ["beam", "exact", "dense", "hybrid"])
def test_a_prefix_decoder_ranks_its_top_k_as_the_first_k_of_a_longer_ranking(serve_world: dict[str, Path],
                                                                            decoder: str) -> None:
    # what lets k and the exclusion share a group (batcher.PREFIX) and the exact and dense ranking ignore beams
    rec = Recommender.from_run(serve_world["v1"])
    hs = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8]]
    every = {"exclude_history": False}  # the decoders' own rankings (the batcher leaves the history out itself)
    for beams in (20, 40):
        longer = rec.recommend(hs, 20, decoder, num_beams=beams, **every)
        for k in (1, 7):
            for got, full in zip(rec.recommend(hs, k, decoder, num_beams=beams, **every), longer, strict=True):
                assert got.items.tolist() == full.items[:k].tolist()
    if decoder in ("exact", "dense"):
        assert [r.items.tolist() for r in rec.recommend(hs, 10, decoder, num_beams=10, **every)] == \
            [r.items.tolist() for r in rec.recommend(hs, 10, decoder, num_beams=40, **every)]


def test_a_request_the_decoder_refuses_names_the_decoder(serve_world: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(holder_for(serve_world["v1"]))
    rec = app.state.holder.current.rec

    def refuses(*args: object, **kwargs: object) -> object:
        raise ValueError("`k` must be an int in [1, 10] (the hybrid's candidates per list), got 13")

    with TestClient(app) as c:
        monkeypatch.setattr(rec, "recommend", refuses)
        r = c.post("/recommend", json={"history": [1, 2], "decoder": "hybrid"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"] == "decoder" and err["value"] == '"hybrid"' and "got 13" in err["message"], err


def test_new_requests_are_a_batch_of_their_own_taking_turns_with_a_large_one_under_way(serve_world: dict[str, Path]
                                                                                        ) -> None:
    rec = Recommender.from_run(serve_world["v1"])
    batcher = MicroBatcher(max_batch=8)
    big = _job(rec, [[1 + i % 30, 2 + i % 20] for i in range(20)], 5, "beam", True)
    smalls = [_job(rec, [[3 + i, 4]], 5, "dense", False) for i in range(12)]
    waiting = deque([big])  # (a slice: at most 8 // 4 = 2 histories of one request in a batch)
    assert [(lo, hi) for _, lo, hi in batcher._fill(waiting)] == [(0, 2)] and list(waiting) == [big]
    waiting.extend(smalls[:2])  # new requests' turn again (not beside the large one's slice): it just had its own
    assert [job for job, _, _ in batcher._fill(waiting)] == smalls[:2]
    waiting.extend(smalls[2:])  # the large one's turn, the room left to new ones
    assert [(job is big, lo, hi) for job, lo, hi in batcher._fill(waiting)] == [(True, 2, 4)] + [(False, 0, 1)] * 6
    assert [job for job, _, _ in batcher._fill(waiting)] == smalls[8:]  # new ones' turn
    slices = []
    while waiting:  # the large one alone: slice after slice (bounded: 8 more)
        slices += [(lo, hi) for _, lo, hi in batcher._fill(waiting)]
        assert len(slices) <= 8
    assert slices == [(lo, lo + 2) for lo in range(4, 20, 2)]
    for _ in range(2):  # nothing under way: new requests go at once, batch after batch
        alone = _job(rec, [[3, 4]], 5, "dense", False)
        assert [job for job, _, _ in batcher._fill(deque([alone]))] == [alone]


def test_a_small_request_is_answered_between_the_slices_of_a_large_one(serve_world: dict[str, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # head-of-line blocking: a 1,024-history request held the worker for 6-12 s and a one-item request waited it out
    rec = Recommender.from_run(serve_world["v1"])
    large = [np.asarray([1 + i % 30, 2 + i % 20, 5], dtype=np.int64) for i in range(20)]
    small = [np.asarray([3, 4], dtype=np.int64)]
    alone = {id(h): rec.recommend([h], 5, "beam", exclude_history=True)[0].items.tolist() for h in large + small}
    real, gate, calls, batches, done = rec.recommend, threading.Event(), [], [], []

    def held(histories: list[np.ndarray], *args: object, **kwargs: object) -> object:
        calls.append(len(histories))
        gate.wait(30)  # the first slice is under way when the small request comes
        return real(histories, *args, **kwargs)

    monkeypatch.setattr(rec, "recommend", held)
    batcher = MicroBatcher(max_batch=8, max_wait_ms=0, on_batch=lambda n, *_: batches.append(n))

    async def main() -> tuple[list, list]:
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(rec, large, 5, "beam", True))
            first.add_done_callback(lambda _: done.append("large"))
            for _ in range(3000):  # (until the worker decodes the first slice)
                if calls:
                    break
                await asyncio.sleep(0.01)
            second = asyncio.ensure_future(batcher.submit(rec, small, 5, "beam", True))
            second.add_done_callback(lambda _: done.append("small"))
            gate.set()
            return await first, await second
        finally:
            await asyncio.to_thread(batcher.stop)

    (got_large, _), (got_small, _) = asyncio.run(main())
    assert batches == [2, 1, *[2] * 9] and done == ["small", "large"]  # the small one right after the first slice
    for h, got in zip(large + small, got_large + got_small, strict=True):
        assert got.items.tolist() == alone[id(h)]


def test_new_large_requests_arriving_every_batch_do_not_starve_one_under_way(serve_world: dict[str, Path]) -> None:
    # new requests of more than a slice, one per batch, took every turn: the one under way never finished
    rec = Recommender.from_run(serve_world["v1"])
    batcher = MicroBatcher(max_batch=8)  # slices of 2
    big = _job(rec, [[1 + i % 30, 2] for i in range(20)], 5, "beam", True)
    waiting, turns = deque([big]), []
    for i in range(30):  # loop over batches (bounded), a new 3-history request arriving before each
        waiting.append(_job(rec, [[3, 4], [5], [6 + i % 9]], 5, "dense", False))
        pieces = batcher._fill(waiting)
        turns.append(any(job is big for job, _, _ in pieces))
        if big.left == 0:
            break
    assert big.left == 0 and len(turns) <= 30 and max(map(len, "".join("x" if t else "." for t in turns).split("x"))) <= 2


def test_an_empty_request_is_answered_and_a_gone_clients_rest_is_not_decoded(serve_world: dict[str, Path]) -> None:
    rec = Recommender.from_run(serve_world["v1"])
    batcher = MicroBatcher(max_batch=8)

    async def empty() -> object:
        batcher.start()
        try:
            return await asyncio.wait_for(batcher.submit(rec, [], 5, "beam", True), 10)  # (it hung: never answered)
        finally:
            await asyncio.to_thread(batcher.stop)

    assert asyncio.run(empty()) == ([], [])
    gone = _job(rec, [[1, 2]] * 12, 5, "beam", True)
    gone.future = asyncio.new_event_loop().create_future()
    waiting = deque([gone])
    assert [(lo, hi) for _, lo, hi in batcher._fill(waiting)] == [(0, 2)]
    gone.future.cancel()  # its client disconnected: the other 10 histories are not decoded
    assert batcher._fill(waiting) == [] and not waiting


def test_a_history_the_decoder_refuses_fails_its_own_request_only(serve_world: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recommender.from_run(serve_world["v1"])
    large = _job(rec, [[1 + i % 30, 2] for i in range(6)], 5, "beam", True)
    odd = _job(rec, [[7]], 5, "beam", True)  # one group with the large one's histories: the decoder refuses it
    want = [rec.recommend([h], 5, "beam", exclude_history=True)[0].items.tolist() for h in large.histories]
    real = rec.recommend

    def refuses_seven(histories: list[np.ndarray], *args: object, **kwargs: object) -> object:
        if any(h.tolist() == [7] for h in histories):
            raise ValueError("history [7] refused")
        return real(histories, *args, **kwargs)

    monkeypatch.setattr(rec, "recommend", refuses_seven)
    assert MicroBatcher(max_batch=64)._decode([(large, 0, 6), (odd, 0, 1)]) == 1
    assert large.error is None and [r.items.tolist() for r in large.results] == want  # (it failed with [7])
    assert isinstance(odd.error, ValueError) and "[7] refused" in str(odd.error)
