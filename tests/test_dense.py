"""The dense head: pooling, item vectors, cold items, and the sampled softmax against the full softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from generator.models.dense import DenseHead, DenseHeadConfig
from generator.models.dense_loss import (
    candidate_softmax_loss,
    full_softmax_loss,
    log_popularity,
    sample_candidates,
    sampled_softmax_loss,
)


def _head(mode: str = "both", N: int = 7, D: int = 5, **kw) -> DenseHead:
    torch.manual_seed(0)
    content = torch.randn(N, D) if mode != "id" else None
    return DenseHead(DenseHeadConfig(input_dim=6, dim=4, mode=mode, **kw), torch.arange(1, N + 1), content)


# ---- sampled softmax == full softmax when every item is a column ----------------------------------------------------
@pytest.mark.parametrize("uniform_log_q", [True, False])
def test_sampled_gradient_equals_full_softmax_when_all_items_included(uniform_log_q: bool) -> None:
    torch.manual_seed(0)
    N, d = 6, 3
    targets = torch.randperm(N)  # B = N distinct targets: the in-batch columns are every item exactly once
    q1 = torch.randn(N, d, requires_grad=True)
    v1 = torch.randn(N, d, requires_grad=True)
    q2, v2 = q1.detach().clone().requires_grad_(), v1.detach().clone().requires_grad_()
    log_q = torch.full((N,), -math.log(N)) if uniform_log_q else None
    full = full_softmax_loss(q1, v1, targets)
    sampled = sampled_softmax_loss(q2, v2, targets, num_random=0, log_q=log_q)
    full.backward()
    sampled.backward()
    torch.testing.assert_close(sampled, full)
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(v2.grad, v1.grad)


def test_sampled_with_all_items_as_random_negatives_and_accidental_hits_masked() -> None:
    """One query, every item once as a random negative: the target's second copy is masked, the rest is full softmax."""
    torch.manual_seed(1)
    N, d = 5, 3
    q = torch.randn(1, d)
    v = torch.randn(N, d)
    target = torch.tensor([3])
    loss = sampled_softmax_loss(q, v, target, num_random=N, negatives=torch.arange(N))
    torch.testing.assert_close(loss, full_softmax_loss(q, v, target))


def test_log_q_correction_by_hand() -> None:
    targets = torch.tensor([0, 2])
    log_q = torch.tensor([0.5, 0.25, 0.25]).log()
    cand = sample_candidates(targets, 2, 3, log_q=log_q, negatives=torch.tensor([1, 0]))
    assert cand.rows.tolist() == [0, 2, 1, 0]
    # expected count of item j among B=2 in-batch draws from q and R=2 uniform draws: 2 q_j + 2/3
    want = torch.tensor([2 * 0.5 + 2 / 3, 2 * 0.25 + 2 / 3, 2 * 0.25 + 2 / 3, 2 * 0.5 + 2 / 3]).log()
    torch.testing.assert_close(cand.log_correct, want)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vecs = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # vectors of rows 0, 2, 1, 0
    loss = candidate_softmax_loss(q, vecs, cand, targets)
    logits = q @ vecs.T - want
    logits[0, 3] = -math.inf  # row 0's target (item 0) again among the random negatives
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(2)))


def test_sampling_is_seeded_and_in_range() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sample_candidates(torch.tensor([1, 2]), 50, 9, generator=g1)
    b = sample_candidates(torch.tensor([1, 2]), 50, 9, generator=g2)
    assert torch.equal(a.rows, b.rows) and a.rows.min() >= 0 and a.rows.max() < 9
    assert torch.equal(a.log_correct, torch.zeros(52))


def test_loss_errors() -> None:
    q, v = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="`targets` must be rows in"):
        full_softmax_loss(q, v, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="`log_q` must be log-probabilities"):
        sampled_softmax_loss(q, v, torch.tensor([0, 1]), 2, log_q=torch.zeros(4))
    with pytest.raises(ValueError, match="`num_random` must be"):
        sampled_softmax_loss(q, v, torch.tensor([0, 1]), -1)


