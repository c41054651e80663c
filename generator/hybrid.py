"""The dense and hybrid decoders: MIPS over the dense head's item vectors, and beam candidates re-ranked by a blend.

Beam search proposes M candidates per history with their generative log-probability (sum of renormalised code
log-probabilities, a proper distribution over items). The dense head scores the same items; as a log-softmax over
the whole catalogue that is a proper distribution too, so the blend

    score = alpha * gen_logprob + (1 - alpha) * dense_logprob

is a weighted product of the two experts. ``alpha`` is chosen on validation users only (:func:`choose_alpha`).
alpha = 1 gives the beam order back; alpha = 0 the dense order among the beam's candidates.

:class:`DenseDecoder` and :class:`HybridDecoder` are callables with the signature and return of
``generator.decode.generate_topk`` (``(model, input_ids, attention_mask, tree, layout, *, k, num_beams) ->
BeamResult``), so evaluation and recommendation treat every decoder alike.

Dimensions: B histories, S encoder tokens, M candidates, N items, d vector dim, L code levels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from generator.beam import fast_topk
from generator.decode import BeamResult, check_beam_args
from generator.dense import DenseHead, encode_queries
from generator.mips import MIPSIndex
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.metrics import ndcg_at_k, recall_at_k
from semid.tree import PrefixTree

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class HybridCandidates(NamedTuple):
    """Beam candidates with both scores.

    items:         LongTensor (B, M) item ids.
    gen_logprob:   FloatTensor (B, M), the beam's scores; -inf for a slot beam search could not fill.
    dense_logprob: FloatTensor (B, M), the dense head's log-softmax (or raw score) of each candidate.
    codes:         LongTensor (B, M, L), the candidates' code tuples.
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


def dense_candidate_scores(
    query: torch.Tensor,
    item_vecs: torch.Tensor,
    cand_rows: torch.Tensor,
    *,
    log_softmax: bool = True,
    item_chunk: int = 65536,
) -> torch.Tensor:
    """Dense scores of given candidates: q . v, minus log-sum-exp over the whole catalogue with ``log_softmax``.

    Args:
        query: FloatTensor (B, d); item_vecs: FloatTensor (N, d).
        cand_rows: LongTensor (B, M) rows in [0, N).
        item_chunk: items per block of the log-sum-exp (memory B x item_chunk).
    Returns:
        FloatTensor (B, M).
    """
    if cand_rows.ndim != 2 or cand_rows.shape[0] != query.shape[0]:
        raise ValueError(f"`cand_rows` must be (B={query.shape[0]}, M), got shape {tuple(cand_rows.shape)}")
    scores = torch.einsum("bd,bmd->bm", query, item_vecs[cand_rows])  # (B, M)
    if not log_softmax:
        return scores
    lse = torch.full((query.shape[0],), float("-inf"), dtype=query.dtype, device=query.device)
    for i0 in range(0, item_vecs.shape[0], item_chunk):  # loop over item blocks, not items
        lse = torch.logaddexp(lse, torch.logsumexp(query @ item_vecs[i0 : i0 + item_chunk].T, dim=1))
    return scores - lse.unsqueeze(1)


def hybrid_candidates(beam: BeamResult, dense_logprob: torch.Tensor) -> HybridCandidates:
    """Attach dense scores (B, M), computed for ``beam.items``, to a beam result over M candidates."""
    if dense_logprob.shape != beam.items.shape:
        raise ValueError(f"`dense_logprob` must have the beam's shape {tuple(beam.items.shape)}, got {tuple(dense_logprob.shape)}")
    return HybridCandidates(beam.items, beam.scores, dense_logprob.to(beam.scores), beam.codes)


def blend(cands: HybridCandidates, alpha: float) -> torch.Tensor:
    """alpha * gen + (1 - alpha) * dense, (B, M); -inf wherever the beam left a slot empty."""
    _check_alpha(alpha)
    mixed = alpha * cands.gen_logprob + (1.0 - alpha) * cands.dense_logprob
    return torch.where(torch.isfinite(cands.gen_logprob), mixed, float("-inf"))  # 0 * -inf would be NaN


def rerank(cands: HybridCandidates, alpha: float, k: int) -> BeamResult:
    """Top-k of the candidates by the blended score, best first; ties keep the beam's order.

    Returns:
        :class:`BeamResult` with items (B, k), blended scores (B, k) and codes (B, k, L).
    """
    M = cands.items.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= M:
        raise ValueError(f"`k` must be an int in [1, {M}] (the number of beam candidates), got {k!r}")
    scores = blend(cands, alpha)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # (B, k)
    L = cands.codes.shape[2]
    return BeamResult(
        cands.items.gather(1, order),
        scores.gather(1, order),
        cands.codes.gather(1, order.unsqueeze(2).expand(-1, -1, L)),
    )


