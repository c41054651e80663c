"""``hybrid`` for the T5 generator: the beam's and the dense head's top C items pooled, re-ranked by a blend.

The candidate pool of a history is the union of the beam's top C and the dense head's top C items (C =
``num_candidates``; at most 2C, padded to 2C). Every candidate gets its generative log-likelihood by teacher forcing
(``generator.decoding.t5_step.score_codes``: the sum over levels of the code log-probability renormalised over the
tokens the prefix tree allows after the candidate's prefix, exactly the beam's score for the beam's items, a proper
distribution over items) and its dense log-softmax over the whole catalogue (a proper distribution too), so the blend

    score = alpha * gen_logprob + (1 - alpha) * dense_logprob

is a weighted product of the two experts. ``alpha`` is chosen on validation users only (:func:`choose_alpha`, called
by the run layer, ``generator.runs.fusion_store``). alpha = 1 gives the generative order (the beam's order on its
items); alpha = 0 the dense top-k exactly, since the pool holds the dense top C: on validation the chosen alpha is
never worse than dense.

Shapes: B histories, S encoder tokens, C candidates per list, W pool width (<= 2C), N items, L code levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from generator.decoding.fusion import union_rows
from generator.decoding.protocol import (
    BLEND,
    Histories,
    Ranking,
    check_alpha,
    check_beams,
    check_int_in,
    check_k,
)
from generator.decoding.t5_beam import beam_search
from generator.decoding.t5_dense import check_aligned, eval_item_vectors
from generator.decoding.t5_step import score_codes
from generator.models.dense import DenseHead, encode_queries
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.metrics import ndcg_at_k, recall_at_k
from semid.tree import PrefixTree

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class HybridCandidates(NamedTuple):
    """Candidates with both scores.

    items:         LongTensor (B, W) item ids; -1 in a padded slot.
    gen_logprob:   FloatTensor (B, W), the generative log-likelihood (the beam's score); -inf in a padded slot.
    dense_logprob: FloatTensor (B, W), the dense head's log-softmax of each candidate; -inf in a padded slot.
    codes:         LongTensor (B, W, L), the candidates' code tuples (-1 in a padded slot).
    """

    items: torch.Tensor
    gen_logprob: torch.Tensor
    dense_logprob: torch.Tensor
    codes: torch.Tensor


class AlphaChoice(NamedTuple):
    """The blend weight chosen on validation: ``alpha``, the ``metric`` it maximised, and that metric per alpha."""

    alpha: float
    metric: str
    table: dict[float, float]


def blend(cands: HybridCandidates, alpha: float) -> torch.Tensor:
    """alpha * gen + (1 - alpha) * dense, (B, W); -inf wherever the beam left a slot empty."""
    check_alpha(alpha)
    mixed = alpha * cands.gen_logprob + (1.0 - alpha) * cands.dense_logprob
    return torch.where(torch.isfinite(cands.gen_logprob), mixed, float("-inf"))  # 0 * -inf would be NaN


def rerank(cands: HybridCandidates, alpha: float, k: int) -> Ranking:
    """Top-k of the candidates by the blended score, best first; ties keep the pool's order.

    Returns:
        :class:`Ranking` with items (B, k), blended scores (B, k) and codes (B, k, L); not all items are leaves.
    """
    check_k(k, cands.items.shape[1], "the candidates per history")
    scores = blend(cands, alpha)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # (B, k)
    L = cands.codes.shape[2]
    return Ranking(cands.items.gather(1, order), scores.gather(1, order),
                   cands.codes.gather(1, order.unsqueeze(2).expand(-1, -1, L)), BLEND, False)


def choose_alpha(
    cands: HybridCandidates,
    targets: torch.Tensor | np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    metric: str = "ndcg@10",
) -> AlphaChoice:
    """Pick the blend weight that maximises ``metric`` on *validation* candidates and targets.

    Args:
        cands: candidates of validation histories (B, W).
        targets: (B,) the validation target item ids.
        grid: alphas to try, each in [0, 1]; on a tie the first in the grid wins.
        metric: ``"recall@K"`` or ``"ndcg@K"`` with K <= W.
    """
    name, _, k_str = metric.partition("@")
    if name not in ("recall", "ndcg") or not k_str.isdigit() or not 1 <= int(k_str) <= cands.items.shape[1]:
        raise ValueError(f"`metric` must be 'recall@K' or 'ndcg@K' with 1 <= K <= {cands.items.shape[1]}, got {metric!r}")
    if len(grid) == 0:
        raise ValueError("`grid` must hold at least one alpha, got none")
    k = int(k_str)
    fn = recall_at_k if name == "recall" else ndcg_at_k
    table = {float(a): float(fn(rerank(cands, float(a), k).items, targets, k).mean()) for a in grid}  # loop over grid
    best = max(table, key=lambda a: (table[a], -list(table).index(a)))
    return AlphaChoice(best, metric, table)


class T5Hybrid:
    """``hybrid``: the beam's and the dense head's top ``num_candidates`` items pooled, ordered by the blend.

    Args:
        model, tree, layout: the T5 generator, the items' prefix tree (on the model's device) and its layout.
        head, ids: the dense head and the semantic IDs, row for row (as for ``T5Dense``).
        alpha: the blend weight in [0, 1], chosen on validation (:func:`choose_alpha`).
        num_candidates: C, candidates per history from each of beam and dense; the pool holds C to 2C items.
        num_beams: beams of the beam search (it runs with max(num_beams, C)).
        search: the beam search, ``generator.decoding.t5_beam.beam_search`` or one with its signature and result.
    """

    name, score, leaves = "hybrid", BLEND, False

    def __init__(self, model: nn.Module, tree: PrefixTree, layout: TokenLayout, head: DenseHead, ids: SemanticIDs, *,
                 alpha: float, num_candidates: int = 50, num_beams: int = 20, search: Callable[..., Ranking] = beam_search) -> None:
        check_aligned(head, ids)
        check_int_in("num_candidates", num_candidates, 1, ids.num_items, "the catalogue size")
        check_alpha(alpha)
        self.model, self.tree, self.layout, self.head, self.ids = model, tree, layout, head, ids
        self.alpha, self.num_candidates, self.num_beams, self.search = float(alpha), num_candidates, num_beams, search
        self._codes = torch.from_numpy(ids.codes)  # (N, L), row i is item head.item_ids[i]
        self._vecs: torch.Tensor | None = None  # all N item vectors, computed on first use (see T5Dense)

    @torch.no_grad()
    def candidates(self, histories: Histories) -> HybridCandidates:
        """The union of the beam's and the dense head's top C (B, 2C, padded) with both log-probabilities.

        The generative score of every candidate comes from teacher forcing (``score_codes``), equal to the beam's
        score on the beam's items; padded slots have item -1, codes -1 and both scores -inf.
        """
        C = self.num_candidates
        input_ids, attention_mask = histories.tokens, histories.mask.long()
        res = self.search(self.model, input_ids, attention_mask, self.tree, self.layout, k=C, num_beams=max(self.num_beams, C))
        device = res.items.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        was_training = self.head.training
        self.head.eval()
        query = encode_queries(self.model, self.head, input_ids, attention_mask)  # (B, d)
        self.head.train(was_training)
        if self._vecs is None:
            self._vecs = eval_item_vectors(self.head)
        N = self._vecs.shape[0]
        logits = query @ self._vecs.T  # (B, N)
        log_z = torch.logsumexp(logits, dim=1, keepdim=True)  # (B, 1)
        beam_rows = torch.where(res.items >= 0, self.head.rows_of(res.items.clamp_min(self.head.item_ids[0])), N)
        rows, valid = union_rows(beam_rows, logits.topk(C, dim=1).indices, N)  # (B, 2C)
        safe = rows.clamp_max(N - 1)
        codes = self._codes.to(device)[safe]  # (B, 2C, L)
        gen = score_codes(self.model, input_ids, attention_mask, self.tree, self.layout, codes).to(logits.dtype)
        neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=device)
        return HybridCandidates(
            torch.where(valid, self.head.item_ids.to(device)[safe], -1),
            torch.where(valid, gen, neg_inf),
            torch.where(valid, logits.gather(1, safe) - log_z, neg_inf),
            torch.where(valid[..., None], codes, -1),
        )

    def __call__(self, histories: Histories, k: int) -> Ranking:
        """Top-k (B, k) of the re-ranked candidates; k <= num_candidates."""
        check_k(k, self.num_candidates, "the hybrid's candidates per list, `num_candidates`")
        check_beams(max(self.num_beams, self.num_candidates), 1, self.ids.num_items)
        return rerank(self.candidates(histories), self.alpha, k)
