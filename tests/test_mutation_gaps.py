"""Assertions the suite lacked: each fails on a plausible bug that every other test let through (a helper's mutation
audit, December 2026: 40 small bugs planted one at a time, 11 survived; these catch them). The bootstrap's level, the
beam's refusal of dead beams, exclusion across faiss-free item chunks, the add-one popularity smoothing, the log-Q
correction passed to the sampled heads (causal and T5), the cold-beam's beams and cap, the level fusion's tie-break,
the dense decoder's chunked path under a score budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.decoding.beam import TreeConstraint, leaf_items, search
from generator.decoding.mips import exact_topk
from generator.models.dense_loss import log_popularity
from semid.metrics import RankingMetrics, paired_bootstrap
from semid.tree import PrefixTree


def test_bootstrap_95_interval_matches_percentiles():  # kills M01
    rng = np.random.default_rng(0)
    b = rng.random(500)
    a = b + rng.normal(0.1, 1.0, 500)
    mean, lo, hi = paired_bootstrap(a, b, seed=3, resamples=2000)
    d = a - b
    r = np.random.default_rng(3)
    means = np.concatenate([d[r.integers(0, 500, size=(100, 500))].mean(1) for _ in range(20)])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_ranks_follow_update_order():  # M04 (direct)
    m = RankingMetrics((2,))
    m.update([[1, 2]], [2])
    m.update([[3, 4]], [9])
    assert m.ranks().tolist() == [1, -1]


def test_leaf_items_refuses_dead_beams():  # kills M17
    from tests.test_beam_loop import EOS, PAD, TableBackbone
    tree = PrefixTree.from_sequences([[2, 5], [3, 6]], [0, 1], 12, end_token=EOS, pad_token=PAD)
    bb = TableBackbone(1, 12, [(2, 5), (5, 8)], 0)
    beams = search(bb, TreeConstraint(tree, bb.B, bb.device), num_beams=4, steps=2)
    with pytest.raises(RuntimeError, match="outside the tree's leaves"):
        leaf_items(beams, tree, 3)


def test_exact_topk_exclusion_across_item_chunks():  # kills M27
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(3, 4, generator=g), torch.randn(40, 4, generator=g)
    excl = (q @ v.T).topk(2, dim=1).indices
    s = (q @ v.T).scatter(1, excl, float("-inf"))
    want = s.topk(5, dim=1).indices
    got = exact_topk(q, v, 5, exclude_rows=excl, item_chunk=7)
    assert torch.equal(got.item_ids, want)


def test_log_popularity_is_add_one_smoothed():  # kills M40
    torch.testing.assert_close(log_popularity(torch.tensor([0, 0, 2]), 4).exp(), torch.tensor([3, 1, 2, 1]) / 7.0)


def test_causal_sampled_uniform_negatives_apply_log_q():  # M36
    from dataclasses import replace

    from generator.models.causal_loss import dense_loss
    from generator.models.dense_loss import candidate_softmax_loss, sample_candidates
    from tests.test_causal import CFG, make
    N = 30
    model, _, _ = make(N, cfg=replace(CFG, dense_loss="sampled", num_negatives=3))
    h, targets = torch.randn(2, CFG.d_model, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 7])
    log_q = torch.log_softmax(torch.randn(N, generator=torch.Generator().manual_seed(2)), 0)
    got = dense_loss(model, h, targets, log_q=log_q, generator=torch.Generator().manual_seed(0))
    cand = sample_candidates(targets, 3, N, log_q=log_q, generator=torch.Generator().manual_seed(0))
    want = candidate_softmax_loss(model.dense_queries(h), model.item_vectors(cand.rows), cand, targets)
    torch.testing.assert_close(got, want)


def test_with_beams_reaches_the_cold_beams_inner_beam():  # M44
    from generator.decoding.cold import ColdStartBeam
    from generator.runs.exclusion import with_beams
    from semid.ids import SemanticIDs
    from tests.test_cold_beam import FixedBeam
    n = 40
    codes = np.stack([np.arange(n) % 10, np.arange(n) // 10, np.zeros(n, int)], 1)
    ids = SemanticIDs(codes, np.arange(1, n + 1), (10, 4, 1))
    dec = ColdStartBeam(FixedBeam(None, num_beams=20), ids, np.arange(31, 41), epsilon=0.1, prefix_levels=1)
    wide = with_beams(dec, 40)
    assert wide.num_beams == 40 and wide.beam.num_beams == 40 and dec.beam.num_beams == 20


def test_with_cold_cap_caps_at_ks_share():  # M45
    from generator.decoding.cold import ColdStartBeam
    from generator.decoding.protocol import LOG_LIKELIHOOD, Histories, Ranking
    from generator.runs.exclusion import drop_history, with_cold_cap
    from semid.ids import SemanticIDs
    from tests.test_cold_beam import FixedBeam
    n = 40
    codes = np.stack([np.arange(n) % 10, np.arange(n) // 10, np.zeros(n, int)], 1)
    ids = SemanticIDs(codes, np.arange(1, n + 1), (10, 4, 1))
    items = torch.arange(1, 13)[None]
    beam = FixedBeam(Ranking(items, -torch.arange(12.0)[None], torch.from_numpy(ids.codes_of(items.numpy())), LOG_LIKELIHOOD, True), num_beams=20)
    dec = ColdStartBeam(beam, ids, np.arange(31, 41), epsilon=0.1, prefix_levels=1, max_per_prefix=1)
    history = np.array([25, 26])  # no cold item in the history
    tokens = torch.from_numpy(ids.rows_of(history) + 1)[None]
    out = with_cold_cap(dec, 10)(Histories(tokens, torch.ones_like(tokens, dtype=torch.bool)), 12)
    kept, _ = drop_history(out.items.numpy(), out.scores.numpy(), [history], 10)
    assert int(np.isin(kept, np.arange(31, 41)).sum()) == 1  # k=10's share, not k+2=12's (2)


def test_a_small_budget_takes_the_chunked_dense_path(monkeypatch):  # M26
    import generator.decoding.causal as causal
    from generator.decoding.causal import CausalDecoders
    from tests.test_chunked_scoring import _decoders
    big = _decoders(60)
    small = CausalDecoders(big.model, big.tree, big.item_ids, num_beams=8, max_score_bytes=256).refresh()
    calls, real = [], causal.dense_topk
    monkeypatch.setattr(causal, "dense_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    small.decode("dense", torch.randn(11, big.model.config.d_model), k=10)
    assert calls == [1]
