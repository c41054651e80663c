"""``hybrid`` for the T5 generator: the beam's and the dense head's top C items pooled, ranked by the run's fusion.

The pool of a history is the union of the beam's top C and the dense head's top C items (C = ``num_candidates``).
Every candidate gets its generative log-likelihood by teacher forcing (``generator.t5.step.score_codes``:
the sum over levels of the code log-probability renormalised over the tokens the prefix tree allows after the
candidate's prefix, exactly the beam's score for the beam's items, a proper distribution over items) and its dense
log-softmax over the whole catalogue (a proper distribution too). :meth:`T5Hybrid.parts` hands both to the fusions
every design shares (``generator.decoding.fusion``: the pool blend ``alpha * gen + (1 - alpha) * dense``, LIGER,
reciprocal-rank or learned; not ``full``, which needs every item's generative score), chosen on validation users
by the run layer (``generator.runs.fusion_store``). The blend at alpha = 1 gives the generative order (the beam's
order on its items); alpha = 0 the dense top-k exactly.

Shapes: B histories, S encoder tokens, C candidates per list, W pool width (<= 2C), N items, L code levels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from generator.decoding.fusion import POOL_FUSIONS, Parts, check_fusion, fused_ranking, union_rows
from generator.decoding.protocol import BLEND, FUSED, Histories, Ranking, check_beams, check_int_in, check_k
from generator.models.dense import DenseHead, encode_queries
from generator.t5.beam import beam_search
from generator.t5.dense import check_aligned, eval_item_vectors
from generator.t5.step import score_codes
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.tree import PrefixTree


class T5Hybrid:
    """``hybrid``: the beam's and the dense head's top ``num_candidates`` items pooled, ranked by ``fusion``.

    Args:
        model, tree, layout: the T5 generator, the items' prefix tree (on the model's device) and its layout.
        head, ids: the dense head and the semantic IDs, row for row (as for ``T5Dense``).
        fusion: (kind, params), one of :data:`~generator.decoding.fusion.POOL_FUSIONS`, chosen on validation.
        num_candidates: C, candidates per history from each of beam and dense; the pool holds C to 2C items.
        num_beams: beams of the beam search (it runs with max(num_beams, C)).
        search: the beam search, ``generator.t5.beam.beam_search`` or one with its signature and result.
    """

    name, leaves = "hybrid", False

    def __init__(self, model: nn.Module, tree: PrefixTree, layout: TokenLayout, head: DenseHead, ids: SemanticIDs, *,
                 fusion: tuple[str, dict[str, Any]], num_candidates: int = 50, num_beams: int = 20,
                 search: Callable[..., Ranking] = beam_search) -> None:
        check_aligned(head, ids)
        check_int_in("num_candidates", num_candidates, 1, ids.num_items, "the catalogue size")
        check_fusion(*fusion)
        if fusion[0] not in POOL_FUSIONS:
            raise ValueError(f"fusion {fusion[0]!r} needs every item's generative score, which the T5 hybrid has for its "
                             f"pool only: use one of {list(POOL_FUSIONS)}")
        self.model, self.tree, self.layout, self.head, self.ids = model, tree, layout, head, ids
        self.fusion, self.num_candidates, self.num_beams, self.search = fusion, num_candidates, num_beams, search
        self.score = BLEND if fusion[0] == "blend" else FUSED
        self._codes = torch.from_numpy(ids.codes)  # (N, L), row i is item head.item_ids[i]
        self._vecs: torch.Tensor | None = None  # all N item vectors, computed on first use or by refresh (see T5Dense)

    def refresh(self) -> torch.Tensor:
        """(Re)compute every item vector (N, d) from the head's current weights."""
        self._vecs = eval_item_vectors(self.head)
        return self._vecs

    @torch.no_grad()
    def parts(self, histories: Histories) -> Parts:
        """What the fusions read: the beam's top C (the generative list), the dense top C, the dense log-softmax of
        every item and the teacher-forced log-likelihood of every pool candidate (-inf outside the pool)."""
        C = self.num_candidates
        input_ids, attention_mask = histories.tokens, histories.mask.long()
        res = self.search(self.model, input_ids, attention_mask, self.tree, self.layout, k=C, num_beams=max(self.num_beams, C))
        device = res.items.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        was_training = self.head.training
        self.head.eval()
        query = encode_queries(self.model, self.head, input_ids, attention_mask)  # (B, d)
        self.head.train(was_training)
        vecs = self._vecs if self._vecs is not None else self.refresh()
        N = vecs.shape[0]
        logits = query @ vecs.T  # (B, N)
        log_z = torch.logsumexp(logits, dim=1, keepdim=True)  # (B, 1)
        gen_rows = torch.where(res.items >= 0, self.head.rows_of(res.items.clamp_min(self.head.item_ids[0])), -1)
        dense_rows = logits.topk(C, dim=1).indices
        rows, valid = union_rows(gen_rows, dense_rows, -1)  # (B, 2C), the pool the fusions will form again
        codes = self._codes.to(device)[rows.clamp_min(0)]  # (B, 2C, L)
        gen = score_codes(self.model, input_ids, attention_mask, self.tree, self.layout, codes).to(logits.dtype)
        exact = logits.new_full((logits.shape[0], N + 1), float("-inf"))  # column N takes the empty slots
        exact.scatter_(1, torch.where(valid, rows, N), torch.where(valid, gen, float("-inf")))
        return Parts(exact[:, :N], logits - log_z, gen_rows, torch.zeros(0, dtype=torch.long, device=device), dense_rows)

    def codes_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        codes = self._codes.to(rows.device)[rows.clamp_min(0)]
        return torch.where(rows[..., None] >= 0, codes, -1)

    def __call__(self, histories: Histories, k: int) -> Ranking:
        """Top-k (B, k) of the fused pool; k <= num_candidates."""
        check_k(k, self.num_candidates, "the hybrid's candidates per list, `num_candidates`")
        check_beams(max(self.num_beams, self.num_candidates), 1, self.ids.num_items)
        parts = self.parts(histories)
        return fused_ranking(self.fusion, parts, k, self.head.item_ids.to(parts.dense.device), self.codes_of_rows)
