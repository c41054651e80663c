"""The T5 design's evaluation examples from a leave-one-out split, and the seeded sample of validation users.

Lightning-free (serving batches with it); the data module that trains with it is ``generator.training.datamodules``.
"""

from __future__ import annotations

import logging

import numpy as np

from generator.training.examples import (
    MAX_HISTORY,
    Examples,
    history_examples,
)
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.split import Split

log = logging.getLogger(__name__)


def sample_users(num_users: int, max_users: int | None, seed: int) -> np.ndarray:
    """Sorted rows of a seeded random sample of ``max_users`` users (all of them when None or larger)."""
    if max_users is not None and (not isinstance(max_users, int) or max_users < 1):
        raise ValueError(f"`max_users` must be a positive int or None, got {max_users!r}")
    if max_users is None or max_users >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, size=max_users, replace=False))


def split_examples(
    split: Split,
    ids: SemanticIDs,
    layout: TokenLayout,
    which: str,
    *,
    rows: np.ndarray | None = None,
    max_history: int = MAX_HISTORY,
    use_user_tokens: bool = True,
) -> Examples:
    """The validation or test examples of ``split`` (one per user; ``rows`` picks users)."""
    if which not in ("valid", "test"):
        raise ValueError(f"`split` must be 'valid' or 'test', got {which!r}")
    rows = np.arange(split.num_users) if rows is None else np.asarray(rows)
    history = split.valid_history if which == "valid" else split.test_history
    targets = split.valid_targets if which == "valid" else split.test_targets
    return history_examples(
        [history(int(i)) for i in rows],
        targets[rows],
        split.user_ids[rows] if use_user_tokens else None,
        ids,
        layout,
        max_history=max_history,
    )


def eval_batches(lengths: np.ndarray, batch_size: int, rank: int = 0, num_replicas: int = 1) -> list[list[int]]:
    """This process's share of the examples, sorted by length, in batches of ``batch_size`` (deterministic)."""
    mine = np.arange(rank, len(lengths), num_replicas)
    mine = mine[np.argsort(lengths[mine], kind="stable")]
    return [mine[i : i + batch_size].tolist() for i in range(0, mine.size, batch_size)]
