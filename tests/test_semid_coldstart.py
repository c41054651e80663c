"""Cold-start dataset splits (``semid.coldstart``) on the tiny dataset, checked by hand (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semid.coldstart import (
    cold_start_split,
    item_recency,
    newest_items,
    read_cold_manifest,
    relabel_warm_first,
    remove_items,
    write_warm_dataset,
)
from semid.data import load_dataset
from semid.split import leave_one_out
from tests.conftest import TINY_EMBEDDINGS, TINY_SEQUENCES

SEQS = [np.array(s) for s in TINY_SEQUENCES.values()]


def test_item_recency_by_hand() -> None:
    # item 1 sits at relative positions 0, 1/4, 1, 3/4 of users 1, 3, 4, 5
    want = [2.0 / 4, (1 / 3 + 0 + 0.75 + 0.5) / 4, (2 / 3 + 0.5 + 1 + 0) / 4, (1 + 0 + 0.25) / 3, (1 + 0.5) / 2, 1.5 / 3]
    np.testing.assert_allclose(item_recency(SEQS, 6), want)
    np.testing.assert_allclose(item_recency([np.array([2])], 3), [1.0, 1.0, 1.0])  # unseen items count as newest


def test_newest_items() -> None:
    assert newest_items(SEQS, 6, 0.2).tolist() == [5]
    assert newest_items(SEQS, 6, 0.34).tolist() == [3, 5]
    assert newest_items(SEQS, 6, 0.01).tolist() == [5]  # at least one
    # items 1 and 6 tie at 0.5: the larger id counts as newer
    assert newest_items(SEQS, 6, 0.5).tolist() == [3, 5, 6]
    with pytest.raises(ValueError, match=r"`fraction` must be a number in \(0, 1\), got 1.0"):
        newest_items(SEQS, 6, 1.0)


def test_remove_items_keeps_order_and_empty_sequences() -> None:
    out = remove_items([np.array([1, 2, 3]), np.array([2, 2]), np.array([4, 2, 1])], np.array([2]))
    assert [s.tolist() for s in out] == [[1, 3], [], [4, 1]]


def test_relabel_puts_cold_items_last() -> None:
    r = relabel_warm_first(6, np.array([3, 5]))
    assert r.num_warm == 4
    assert r.new_to_old.tolist() == [0, 1, 2, 4, 6, 3, 5]
    assert r.old_to_new[r.new_to_old].tolist() == list(range(7))


def test_cold_start_split_by_hand(tiny_dataset_dir: Path) -> None:
    split = cold_start_split(load_dataset(tiny_dataset_dir), 0.34)  # cold: items 3 and 5 -> new ids 5 and 6
    assert split.cold_items.tolist() == [3, 5]
    assert split.new_cold_ids.tolist() == [5, 6]
    assert [s.tolist() for s in split.warm_sequences] == [[1, 2, 3], [2], [3, 1, 4, 2], [4, 1], [3, 2, 1, 4]]
    assert all((s <= split.num_warm).all() for s in split.warm_sequences)  # no cold item is ever trained on
    assert split.test_user_ids.tolist() == [2, 3]  # their last items, 5 and 3, are cold
    assert split.test_targets.tolist() == [6, 5]
    assert [h.tolist() for h in split.test_histories] == [[2, 5], [3, 1, 4, 2]]  # cold items stay in histories


def test_write_warm_dataset_round_trip(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(tiny_dataset_dir)
    split = cold_start_split(ds, 0.34)
    out = write_warm_dataset(ds, split, tmp_path / "warm")
    warm = load_dataset(out)
    assert warm.num_items == 4
    assert warm.catalogue.original_ids == ["A0001", "A0002", "A0004", "A0006"]
    assert [s.tolist() for s in warm.sequences] == [s.tolist() for s in split.warm_sequences]
    np.testing.assert_array_equal(warm.embeddings("tiny"), TINY_EMBEDDINGS[[0, 1, 3, 5]])
    manifest = read_cold_manifest(out)
    assert manifest["cold_items_old_ids"] == [3, 5] and manifest["new_to_old"] == [1, 2, 4, 6, 3, 5]
    # the warm world's own validation/test targets are warm items, never cold ones
    loo = leave_one_out(warm)
    assert loo.test_targets.max() <= split.num_warm
