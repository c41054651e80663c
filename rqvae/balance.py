"""Balanced assignment of the last level: fewer collisions by design.

Nearest-code assignment gives near-duplicate items (product variants, items with the same text) the same full code
tuple, and the extra level must then tell them apart. LETTER (Wang et al., CIKM 2024) balances code assignment with
capacity constraints. Here the capacity is placed where collisions happen: within each prefix (the first L - 1
codes), every last-level code is used at most once. Within a prefix group that is a minimum-distortion assignment
problem (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) on the squared distances between the
items' last residuals and the last codebook; items of a group that plain assignment does not collide keep their
nearest code. No two items share a tuple unless a prefix holds more than K items.

Only the fitted item set is assigned this way. Items encoded later (cold start) take their nearest code, which may
collide; the extra level of the semantic IDs separates them.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)


def nearest_codes(residuals: np.ndarray, codebook: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Index of the nearest code (squared L2) of each residual.

    Args:
        residuals: FloatArray (N, d).
        codebook: FloatArray (K, d).

    Returns:
        LongArray (N,) in [0, K).
    """
    c2 = (codebook.astype(np.float64) ** 2).sum(axis=1)
    out = np.empty(residuals.shape[0], dtype=np.int64)
    for start in range(0, residuals.shape[0], chunk):
        r = residuals[start : start + chunk].astype(np.float64)
        out[start : start + chunk] = np.argmin(c2[None, :] - 2.0 * r @ codebook.T.astype(np.float64), axis=1)
    return out


def balanced_last_level(prefix: np.ndarray, residuals: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Last-level codes such that no two items with the same prefix share a code (where K allows).

    Args:
        prefix: LongArray (N, L - 1), the items' codes at the levels before the last (L - 1 may be 0).
        residuals: FloatArray (N, d), what the last level quantizes.
        codebook: FloatArray (K, d), the last level's codes.

    Returns:
        LongArray (N,) in [0, K): nearest codes, except in prefix groups where those collide, which get the
        assignment of least total squared distance among those with distinct codes. In a group larger than K,
        the K items of that assignment get distinct codes and the rest keep their nearest code.
    """
    n, k = residuals.shape[0], codebook.shape[0]
    codes = nearest_codes(residuals, codebook)
    if prefix.shape[1] == 0:
        group = np.zeros(n, dtype=np.int64)
    else:
        group = np.unique(prefix, axis=0, return_inverse=True)[1].reshape(-1)
    # groups in which some (group, nearest code) pair repeats
    _, pair_inv, pair_counts = np.unique(group * k + codes, return_inverse=True, return_counts=True)
    to_fix = np.unique(group[pair_counts[pair_inv.reshape(-1)] > 1])
    if to_fix.size == 0:
        return codes
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.stack([to_fix, to_fix + 1]))
    book = codebook.astype(np.float64)  # (K, d)
    book_sq = (book**2).sum(axis=1)  # (K,)
    overfull = 0
    for start, stop in bounds.T:
        members = order[start:stop]  # the items of one prefix group, (g,)
        r = residuals[members].astype(np.float64)  # (g, d)
        cost = (r**2).sum(axis=1)[:, None] - 2.0 * r @ book.T + book_sq[None, :]  # squared distances (g, K)
        rows, cols = linear_sum_assignment(cost)
        codes[members[rows]] = cols
        overfull += max(members.size - k, 0)
    log.info(
        "balanced last level: reassigned %d prefix groups; %d items in groups larger than K=%d",
        to_fix.size,
        overfull,
        k,
    )
    return codes
