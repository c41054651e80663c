"""The hybrid re-ranker on tiny hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch

from generator.decoding.t5_generate import BeamResult
from generator.decoding.t5_hybrid import (
    HybridCandidates,
    blend,
    choose_alpha,
    dense_candidate_scores,
    hybrid_candidates,
    rerank,
    union_rows,
)


def _cands() -> HybridCandidates:
    # one history, 3 candidates: the beam prefers item 10, dense prefers item 30
    items = torch.tensor([[10, 20, 30]])
    gen = torch.tensor([[-1.0, -2.0, -4.0]])
    dense = torch.tensor([[-5.0, -2.0, -1.0]])
    codes = torch.tensor([[[1, 0], [2, 0], [3, 0]]])
    return HybridCandidates(items, gen, dense, codes)


def test_blend_and_rerank_by_hand() -> None:
    c = _cands()
    # alpha 0.5: 10 -> -3.0, 20 -> -2.0, 30 -> -2.5
    torch.testing.assert_close(blend(c, 0.5), torch.tensor([[-3.0, -2.0, -2.5]]))
    res = rerank(c, 0.5, 2)
    assert res.items.tolist() == [[20, 30]]
    torch.testing.assert_close(res.scores, torch.tensor([[-2.0, -2.5]]))
    assert res.codes.tolist() == [[[2, 0], [3, 0]]]
    assert rerank(c, 1.0, 3).items.tolist() == [[10, 20, 30]]  # the beam's order
    assert rerank(c, 0.0, 3).items.tolist() == [[30, 20, 10]]  # the dense order


def test_empty_beam_slots_stay_last_even_at_alpha_zero() -> None:
    c = _cands()._replace(gen_logprob=torch.tensor([[-1.0, -2.0, -math.inf]]))
    scores = blend(c, 0.0)
    assert not torch.isnan(scores).any()
    assert rerank(c, 0.0, 3).items.tolist() == [[20, 10, 30]]


def test_ties_keep_beam_order() -> None:
    c = HybridCandidates(torch.tensor([[5, 6]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.zeros(1, 2, 1, dtype=torch.long))
    assert rerank(c, 0.3, 2).items.tolist() == [[5, 6]]


def test_dense_candidate_scores_is_full_log_softmax_gathered() -> None:
    torch.manual_seed(0)
    q, v = torch.randn(2, 3), torch.randn(7, 3)
    rows = torch.tensor([[0, 6, 2], [5, 5, 1]])
    want = torch.log_softmax(q @ v.T, dim=1).gather(1, rows)
    for chunk in (65536, 3, 1):
        torch.testing.assert_close(dense_candidate_scores(q, v, rows, item_chunk=chunk), want)
    torch.testing.assert_close(dense_candidate_scores(q, v, rows, log_softmax=False), (q @ v.T).gather(1, rows))


def test_choose_alpha_by_hand() -> None:
    # two validation users; target of user 0 is the beam's 2nd, of user 1 the dense favourite
    items = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gen = torch.tensor([[-1.0, -1.5, -9.0], [-1.0, -3.0, -3.5]])
    dense = torch.tensor([[-3.0, -1.0, -9.0], [-9.0, -9.0, -0.5]])
    c = HybridCandidates(items, gen, dense, torch.zeros(2, 3, 1, dtype=torch.long))
    targets = torch.tensor([2, 6])
    choice = choose_alpha(c, targets, grid=[0.0, 0.5, 1.0], metric="recall@1")
    # alpha 1: tops are 1, 4 -> 0 hits; alpha 0: 2, 6 -> 2 hits; alpha 0.5: user 0: 1 -> -2, 2 -> -1.25 (hit);
    # user 1: 4 -> -5, 6 -> -2 (hit)
    assert choice.table == {0.0: 1.0, 0.5: 1.0, 1.0: 0.0}
    assert choice.alpha == 0.0  # tie: the first in the grid
    assert choose_alpha(c, targets, grid=[1.0, 0.5], metric="ndcg@2").alpha == 0.5


def test_hybrid_candidates_from_beam_and_errors() -> None:
    beam = BeamResult(torch.tensor([[1, 2]]), torch.tensor([[-0.1, -0.2]]), torch.zeros(1, 2, 3, dtype=torch.long))
    c = hybrid_candidates(beam, torch.tensor([[-1.0, -2.0]]))
    assert c.items.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="must have the beam's shape"):
        hybrid_candidates(beam, torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\], got 1.5"):
        rerank(c, 1.5, 1)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 2\]"):
        rerank(c, 0.5, 3)
    with pytest.raises(ValueError, match="`metric` must be"):
        choose_alpha(c, torch.tensor([1]), metric="mrr@2")


def test_union_rows_keeps_first_occurrence_and_pads() -> None:
    beam = torch.tensor([[3, 1, 9], [2, 9, 9]])  # 9 = pad (empty beam slots)
    dense = torch.tensor([[1, 4, 3], [5, 2, 0]])
    rows, valid = union_rows(beam, dense, 9)
    assert rows.tolist() == [[3, 1, 4, 9, 9, 9], [2, 5, 0, 9, 9, 9]]
    assert valid.tolist() == [[True, True, True, False, False, False], [True, True, True, False, False, False]]


def test_alpha_stored_for_the_old_beam_only_pool_is_not_reused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    from types import SimpleNamespace

    from generator.decoding import t5_hybrid as hybrid

    monkeypatch.setattr(hybrid, "_alpha_key", lambda run: {"checkpoint": "c", "pool": hybrid.POOL})
    run = SimpleNamespace(path=tmp_path)
    old = {"alpha": 0.3, "num_candidates": 50, "checkpoint": "c"}  # written before the union pool: no "pool"
    (tmp_path / hybrid.ALPHA_FILE).write_text(json.dumps(old))
    assert hybrid._stored_alpha(run, 50) is None
    (tmp_path / hybrid.ALPHA_FILE).write_text(json.dumps({**old, "pool": "union"}))
    assert hybrid._stored_alpha(run, 50) == 0.3
