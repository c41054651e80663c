"""A run's users and histories as batches of :class:`~generator.decoding.protocol.Histories`, as its design
featurises them (``generator.designs``: encoder tokens for T5, one position per item for the item-level designs).
Both batch evaluation users by history length, in a deterministic order, so little is padded. Lightning-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from generator.decoding.protocol import Histories
from generator.designs.base import Labelled
from generator.designs.registry import DESIGNS
from semid.split import Split

__all__ = ["Labelled", "history_batches", "split_batches"]


def split_batches(run: Any, split: Split, which: str, rows: np.ndarray, batch_size: int) -> list[Labelled]:
    """The ``which`` ("valid" | "test") users ``rows`` of ``split`` in batches of up to ``batch_size``."""
    return DESIGNS[run.design].split_batches(run, split, which, rows, batch_size)


def history_batches(run: Any, histories: list[np.ndarray], user_ids: np.ndarray | None, batch_size: int) -> list[Histories]:
    """Histories of known item ids (oldest first), in their order, in batches of up to ``batch_size``."""
    return DESIGNS[run.design].history_batches(run, histories, user_ids, batch_size)
