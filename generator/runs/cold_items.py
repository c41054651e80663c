"""Items that came after training, joining a trained run without retraining: codes, semantic IDs, tree, dense vectors.

:func:`extend_ids` is the one way new items get semantic IDs: codes from the fitted quantizer's ``encode`` of their
embeddings, appended to the run's ``SemanticIDs`` (``add_items``: existing tuples unchanged). ``semid add-items``
(``generator.runs.catalogue``, causal runs, for good) writes the result as a new IDs version, and the model grows
at load (``generator.runs.lineage``; its dense head through ``DenseHead.add_items``). In process, for a T5 run
trained on the warm world of a cold-start split (``semid.coldstart``: cold items are numbered after the warm ones),
:func:`add_cold_items` also rebuilds the prefix tree over every item and grows the dense head with content-only
vectors (``DenseHead.add_items``), so every decoder can return them.

Splitting the dataset itself (``cold_start_split``, ``write_warm_dataset``, ``write_full_dataset``, ...) is
``semid.coldstart``; nothing here needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from generator.models.dense import DenseHead
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.tree import PrefixTree

log = logging.getLogger(__name__)


class ColdCatalogue(NamedTuple):
    """The catalogue after cold items joined it: new IDs, their prefix tree, and the (grown, same) dense head."""

    ids: SemanticIDs
    tree: PrefixTree
    head: DenseHead | None


def add_cold_items(
    ids: SemanticIDs,
    layout: TokenLayout,
    content_embeddings: np.ndarray,
    item_ids: np.ndarray,
    *,
    encode: Callable[[np.ndarray], np.ndarray],
    head: DenseHead | None = None,
) -> ColdCatalogue:
    """Give items that came after training codes, a place in the tree and dense vectors, without retraining.

    Args:
        ids: the semantic IDs the model was trained with; layout: its token layout (unchanged: same vocabulary).
        content_embeddings: float (M, D), the new items' content embeddings (the quantizer's and head's input).
        item_ids: int (M,), ascending, above every current id.
        encode: the fitted quantizer's ``encode``: float (M, D) -> int (M, L) base codes (``rqvae`` quantizers).
        head: the dense head, grown in place with content-only vectors (``DenseHead.add_items``), if any.
    """
    content = np.asarray(content_embeddings, dtype=np.float32)
    item_ids = np.asarray(item_ids, dtype=np.int64)
    new_ids = extend_ids(ids, content, item_ids, encode=encode)
    tree = PrefixTree.from_semantic_ids(new_ids, layout)
    if head is not None:
        head.add_items(torch.from_numpy(content), torch.from_numpy(item_ids))
    log.info("cold start: %d items added (%d in all); %s", item_ids.size, new_ids.num_items, new_ids.collision_stats())
    return ColdCatalogue(new_ids, tree, head)


def extend_ids(ids: SemanticIDs, embeddings: np.ndarray, item_ids: np.ndarray, *,
               encode: Callable[[np.ndarray], np.ndarray]) -> SemanticIDs:
    """``ids`` extended by new items: float (M, D) ``embeddings`` (the quantizer's input) -> codes by ``encode``
    (int (M, L) base codes), appended for ``item_ids`` (M,), ascending, above every current id."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(item_ids):
        raise ValueError(f"the new items' embeddings must be (M={len(item_ids)}, D), got shape {embeddings.shape}")
    codes = np.asarray(encode(embeddings))
    if codes.shape != (embeddings.shape[0], ids.num_base_levels):
        raise ValueError(f"`encode` must return codes of shape ({embeddings.shape[0]}, {ids.num_base_levels}), got {codes.shape}")
    return ids.add_items(codes, np.asarray(item_ids, dtype=np.int64))
