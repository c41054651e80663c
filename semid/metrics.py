"""Ranking metrics for leave-one-out evaluation over the full catalogue.

Each user has exactly one held-out target; a model returns a ranked list of item ids. With one relevant item,
Recall@K is the hit rate and NDCG@K = 1 / log2(rank + 2) when the target is at 0-based rank < K, else 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from semid.safe_read import is_int


def _target_ranks(ranked: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of each target in its ranked list, or -1. ranked: (B, K) item ids; targets: (B,)."""
    ranked = np.asarray(ranked.cpu() if isinstance(ranked, torch.Tensor) else ranked)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"`ranked` must be (B, K) and `targets` (B,), got {ranked.shape} and {targets.shape}")
    hit = ranked == targets[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def _hits(ranked: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, hit at k): k checked as :class:`RankingMetrics` checks its cut-offs (a positive int, at most the ranked
    lists' length: a list shorter than k would count as a hit at k what was never ranked that deep)."""
    if not is_int(k) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}")
    ranks = _target_ranks(ranked, targets)
    columns = np.shape(ranked)[1]
    if k > columns:
        raise ValueError(f"`ranked` has {columns} columns, fewer than k={k}")
    return ranks, (ranks >= 0) & (ranks < k)


def recall_at_k(ranked: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Per-user Recall@k (0 or 1). ranked: (B, K>=k) item ids, best first; targets: (B,). Returns float (B,)."""
    return _hits(ranked, targets, k)[1].astype(np.float64)


def ndcg_at_k(ranked: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Per-user NDCG@k with one relevant item. Returns float (B,)."""
    ranks, hit = _hits(ranked, targets, k)
    return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


class RankingMetrics:
    """Accumulates Recall@K and NDCG@K over batches; ``compute()`` gives the means keyed ``recall@K``, ``ndcg@K``;
    ``ranks()`` each user's target rank (-1: not in the ranking), in the order of the updates (for paired tests)."""

    def __init__(self, ks: Iterable[int] = (5, 10)) -> None:
        ks = tuple(ks)
        if not ks or any(not is_int(k) or k < 1 for k in ks):  # (2.5 was 2)
            raise ValueError(f"`ks` must be positive ints, got {ks!r}")
        self.ks = tuple(sorted({int(k) for k in ks}))  # each cut-off once (a repeated one was counted twice)
        self.reset()

    def reset(self) -> None:
        self._sums = {f"{m}@{k}": 0.0 for k in self.ks for m in ("recall", "ndcg")}
        self._ranks: list[np.ndarray] = []
        self.count = 0

    def update(self, ranked: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> None:
        """ranked: (B, K) item ids, best first, K >= max(ks); targets: (B,) (arrays, tensors or lists)."""
        ranked = ranked.cpu().numpy() if isinstance(ranked, torch.Tensor) else np.asarray(ranked)
        if ranked.ndim != 2:
            raise ValueError(f"`ranked` must be (users, k) item ids, got shape {ranked.shape}")
        if ranked.shape[1] < max(self.ks):
            raise ValueError(f"`ranked` has {ranked.shape[1]} columns, fewer than k={max(self.ks)}")
        ranks = _target_ranks(ranked, targets)
        self._ranks.append(np.asarray(ranks, dtype=np.int64))
        for k in self.ks:
            hit = (ranks >= 0) & (ranks < k)
            self._sums[f"recall@{k}"] += float(hit.sum())
            self._sums[f"ndcg@{k}"] += float(np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0).sum())
        self.count += int(ranks.shape[0])

    def ranks(self) -> np.ndarray:
        """int64 (users,): each user's target rank in its ranking (0 = first; -1: not in it)."""
        return np.concatenate(self._ranks) if self._ranks else np.empty(0, dtype=np.int64)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no users were evaluated: call `update` first")
        return {name: s / self.count for name, s in self._sums.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over users with a percentile bootstrap interval (users resampled with replacement, the
    same users for both: a paired comparison). a, b: per-user metric values (U,). Returns (mean, low, high)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"`a` and `b` must be non-empty per-user arrays of one shape, got {a.shape} and {b.shape}")
    if not is_int(resamples) or resamples < 1:
        raise ValueError(f"`resamples` must be a positive int, got {resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must be in (0, 1), got {level!r}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for lo in range(0, resamples, 100):  # loop over blocks of 100 resamples (memory 100 x U)
        n = min(100, resamples - lo)
        means[lo : lo + n] = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(diff.mean()), float(low), float(high)
