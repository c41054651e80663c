"""``dense`` for the T5 generator: top-k items by inner product of the dense head's query with every item vector.

A softmax over all items is maximum inner-product search: the head's query ``q`` (B, d) against the item vectors
(N, d), exactly or through a faiss index (``generator.decoding.mips``). The item vectors are computed once, when the
decoder is first called; :meth:`T5Dense.refresh` computes them again after the head's weights change (training
validation builds a new decoder for every validation pass).

Shapes: B histories, S encoder tokens, N items, d vector dim, L code levels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from generator.decoding.mips import MIPSIndex
from generator.decoding.protocol import INNER_PRODUCT, Histories, Ranking, check_k
from generator.models.dense import DenseHead, encode_queries
from semid.ids import SemanticIDs


@torch.no_grad()
def eval_item_vectors(head: DenseHead) -> torch.Tensor:
    """All N item vectors (N, d) with the head in eval mode (its mode is restored)."""
    was_training = head.training
    head.eval()
    try:
        return head.item_vectors()
    finally:
        head.train(was_training)


def check_aligned(head: DenseHead, ids: SemanticIDs) -> None:
    if head.num_items != ids.num_items or not np.array_equal(head.item_ids.cpu().numpy(), ids.item_ids):
        raise ValueError(
            f"the dense head's {head.num_items} items are not the semantic IDs' {ids.num_items} items, row for row: "
            "add cold items to both (DenseHead.add_items, SemanticIDs.add_items)"
        )


class T5Dense:
    """``dense``: the T5 encoder's dense query against every item vector.

    Args:
        model: the T5 generator (its encoder makes the query); head: its dense head, whose items are ``ids``'s, row
            for row; ids: the semantic IDs, for the returned items' codes.
        kind: the :class:`MIPSIndex` kind; index_options: passed to :meth:`MIPSIndex.build` (``nlist``, ``nprobe``,
            ``hnsw_m``, ``ef_search``).
    Scores are raw inner products q . v (with ``normalize``, cosine over the temperature).
    """

    name, score, leaves = "dense", INNER_PRODUCT, False

    def __init__(self, model: nn.Module, head: DenseHead, ids: SemanticIDs, *, kind: str = "exact", **index_options: Any) -> None:
        check_aligned(head, ids)
        self.model, self.head, self.ids, self.kind, self.index_options = model, head, ids, kind, index_options
        self._codes = torch.from_numpy(ids.codes)  # (N, L), row i is item head.item_ids[i]
        self.index: MIPSIndex | None = None

    @torch.no_grad()
    def refresh(self) -> MIPSIndex:
        """(Re)build the index from the head's current item vectors."""
        self.index = MIPSIndex.build(eval_item_vectors(self.head), self.head.item_ids, self.kind, **self.index_options)
        return self.index

    @torch.no_grad()
    def __call__(self, histories: Histories, k: int) -> Ranking:
        """Top-k (B, k) for T5 encoder inputs (B, S)."""
        check_k(k, self.head.num_items, "the catalogue size")
        index = self.index if self.index is not None else self.refresh()
        query = encode_queries(self.model, self.head, histories.tokens, histories.mask.long())  # (B, d)
        res = index.search(query, k)
        rows = self.head.rows_of(res.item_ids.clamp_min(self.head.item_ids[0]))
        codes = torch.where(res.item_ids.unsqueeze(-1) >= 0, self._codes.to(rows.device)[rows], -1)  # (B, k, L)
        return Ranking(res.item_ids, res.scores.float(), codes, INNER_PRODUCT, False)
