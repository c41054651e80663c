"""Item embeddings that carry collaborative signal beside the text: the input of semantic IDs aligned with what
users consume together (LETTER's aim, without its joint training).

A trained run's dense item vectors (learned from training sequences only; leave-one-out keeps every validation and
test target out of them) are L2-normalised and placed beside the items' L2-normalised text embeddings, weighted by
``weight``. Codebooks fitted on the result group items that read alike *and* are consumed alike, so the first code
levels predict the next item better (experiments/results/study.md, lever ``cf-codes``).

An item with no vector (one added after the run was trained) gets zeros there: its codes come from its text alone.
"""

from __future__ import annotations

import numpy as np


def with_collaborative(text: np.ndarray, vectors: np.ndarray, item_ids: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """(N_all, D_text + D) float32 rows in item-id order (row i is item i + 1): the normalised text embedding, then
    ``weight`` x the normalised item vector.

    Args:
        text: float (N_all, D_text), row i is item i + 1.
        vectors: float (N, D), row r is item ``item_ids[r]``.
        item_ids: int (N,) in 1..N_all, distinct.
        weight: the collaborative half's weight (> 0; 1 gives both halves unit norm).
    """
    text, vectors, item_ids = np.asarray(text), np.asarray(vectors), np.asarray(item_ids)
    if text.ndim != 2 or vectors.ndim != 2:
        raise ValueError(f"text embeddings and item vectors must be 2-D, got shapes {text.shape} and {vectors.shape}")
    if vectors.shape[0] != item_ids.shape[0]:
        raise ValueError(f"{vectors.shape[0]} item vectors for {item_ids.shape[0]} item ids")
    if not (isinstance(weight, (int, float)) and weight > 0 and np.isfinite(weight)):
        raise ValueError(f"`weight` must be a positive number, got {weight!r}")
    if item_ids.size and (item_ids.min() < 1 or item_ids.max() > text.shape[0]):
        raise ValueError(f"item ids span {item_ids.min()}..{item_ids.max()}, but the text embeddings have rows for items "
                         f"1..{text.shape[0]}: the run was trained on another catalogue")
    if np.unique(item_ids).size != item_ids.size:
        raise ValueError("item ids repeat: one vector per item")
    t = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cf = np.zeros((text.shape[0], v.shape[1]), dtype=np.float32)
    cf[item_ids - 1] = v
    return np.concatenate([t.astype(np.float32), np.float32(weight) * cf], axis=1)
