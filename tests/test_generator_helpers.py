"""Shared helpers for the generator tests: a small random dataset folder and semantic IDs for it.

(Named ``test_generator_*`` so it sits with the tests it serves; its one test checks the helpers themselves.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semid.data import load_dataset
from semid.ids import SemanticIDs
from semid.split import leave_one_out
from tests.conftest import write_canonical

NUM_ITEMS = 40


def write_random_dataset(folder: Path, num_users: int = 24, num_items: int = NUM_ITEMS, seed: int = 0) -> Path:
    """Users walk the catalogue in steps of 1 or 2 (learnable), 3..12 items each; titles "item <id>"."""
    rng = np.random.default_rng(seed)
    items = [(f"item {i}", ["Brand"]) for i in range(1, num_items + 1)]
    sequences = {}
    for u in range(1, num_users + 1):
        n, start, step = int(rng.integers(3, 13)), int(rng.integers(0, num_items)), int(rng.integers(1, 3))
        sequences[u] = [(start + step * j) % num_items + 1 for j in range(n)]
    return write_canonical(folder, items, sequences)


def random_ids(num_items: int = NUM_ITEMS, seed: int = 0, sizes: tuple[int, ...] = (4, 4, 4)) -> SemanticIDs:
    rng = np.random.default_rng(seed)
    return SemanticIDs.from_codes(rng.integers(0, sizes, size=(num_items, len(sizes))), sizes, extra_level_size=8)


def write_ids(path: Path, num_items: int = NUM_ITEMS, seed: int = 0) -> Path:
    random_ids(num_items, seed).save(path)
    return path


def test_helpers_write_a_loadable_dataset(tmp_path: Path) -> None:
    split = leave_one_out(load_dataset(write_random_dataset(tmp_path / "d")))
    assert split.num_users == 24 and split.num_skipped == 0
    assert random_ids().num_items == NUM_ITEMS
