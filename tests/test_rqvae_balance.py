"""balanced_last_level against brute force: distinct codes within every prefix group, at the least total distance."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rqvae.balance import balanced_last_level, nearest_codes


def brute_force_cost(residuals: np.ndarray, codebook: np.ndarray) -> float:
    """Least total squared distance over assignments with distinct codes (all rows of one group, g <= K)."""
    d2 = ((residuals[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    g, k = d2.shape
    return min(d2[np.arange(g), list(perm)].sum() for perm in itertools.permutations(range(k), g))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 10),
    k=st.integers(2, 5),
    prefixes=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_matches_brute_force(n: int, k: int, prefixes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, prefixes, (n, 1))
    residuals = rng.standard_normal((n, 3)).round(1)  # rounding makes ties and duplicates common
    codebook = rng.standard_normal((k, 3))
    codes = balanced_last_level(prefix, residuals, codebook)
    assert codes.shape == (n,) and codes.dtype == np.int64
    nearest = nearest_codes(residuals, codebook)
    for p in np.unique(prefix):
        rows = np.flatnonzero(prefix[:, 0] == p)
        if np.unique(nearest[rows]).size == rows.size:  # no collision: nearest codes are kept
            np.testing.assert_array_equal(codes[rows], nearest[rows])
        elif rows.size <= k:
            assert np.unique(codes[rows]).size == rows.size
            cost = ((residuals[rows] - codebook[codes[rows]]) ** 2).sum()
            assert np.isclose(cost, brute_force_cost(residuals[rows], codebook))
        else:  # more items than codes: every code is used, the collisions that remain are unavoidable
            assert np.unique(codes[rows]).size == k


def test_no_prefix_means_one_group() -> None:
    residuals = np.zeros((3, 2))
    codes = balanced_last_level(np.zeros((3, 0), np.int64), residuals, np.eye(4, 2))
    assert np.unique(codes).size == 3
