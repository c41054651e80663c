"""A run's users and histories as batches of :class:`~generator.decoding.protocol.Histories`, as its design
featurises them (``generator.designs``: encoder tokens for T5, one position per item for the item-level designs).
Both batch evaluation users by history length, in a deterministic order, so little is padded. Lightning-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from generator.decoding.protocol import Histories
from generator.designs.base import Labelled
from generator.designs.registry import DESIGNS
from semid.safe_read import is_int
from semid.split import Split

__all__ = ["Labelled", "history_batches", "int_ids", "split_batches"]


def int_ids(values: Any, name: str) -> np.ndarray:
    """``values`` (a list or 1-D array of integer ids) as int64 (n,); a ValueError naming ``name`` for anything else: a
    string (read character by character), floats, bools, ids beyond int64, nesting (numpy would take them all)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"`{name}` must be a list of int ids, got {values!r}"[:300])
    values = values if hasattr(values, "__len__") else list(values)  # (a generator: read once)
    arr = np.asarray(values) if len(values) else np.zeros(0, np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.uint64 and arr.size and arr.max() >= 2**63:
        raise ValueError(f"`{name}` must be a list of int ids (within int64), got {values!r}"[:300])
    return arr.astype(np.int64, copy=False)


def _check_batch_size(batch_size: Any) -> None:
    if not is_int(batch_size) or batch_size < 1:  # (numpy's ints too)
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")


def split_batches(run: Any, split: Split, which: str, rows: np.ndarray, batch_size: int) -> list[Labelled]:
    """The ``which`` ("valid" | "test") users ``rows`` of ``split`` in batches of up to ``batch_size``."""
    _check_batch_size(batch_size)
    return DESIGNS[run.design].split_batches(run, split, which, rows, batch_size)


def history_batches(run: Any, histories: list[np.ndarray], user_ids: np.ndarray | None, batch_size: int) -> list[Histories]:
    """Histories of known item ids (oldest first), in their order, in batches of up to ``batch_size``."""
    _check_batch_size(batch_size)
    return DESIGNS[run.design].history_batches(run, histories, user_ids, batch_size)
