import numpy as np
import pytest

from semid.metrics import RankingMetrics, ndcg_at_k, recall_at_k


def test_metrics_against_hand_computed_values():
    ranked = np.array([[5, 3, 9], [1, 2, 3], [7, 8, 4]])
    targets = np.array([3, 4, 4])
    assert recall_at_k(ranked, targets, 2).tolist() == [1.0, 0.0, 0.0]
    assert recall_at_k(ranked, targets, 3).tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(ndcg_at_k(ranked, targets, 3), [1 / np.log2(3), 0.0, 1 / np.log2(4)])
    m = RankingMetrics(ks=(1, 3))
    m.update(ranked[:2], targets[:2])
    m.update(ranked[2:], targets[2:])
    out = m.compute()
    assert out["recall@1"] == 0.0 and out["recall@3"] == pytest.approx(2 / 3)
    assert out["ndcg@3"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(4)) / 3)


def test_metric_errors():
    with pytest.raises(ValueError, match="ks"):
        RankingMetrics(ks=(0,))
    for bad in ((2.5,), (True,), ()):  # (2.5 was taken as 2)
        with pytest.raises(ValueError, match="`ks` must be positive ints"):
            RankingMetrics(ks=bad)
    with pytest.raises(ValueError, match="no users"):
        RankingMetrics().compute()
    with pytest.raises(ValueError, match="fewer than k=10"):
        RankingMetrics(ks=(10,)).update(np.zeros((2, 5), dtype=int), np.zeros(2, dtype=int))
    ranked, targets = [[1, 2, 3, 4, 5]], [5]  # (plain lists too)
    for fn in (recall_at_k, ndcg_at_k):  # the per-user functions check k as RankingMetrics checks its cut-offs
        for bad in (2.5, True, 0):
            with pytest.raises(ValueError, match="`k` must be a positive int"):
                fn(np.array(ranked), np.array(targets), bad)
        with pytest.raises(ValueError, match="fewer than k=100"):  # (a 5-item list counted as a hit at 100)
            fn(ranked, targets, 100)
        assert fn(ranked, targets, np.int64(5)).tolist()[0] > 0


def test_a_repeated_cut_off_counts_once():
    ranked, targets = np.array([[3, 1, 2], [4, 5, 6]]), np.array([3, 9])
    m = RankingMetrics(ks=(2, 1, 2))  # (each repeat added its hits again: recall@2 1.0 for one hit in two users)
    m.update(ranked, targets)
    assert m.ks == (1, 2) and m.compute() == {"recall@1": 0.5, "ndcg@1": 0.5, "recall@2": 0.5, "ndcg@2": 0.5}
