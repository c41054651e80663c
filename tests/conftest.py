"""Fixtures shared by the whole suite.

- ``beauty_dir``: the real Amazon Beauty folder, ``../shared/data/beauty`` (22,363 users, 12,101 items,
  ``item_emb_minilm.npy`` (12101, 384)). Tests that use it are skipped, with the reason, when it is absent; mark
  them ``@pytest.mark.realdata``.
- ``tiny_dataset_dir``: a small canonical dataset folder in ``tmp_path`` whose exact contents are the constants
  below (``TINY_ITEMS``, ``TINY_SEQUENCES``, ``TINY_EMBEDDINGS``): 6 items, 5 users all with >= 3 items (so
  leave-one-out keeps everyone and logs nothing), one item with an empty title, one with an "Unknown" brand, and
  ``item_emb_tiny.npy`` (6, 8) float32 unit rows. Import the constants with ``from tests.conftest import ...``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

BEAUTY_DIR = (Path(__file__).parents[1] / "../shared/data/beauty").resolve()

# (title, attributes) of item ids 1..6
TINY_ITEMS: list[tuple[str, list[str]]] = [
    ("Red Lipstick", ["Acme", "Makeup", "Lips"]),
    ("Blue Eyeliner", ["Acme", "Makeup", "Eyes"]),
    ("Face Cream", ["Unknown", "Skin Care", "Face"]),
    ("Hair Spray", ["Hairco", "Hair Care"]),
    ("", ["Tools"]),
    ("Nail Polish", ["Acme", "Makeup", "Nails"]),
]
# user id -> item ids, oldest first
TINY_SEQUENCES: dict[int, list[int]] = {
    1: [1, 2, 3, 4],
    2: [2, 3, 5],
    3: [4, 1, 6, 2, 3],
    4: [6, 5, 1],
    5: [3, 4, 2, 1, 6],
}
# float32 (6, 8), rows of unit L2 norm, row i is item i + 1
TINY_EMBEDDINGS: np.ndarray = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
TINY_EMBEDDINGS /= np.linalg.norm(TINY_EMBEDDINGS, axis=1, keepdims=True)
TINY_EMBEDDINGS.flags.writeable = False  # shared by every test: nobody may change it


def write_canonical(
    folder: Path, items: list[tuple[str, list[str]]], sequences: dict[int, list[int]]
) -> Path:
    """Write ``items.jsonl`` (asin ``A0001``...) and ``sequences.txt`` into ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w", encoding="utf-8") as f:
        for i, (title, attrs) in enumerate(items, start=1):
            rec = {"item_id": i, "asin": f"A{i:04d}", "title": title, "attributes": attrs}
            f.write(json.dumps(rec) + "\n")
    with open(folder / "sequences.txt", "w", encoding="utf-8") as f:
        for user, seq in sequences.items():
            f.write(" ".join(map(str, [user, *seq])) + "\n")
    return folder


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    """The real Beauty dataset folder; skips the test when ../shared/data/beauty is missing."""
    if not (BEAUTY_DIR / "items.jsonl").is_file() or not (BEAUTY_DIR / "sequences.txt").is_file():
        pytest.skip(f"real data not found at {BEAUTY_DIR} (see ../shared/data/README.md)")
    return BEAUTY_DIR


@pytest.fixture
def tiny_dataset_dir(tmp_path: Path) -> Path:
    """A tiny canonical dataset folder (see the module docstring for its exact contents)."""
    folder = write_canonical(tmp_path / "tiny", TINY_ITEMS, TINY_SEQUENCES)
    np.save(folder / "item_emb_tiny.npy", TINY_EMBEDDINGS)
    return folder


@pytest.fixture(scope="session")
def serve_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained run and a second version of it, for the service's tests (tests/serve_helpers.py)."""
    from tests.serve_helpers import build_world

    return build_world(tmp_path_factory.mktemp("serve"))
