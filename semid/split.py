"""The leave-one-out split of a dataset (TIGER's protocol): per user, the last item is the test target, the one before
it the validation target, the rest the training sequence."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from semid.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # holds arrays: compare contents, not with ==
class Split:
    """Leave-one-out split: the last item of each user is the test target, the one before the validation target.

    Users with fewer than 3 items are left out (listed in ``skipped_users``). U' below is the number kept.

    Attributes:
        user_ids: LongArray (U',) of the users kept, in dataset order.
        sequences: U' full sequences (LongArrays of item ids), kept so histories are views, not copies.
        train: U' training prefixes, ``sequences[i][:-2]`` (length >= 1).
        valid_targets: LongArray (U',), ``sequences[i][-2]``.
        test_targets: LongArray (U',), ``sequences[i][-1]``.
        skipped_users: LongArray of the ids of users with fewer than 3 items.
    """

    user_ids: np.ndarray
    sequences: list[np.ndarray]
    train: list[np.ndarray]
    valid_targets: np.ndarray
    test_targets: np.ndarray
    skipped_users: np.ndarray

    @property
    def num_users(self) -> int:
        """U', the number of users in the split."""
        return len(self.sequences)

    @property
    def num_skipped(self) -> int:
        return int(self.skipped_users.size)

    def valid_history(self, i: int) -> np.ndarray:
        """Items user ``i`` (a row in [0, U')) saw before its validation target: ``sequences[i][:-2]``."""
        return self.sequences[i][:-2]

    def test_history(self, i: int) -> np.ndarray:
        """Items user ``i`` (a row in [0, U')) saw before its test target: ``sequences[i][:-1]``."""
        return self.sequences[i][:-1]


def leave_one_out(dataset: Dataset) -> Split:
    """Split every user's sequence into train prefix / validation target / test target (one pass over users).

    Users with fewer than 3 items cannot give all three parts; they are left out, counted in
    ``Split.skipped_users`` and reported with a logged warning.
    """
    lengths = np.fromiter((len(s) for s in dataset.sequences), dtype=np.int64, count=dataset.num_users)
    keep = lengths >= 3
    skipped = dataset.user_ids[~keep]
    if skipped.size:
        log.warning(
            "leave-one-out: %d of %d users have fewer than 3 items and are left out (first: %s)",
            skipped.size,
            dataset.num_users,
            skipped[:5].tolist(),
        )
    sequences = [s for s, k in zip(dataset.sequences, keep, strict=True) if k]
    return Split(
        user_ids=dataset.user_ids[keep],
        sequences=sequences,
        train=[s[:-2] for s in sequences],
        valid_targets=np.array([s[-2] for s in sequences], dtype=np.int64),
        test_targets=np.array([s[-1] for s in sequences], dtype=np.int64),
        skipped_users=skipped,
    )