def test_log_popularity_sums_to_one() -> None:
    lq = log_popularity(torch.tensor([0, 0, 2]), 4)
    torch.testing.assert_close(lq.exp().sum(), torch.tensor(1.0))
    assert lq[0] > lq[2] > lq[1] == lq[3]


# ---- the head ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_ignores_padding_on_either_side(pooling: str) -> None:
    head = _head(pooling=pooling, normalize=False)
    torch.manual_seed(2)
    h = torch.randn(1, 3, 6)
    right = torch.cat([h, torch.randn(1, 2, 6)], 1)
    left = torch.cat([torch.randn(1, 2, 6), h], 1)
    q = head(h, torch.ones(1, 3))
    torch.testing.assert_close(head(right, torch.tensor([[1, 1, 1, 0, 0]])), q)
    torch.testing.assert_close(head(left, torch.tensor([[0, 0, 1, 1, 1]])), q)
    pooled = h.mean(1) if pooling == "mean" else h[:, -1]
    torch.testing.assert_close(q, head.query_proj(pooled))


def test_normalized_query_has_norm_one_over_temperature() -> None:
    head = _head(normalize=True, temperature=0.1)
    q = head(torch.randn(3, 4, 6), torch.ones(3, 4))
    torch.testing.assert_close(q.norm(dim=1), torch.full((3,), 10.0))


@pytest.mark.parametrize("mode", ["id", "content", "both"])
def test_item_vectors_rows_match_all(mode: str) -> None:
    head = _head(mode)
    rows = torch.tensor([4, 0, 4])
    torch.testing.assert_close(head.item_vectors(rows), head.item_vectors()[rows])
    assert head.item_vectors().shape == (7, 4)
    loss = head.loss(torch.randn(2, 4), torch.tensor([1, 5]))
    loss.backward()
    assert torch.isfinite(loss)


def test_add_items_gives_cold_items_content_only_vectors() -> None:
    head = _head("both", normalize=False).eval()
    before = head.item_vectors().detach().clone()
    new_content = torch.randn(2, 5)
    head.add_items(new_content)
    assert head.item_ids.tolist() == list(range(1, 10))
    assert head.rows_of(torch.tensor([9, 1])).tolist() == [8, 0]
    after = head.item_vectors()
    torch.testing.assert_close(after[:7], before)
    torch.testing.assert_close(after[7:], head.content_proj(new_content))  # table rows are zero
    assert torch.equal(head.item_table[7:], torch.zeros(2, 4))


def test_add_items_errors() -> None:
    with pytest.raises(ValueError, match="mode='id' has no content"):
        _head("id").add_items(torch.randn(1, 5))
    head = _head("content")
    with pytest.raises(ValueError, match="D=5 columns"):
        head.add_items(torch.randn(1, 3))
    with pytest.raises(ValueError, match="must all be > 7"):
        head.add_items(torch.randn(1, 5), torch.tensor([7]))
    with pytest.raises(ValueError, match="unknown item id 99"):
        head.rows_of(torch.tensor([99]))


def test_id_dropout_only_while_training() -> None:
    head = _head("both", id_dropout=0.5)
    head.eval()
    torch.testing.assert_close(head.item_vectors(), head.item_vectors())
    with pytest.raises(ValueError, match="`id_dropout` needs mode='both'"):
        DenseHeadConfig(input_dim=4, mode="content", id_dropout=0.1)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="`mode` must be one of"):
        DenseHeadConfig(input_dim=4, mode="table")
    with pytest.raises(ValueError, match="`dim` must be a positive int, got 0"):
        DenseHeadConfig(input_dim=4, dim=0)
    with pytest.raises(ValueError, match="`content_embeddings` is required"):
        DenseHead(DenseHeadConfig(input_dim=4, mode="content"), torch.arange(1, 3))
    with pytest.raises(ValueError, match="`code_dim` and `content_dim` are for a head whose model holds its items"):
        DenseHead(DenseHeadConfig(input_dim=4, code_dim=4), torch.arange(1, 3))  # a T5 head has no codes handed in
