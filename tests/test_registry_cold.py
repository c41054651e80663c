"""`cold-beam` through the registry on a causal run with items added after training (`semid add-items`).

The run layer (``generator.runs.recommend`` -> ``runs.decoders`` -> ``decoding.registry``) must wrap the run's causal
beam in ``ColdStartBeam`` with the *added* items as the cold ones. The reference here is built by hand from the
decoder classes (not through the registry): the causal beam over the extended tree, normalised over the trained
tree, wrapped with the items above the trained ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from generator.decoding.causal import CausalDecoders
from generator.decoding.cold import ColdStartBeam
from generator.decoding.protocol import LOG_LIKELIHOOD, PREFIX_MATCHED, Decoder, Histories, StateDecoder
from generator.runs.decoders import decoders_for
from generator.runs.folder import load_run
from generator.runs.recommend import recommend
from generator.training.causal_data import history_batch
from semid.tree import PrefixTree
from semid_cli import main
from tests.test_add_items import HISTORIES, NEW, OLD, _fresh, world  # noqa: F401 (world: the module's run fixture)

# the add-items histories, plus histories that hold added items (their inputs come from codes and content)
CASES = [*HISTORIES, [35, 36, 2], [40], [7, 8, 9, 10, 11, 12]]


def _by_hand(run, k: int, num_beams: int) -> tuple[np.ndarray, np.ndarray]:
    """ColdStartBeam(<the causal beam StateDecoder>, run.ids, <added item ids>) over CASES."""
    trained = PrefixTree.from_semantic_ids(run.ids.head(OLD), run.layout)
    shared = CausalDecoders(run.model, run.tree, torch.from_numpy(run.ids.item_ids), num_beams=num_beams,
                            trained_tree=trained).refresh()
    beam = StateDecoder(shared, "beam", score=LOG_LIKELIHOOD, leaves=True)
    cold = ColdStartBeam(beam, run.ids, np.arange(OLD + 1, NEW + 1))
    b = history_batch([np.array(h) for h in CASES], np.full(len(CASES), -1), run.ids, run.max_history)
    mask = torch.arange(b.histories.shape[1])[None, :] < b.lengths[:, None]
    res = cold(Histories(b.histories, mask), k)
    assert res.score == PREFIX_MATCHED and not res.leaves
    return res.items.numpy(), res.scores.numpy()


def test_cold_beam_through_the_registry_serves_added_items_capped(world: dict[str, Path]) -> None:  # noqa: F811
    run_dir = _fresh(world, "run_registry_cold")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 0
    run = load_run(run_dir)
    assert run.model.trained_items == OLD and run.ids.num_items == NEW
    added = set(range(OLD + 1, NEW + 1))
    assert set(run.ids.item_ids[OLD:].tolist()) == added  # the items add-items appended

    dec = decoders_for(run, ["cold-beam"])["cold-beam"]
    assert isinstance(dec, Decoder) and isinstance(dec, ColdStartBeam)
    assert (dec.name, dec.score, dec.leaves) == ("cold-beam", PREFIX_MATCHED, False)

    served, capped = 0, 0
    # recommend's default is max(k, 20) beams; on this run the causal beam itself returns 3-5 added items among its
    # 20, so at k = 20 ColdStartBeam must ask for more candidates for the cap to hold (it doubles C until they do)
    for k, num_beams in ((3, None), (10, None), (15, None), (20, 40), (20, None), (25, None)):
        capped_k = True
        cap = math.ceil(0.1 * k)
        got = recommend(run, CASES, k=k, num_beams=num_beams, decoder="cold-beam", exclude_history=False)
        items = np.stack([r.items for r in got])
        scores = np.stack([r.scores for r in got])
        assert items.shape == (len(CASES), k)
        assert np.isin(items, run.ids.item_ids).all(), k  # only catalogue items
        for row in items:
            assert len(set(row.tolist())) == k, (k, row)  # distinct per history
            n_added = sum(int(i) in added for i in row)
            if capped_k:
                assert n_added <= cap, (k, num_beams, row)  # at most ceil(0.1 k) added items
                served += n_added > 0
                capped += n_added == cap
        if capped_k:  # best first
            assert (np.diff(scores, axis=1) <= 1e-6).all(), k
        ref_items, ref_scores = _by_hand(run, k, max(k, 20) if num_beams is None else num_beams)
        np.testing.assert_array_equal(items, ref_items, err_msg=f"k={k}, num_beams={num_beams}")
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6, err_msg=f"k={k}, num_beams={num_beams}")
    # the cold path is exercised: added items are served, and the cap is reached (so it is what holds them back)
    assert served > 0 and capped > 0, (served, capped)


def test_cold_beam_keeps_the_cap_of_k_when_the_history_is_left_out(world: dict[str, Path]) -> None:  # noqa: F811
    """A call that leaves the history out asks the decoder for k plus the history's distinct items and keeps the first
    k of the rest: the cold cap is k's (ceil(0.1 k)), not that longer list's."""
    run_dir = _fresh(world, "run_registry_cold_unseen")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 0
    run, added = load_run(run_dir), set(range(OLD + 1, NEW + 1))
    most = 0
    for k in (3, 10):
        got = recommend(run, CASES, k=k, decoder="cold-beam")  # exclude_history: the default
        for hist, r in zip(CASES, got, strict=True):
            row = r.items.tolist()
            assert len(row) == k and not set(row) & set(hist)
            n_added = sum(i in added for i in row)
            assert n_added <= math.ceil(0.1 * k), (k, hist, row)
            most = max(most, n_added)
    assert most >= 1  # added items are served: the cap is what holds them back


def test_the_service_groups_cold_beam_requests_by_k_and_exclusion(world: dict[str, Path]) -> None:  # noqa: F811
    """cold-beam's top-k is not the first k of a longer list (its cold quota is k's): the batcher must not decode
    requests of another k or exclusion in one group (a mutation that dropped k and the exclusion from its group key
    went unseen: a helper's audit). Each answer is what the history gets alone."""
    from generator.runs.recommender import Recommender
    from generator.serving.batcher import Job, MicroBatcher, plan

    run_dir = _fresh(world, "run_registry_cold_batched")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 0
    rec = Recommender.from_run(run_dir, decoders=["cold-beam"])
    jobs = []
    for k in (1, 5, 10):
        for exclude in (False, True):
            hs = [np.asarray(h, dtype=np.int64) for h in CASES]
            job = Job(rec, hs, k, "cold-beam", exclude, future=None, loop=None)
            job.wants, job.beams, job.keys = plan(rec, hs, k, "cold-beam", exclude)
            jobs.append(job)
    MicroBatcher(max_batch=256)._decode([(job, 0, len(job.histories)) for job in jobs])
    for job in jobs:
        assert job.error is None, job.error
        for h, beams, got in zip(job.histories, job.beams, job.results, strict=True):
            alone = rec.recommend([h], job.k, "cold-beam", exclude_history=job.exclude_history, num_beams=beams)[0]
            assert got.items.tolist() == alone.items.tolist(), (job.k, job.exclude_history, h.tolist())