def choose_alpha(
    cands: HybridCandidates,
    targets: torch.Tensor | np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    metric: str = "ndcg@10",
) -> AlphaChoice:
    """Pick the blend weight that maximises ``metric`` on *validation* candidates and targets.

    Args:
        cands: candidates of validation histories (B, M).
        targets: (B,) the validation target item ids.
        grid: alphas to try, each in [0, 1]; on a tie the first in the grid wins.
        metric: ``"recall@K"`` or ``"ndcg@K"`` with K <= M.
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


# ---- decoders --------------------------------------------------------------------------------------------------------
class DenseDecoder:
    """Top-k items by inner product of the dense head's query with every item vector.

    Args:
        head: the dense head (its items must be ``ids``'s, row for row).
        ids: the semantic IDs, for the returned items' codes.
        kind: the :class:`MIPSIndex` kind. ``"exact"`` recomputes the item vectors at every call (cheap, and always
            current while training); a faiss index is built on first use: call :meth:`refresh` after the head changes.
        index_options: passed to :meth:`MIPSIndex.build` (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``).
    Scores are raw inner products q . v (with ``normalize``, cosine over the temperature).
    """

    def __init__(self, head: DenseHead, ids: SemanticIDs, *, kind: str = "exact", **index_options: Any) -> None:
        _check_aligned(head, ids)
        self.head, self.ids, self.kind, self.index_options = head, ids, kind, index_options
        self._codes = torch.from_numpy(ids.codes)  # (N, L), row i is item head.item_ids[i]
        self.index: MIPSIndex | None = None

    @torch.no_grad()
    def refresh(self) -> MIPSIndex:
        """(Re)build the index from the head's current item vectors."""
        was_training = self.head.training
        self.head.eval()
        vecs = self.head.item_vectors()
        self.head.train(was_training)
        self.index = MIPSIndex.build(vecs, self.head.item_ids, self.kind, **self.index_options)
        return self.index

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tree: PrefixTree | None = None,
        layout: TokenLayout | None = None,
        *,
        k: int,
        num_beams: int | None = None,
    ) -> BeamResult:
        """Top-k (B, k) for encoder inputs (B, S); ``tree``, ``layout`` and ``num_beams`` are not used."""
        if self.index is None or self.kind == "exact":
            self.refresh()
        assert self.index is not None, "refresh() builds the index"
        query = encode_queries(model, self.head, input_ids, attention_mask)  # (B, d)
        res = self.index.search(query, k)
        rows = self.head.rows_of(res.item_ids.clamp_min(self.head.item_ids[0]))
        codes = torch.where(res.item_ids.unsqueeze(-1) >= 0, self._codes.to(rows.device)[rows], -1)  # (B, k, L)
        return BeamResult(res.item_ids, res.scores.float(), codes)


class HybridDecoder:
    """Beam search proposes ``num_candidates`` items; :func:`rerank` orders them by the blend with weight ``alpha``.

    Args:
        head, ids: as for :class:`DenseDecoder`.
        alpha: the blend weight in [0, 1], chosen on validation (:func:`choose_alpha`).
        num_candidates: M, beam candidates per history (beams used: max(num_beams, M)).
        beam: the beam-search function (``generator.beam.fast_topk`` or ``generator.decode.generate_topk``).
    """

    def __init__(
        self,
        head: DenseHead,
        ids: SemanticIDs,
        *,
        alpha: float,
        num_candidates: int = 50,
        beam: Callable[..., BeamResult] = fast_topk,
    ) -> None:
        _check_aligned(head, ids)
        check_beam_args(1, num_candidates, ids.num_items)
        _check_alpha(alpha)
        self.head, self.ids, self.alpha, self.num_candidates, self.beam = head, ids, float(alpha), num_candidates, beam

    @torch.no_grad()
    def candidates(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tree: PrefixTree,
        layout: TokenLayout, *, num_beams: int,
    ) -> HybridCandidates:
        """The beam's M candidates (B, M) with their generative and dense log-probabilities."""
        M = self.num_candidates
        res = self.beam(model, input_ids, attention_mask, tree, layout, k=M, num_beams=max(num_beams, M))
        was_training = self.head.training
        self.head.eval()
        query = encode_queries(model, self.head, input_ids.to(res.items.device), attention_mask.to(res.items.device))
        dense = dense_candidate_scores(query, self.head.item_vectors(), self.head.rows_of(res.items))
        self.head.train(was_training)
        return hybrid_candidates(res, dense)

    def __call__(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tree: PrefixTree,
        layout: TokenLayout, *, k: int, num_beams: int,
    ) -> BeamResult:
        """Top-k (B, k) of the re-ranked candidates; k <= num_candidates."""
        return rerank(self.candidates(model, input_ids, attention_mask, tree, layout, num_beams=num_beams), self.alpha, k)


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")


def _check_aligned(head: DenseHead, ids: SemanticIDs) -> None:
    if head.num_items != ids.num_items or not np.array_equal(head.item_ids.cpu().numpy(), ids.item_ids):
        raise ValueError(
            f"the dense head's {head.num_items} items are not the semantic IDs' {ids.num_items} items, row for row: "
            "add cold items to both (DenseHead.add_items, SemanticIDs.add_items)"
        )
