"""Cold items joining a trained T5 run without retraining: codes, semantic IDs, prefix tree and dense vectors.

Once a model has been trained on the warm world of a cold-start split (``semid.coldstart``: cold items are
numbered after the warm ones), :func:`add_cold_items` gives the held-out items codes from the fitted quantizer's
``encode``, appends them to the run's ``SemanticIDs`` (``add_items``), rebuilds the prefix tree over every item and
grows the dense head with content-only vectors (``DenseHead.add_items``), so every decoder can return them.

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
    if content.ndim != 2 or content.shape[0] != item_ids.shape[0]:
        raise ValueError(f"`content_embeddings` must be (M={item_ids.shape[0]}, D), got shape {content.shape}")
    codes = np.asarray(encode(content))
    if codes.shape != (content.shape[0], ids.num_base_levels):
        raise ValueError(f"`encode` must return codes of shape ({content.shape[0]}, {ids.num_base_levels}), got {codes.shape}")
    new_ids = ids.add_items(codes, item_ids)
    tree = PrefixTree.from_semantic_ids(new_ids, layout)
    if head is not None:
        head.add_items(torch.from_numpy(content), torch.from_numpy(item_ids))
    log.info("cold start: %d items added (%d in all); %s", item_ids.size, new_ids.num_items, new_ids.collision_stats())
    return ColdCatalogue(new_ids, tree, head)
