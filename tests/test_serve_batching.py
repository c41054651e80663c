"""How the service's micro-batcher groups histories (generator.serving.batcher): requests that rank alike share one
decoder call whatever their k, exclusion or beam need within a bucket, and each still gets what it would get alone
with the beams it reports; the hybrid serves a history whose excluded items leave it short of candidates."""

from __future__ import annotations

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
    histories, groups = batcher._decode(jobs)
    # one call per decoder, k and exclusion notwithstanding; beam alone splits on the long history's bucket
    assert histories == sum(len(j.histories) for j in jobs) and groups == 5
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
        assert err["field"] == "decoder" and err["value"] == "'hybrid'" and "got 13" in err["message"], err
