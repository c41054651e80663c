"""The hybrid decoder's fusions of a generative and a dense head, chosen on validation users: one for every design.

A design's hybrid hands the fusion :class:`Parts`: ``exact`` (B, N), each item's generative log-likelihood, and
``dense`` (B, N), the dense head's log-softmax, plus the *generative list* (the generative top C) and the dense top C.
The causal model scores the whole catalogue (``generator.decoding.causal.CausalDecoders.parts``: exact = every
item's log-likelihood, one matrix product per level; the generative list is the exact top C, what beam search
returns when it finds the best C); the T5 hybrid (``generator.t5.hybrid``) scores the pool only, by
teacher forcing its candidates (its ``exact`` is -inf outside the pool, and the generative list is the beam's top C).
Items added after training are scored on the trained items' scale. A fusion ranks items by:

- ``blend``   the pool of the generative top-C and the dense top-C, ranked by ``alpha * exact + (1 - alpha) * dense``.
- ``full``    the same blend over *every* item (a weighted product of the two experts); no pool. Needs ``exact``
  for every item (not the T5 hybrid's: :data:`POOL_FUSIONS` are the others).
- ``levels``  ``full`` level by level: the exact score is a sum over code levels of log p(code_l | codes before),
  and the dense log-softmax is the same kind of sum along the prefix tree (the item's share of its depth-(l + 1)
  node's mass, as a share of its depth-l node's: :func:`dense_levels`); level l's term is ``a_l * code_l + (1 - a_l)
  * dense_l``. Equal weights are ``full``; weights 0 then 1 take the coarse levels from the dense head and the item
  within its last prefix from the code head. Needs the per-level terms (the causal hybrid's ``parts(levels=True)``).
- ``liger``   LIGER's scheme: the generative top-C plus every cold item (items added after training), ranked densely.
- ``rrf``     reciprocal-rank fusion of the two top-C lists: ``1/(k0 + 1 + rank_gen) + 1/(k0 + 1 + rank_dense)``.
- ``learned`` a linear score over what is known per pool candidate: both log-probabilities, whether it is in both
  lists or one, and its rank in each (a listwise softmax fitted on validation users, L2-regularised).

alpha = 0 in ``blend`` is the dense top-k exactly (the pool holds the dense top C), so the chosen fusion is never
worse than dense on the selection users. :func:`choose_fusion` fits each fusion's parameters on one sample of
validation users and picks the fusion with the best NDCG@10 on a second, disjoint sample, so the choice is made on
validation only and not on the users it was fitted to. Test users are never seen. :func:`fused_ranking` is what
both hybrids return.

Shapes: B histories, N items, C candidates per list, W pool width, F features, Nc cold items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from generator.decoding.protocol import BLEND, FUSED, Ranking, check_k
from semid.metrics import ndcg_at_k

FUSIONS = ("blend", "full", "levels", "liger", "rrf", "learned")
POOL_FUSIONS = ("blend", "liger", "rrf", "learned")  # what a hybrid whose generative scores cover its pool only can use
ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
RRF_GRID = (1.0, 5.0, 10.0, 20.0, 60.0)
LEVEL_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # each level's weight, searched one level at a time
LEVEL_SWEEPS = 2  # passes over the levels
USER_CHUNK = 1024  # histories scored at a time by the ``levels`` fusion (its per-level terms are (B, L, N))
FEATURES = ("exact", "dense", "in_both", "gen_only", "log_gen_rank", "log_dense_rank", "exact_if_gen_only",
            "dense_if_dense_only")


class Parts(NamedTuple):
    """What every fusion reads, for B histories.

    exact: (B, N) each item's log-likelihood under the code head; dense: (B, N) the dense head's log-softmax.
    gen_rows: (B, C) catalogue rows of the generative list (the generative top C), best first; -1 where it ran short.
    cold_rows: (Nc,) rows of the cold items (added after training); empty when there are none.
    dense_rows: (B, C) the dense top C, best first, where the design has it already (None: ``dense``'s top C).
    code_levels: (B, L, N) the terms of ``exact`` level by level (summing over L gives it), and item_nodes (N, L + 1)
    each item's node at every depth of the prefix tree (numbered per depth): what the ``levels`` fusion reads; None
    where a hybrid does not give them.
    """

    exact: torch.Tensor
    dense: torch.Tensor
    gen_rows: torch.Tensor
    cold_rows: torch.Tensor
    dense_rows: torch.Tensor | None = None
    code_levels: torch.Tensor | None = None
    item_nodes: torch.Tensor | None = None

    @property
    def num_candidates(self) -> int:
        return int(self.gen_rows.shape[1])


class Pool(NamedTuple):
    """Per history the union of the generative top-C and the dense top-C (W = 2C), with each candidate's features.

    rows: (B, W) catalogue rows, -1 in a padded slot; valid: (B, W) bool; features: (B, W, F) in :data:`FEATURES`
    order (0 in padded slots); gen_rank / dense_rank: (B, W) 0-based rank in that list, C where it is absent.
    """

    rows: torch.Tensor
    valid: torch.Tensor
    features: torch.Tensor
    gen_rank: torch.Tensor
    dense_rank: torch.Tensor


class FusionChoice(NamedTuple):
    """The fusion chosen on validation: its ``kind``, its ``params``, and per kind the fitted params and NDCG@10 on
    the fitting and on the selection users (``table``)."""

    kind: str
    params: dict[str, Any]
    table: dict[str, dict[str, Any]]


MAX_WEIGHT = 1e6  # learned weights are O(1..100); beyond this a score overflows float32 and the ranking means nothing


def check_fusion(kind: str, params: dict[str, Any]) -> None:
    """ValueError unless ``params`` are valid for fusion ``kind`` (the boundary check for stored and given fusions)."""
    if kind not in FUSIONS:
        raise ValueError(f"`fusion` must be one of {list(FUSIONS)}, got {kind!r}")
    if not isinstance(params, dict):
        raise ValueError(f"fusion {kind!r}: `params` must be an object, got {params!r}")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))

    if kind in ("blend", "full"):
        a = params.get("alpha")
        if not number(a) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"fusion {kind!r} needs `alpha` in [0, 1], got {a!r}")
    elif kind == "levels":
        w = params.get("weights")
        if not isinstance(w, list) or not w or not all(number(x) and 0.0 <= float(x) <= 1.0 for x in w):
            raise ValueError(f"fusion 'levels' needs `weights`: one number in [0, 1] per code level, got {w!r}")
    elif kind == "rrf":
        k0 = params.get("k0")
        if not number(k0) or not 0 < float(k0) <= MAX_WEIGHT:
            raise ValueError(f"fusion 'rrf' needs a finite `k0` > 0 and <= {MAX_WEIGHT:g}, got {k0!r}")
    elif kind == "learned":
        w = params.get("weights")
        if not isinstance(w, list) or len(w) != len(FEATURES) or not all(number(x) and abs(x) <= MAX_WEIGHT for x in w):
            raise ValueError(f"fusion 'learned' needs `weights`: {len(FEATURES)} finite numbers ({', '.join(FEATURES)}) of "
                             f"magnitude <= {MAX_WEIGHT:g} (larger ones overflow the scores), got {w!r}")


# ---- the pool and its features ---------------------------------------------------------------------------------------
def union_rows(first: torch.Tensor, second: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the union of two candidate lists, duplicates dropped, valid entries first, padded to a fixed width.

    Args:
        first, second: LongTensor (B, M1), (B, M2) catalogue rows; entries equal to ``pad`` are empty slots.
        pad: the empty-slot value (e.g. N, above every row).
    Returns:
        rows (B, M1 + M2): ``first``'s rows in its order, then ``second``'s rows that are not in ``first`` in
        ``second``'s order, then ``pad``; valid (B, M1 + M2) bool, False in the padded slots.
    """
    both = torch.cat([first, second], dim=1)  # (B, W)
    srt, perm = torch.sort(both, dim=1, stable=True)  # equal rows keep their position order: the first is kept
    dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = torch.zeros_like(dup_sorted).scatter_(1, perm, dup_sorted)  # back to position order
    valid = ~dup & (both != pad)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid slots first, in their order
    rows, valid = both.gather(1, order), valid.gather(1, order)
    return torch.where(valid, rows, pad), valid


def _ranks_in(rows: torch.Tensor, lists: torch.Tensor, absent: int) -> torch.Tensor:
    """(B, W) 0-based position of each of ``rows`` (B, W) in ``lists`` (B, C), ``absent`` where it is not there."""
    eq = (rows[:, :, None] == lists[:, None, :]) & (rows[:, :, None] >= 0)  # (B, W, C)
    return torch.where(eq.any(-1), eq.float().argmax(-1), absent)


def pool(parts: Parts) -> Pool:
    """The union of the generative top C and the dense top C, with every candidate's features (vectorised over B)."""
    C = parts.num_candidates
    dense_rows = parts.dense.topk(C, dim=1).indices if parts.dense_rows is None else parts.dense_rows  # (B, C)
    rows, valid = union_rows(parts.gen_rows, dense_rows, pad=-1)  # (B, 2C)
    safe = rows.clamp_min(0)
    exact, dense = parts.exact.gather(1, safe), parts.dense.gather(1, safe)
    gen_rank, dense_rank = _ranks_in(rows, parts.gen_rows, C), _ranks_in(rows, dense_rows, C)
    in_gen, in_dense = (gen_rank < C) & valid, (dense_rank < C) & valid
    f = torch.stack([
        exact, dense, (in_gen & in_dense).float(), (in_gen & ~in_dense).float(),
        torch.where(in_gen, torch.log1p(gen_rank.float()), 0.0), torch.where(in_dense, torch.log1p(dense_rank.float()), 0.0),
        torch.where(in_gen & ~in_dense, exact, 0.0), torch.where(in_dense & ~in_gen, dense, 0.0),
    ], dim=-1)
    # padded slots, and -inf log-probs (an item one head cannot reach), become 0; a NaN from the model stays NaN
    f = torch.where(valid[..., None] & ~torch.isneginf(f), f, 0.0)
    return Pool(rows, valid, f, gen_rank, dense_rank)


# ---- the levels fusion -------------------------------------------------------------------------------------------------
def _node_log_mass(dense: torch.Tensor, node: torch.Tensor, width: int) -> torch.Tensor:
    """(B, N): log of the probability mass of each item's node (node (N,) int64 in [0, width)), a scatter
    log-sum-exp of the dense log-softmax (B, N) over the items of each node."""
    node = node.expand(dense.shape[0], -1)
    peak = dense.new_full((dense.shape[0], width), float("-inf")).scatter_reduce(1, node, dense, reduce="amax")
    sums = dense.new_zeros(dense.shape[0], width).scatter_add(1, node, (dense - peak.gather(1, node)).exp())
    return (peak + sums.log()).gather(1, node)


def dense_levels(dense: torch.Tensor, item_nodes: torch.Tensor) -> torch.Tensor:
    """The dense log-softmax (B, N) as a sum along the prefix tree, (B, L, N): level l's term of an item is the log of
    its depth-(l + 1) node's probability mass over its depth-l node's (a node's mass: the sum over the items below
    it). Summing over levels gives ``dense`` back (the root's mass is 1). item_nodes: (N, L + 1) int64, on dense's
    device."""
    L = item_nodes.shape[1] - 1
    widths = (item_nodes.max(0).values + 1).tolist()  # nodes per depth: one read per call
    mass = [_node_log_mass(dense, item_nodes[:, d], widths[d]) for d in range(L + 1)]  # loop over depths
    return torch.stack([mass[d + 1] - mass[d] for d in range(L)], dim=1)


def _check_levels(parts: Parts) -> None:
    if parts.code_levels is None or parts.item_nodes is None:
        raise ValueError("fusion 'levels' needs each code level's log-probabilities (a causal run's hybrid gives them): "
                         "choose another fusion for this run")


def level_gaps(parts: Parts, rows: slice) -> torch.Tensor:
    """(b, L, N) code_l - dense_l of the histories ``rows``: the ``levels`` score is ``dense + sum_l a_l * gap_l``."""
    _check_levels(parts)
    return parts.code_levels[rows] - dense_levels(parts.dense[rows], parts.item_nodes)


def _levels_scores(weights: list[float], parts: Parts, rows: slice) -> torch.Tensor:
    """The ``levels`` score of the histories ``rows``, (b, N), telescoped: with m_d the log mass of an item's depth-d
    node (m_0 = 0, m_L = dense), ``sum_l a_l code_l + (1 - a_l)(m_{l+1} - m_l)`` is ``sum_l a_l code_l + (1 - a_{L-1})
    dense + sum_{0<d<L} (a_d - a_{d-1}) m_d``: only the depths where the weight changes need their node masses."""
    _check_levels(parts)
    L = parts.code_levels.shape[1]
    if len(weights) != L:
        raise ValueError(f"fusion 'levels' has {len(weights)} weights for a model of {L} code levels: choose it again "
                         "(`semid choose-fusion`)")
    dense = parts.dense[rows]
    w = torch.tensor(weights, dtype=dense.dtype, device=dense.device)
    score = torch.einsum("bln,l->bn", parts.code_levels[rows], w) + (1.0 - weights[-1]) * dense
    steps = [d for d in range(1, L) if weights[d] != weights[d - 1]]
    widths = (parts.item_nodes.max(0).values + 1).tolist() if steps else []
    for d in steps:  # loop over the depths where the weight changes
        score += (weights[d] - weights[d - 1]) * _node_log_mass(dense, parts.item_nodes[:, d], widths[d])
    return score


# ---- scoring -----------------------------------------------------------------------------------------------------------
def fuse(kind: str, params: dict[str, Any], parts: Parts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (rows (B, k), scores (B, k)) of fusion ``kind`` with ``params``; rows -1 where a pool ran short."""
    check_fusion(kind, params)
    if kind == "full":
        a = float(params["alpha"])
        scores, rows = (a * parts.exact + (1.0 - a) * parts.dense).topk(k, dim=1)
        return rows, scores
    if kind == "levels":  # USER_CHUNK histories at a time: their per-level terms are (B, L, N)
        B = parts.dense.shape[0]
        if B == 0:
            return parts.dense.new_zeros(0, k, dtype=torch.long), parts.dense.new_zeros(0, k)
        top = [_levels_scores(params["weights"], parts, slice(i, i + USER_CHUNK)).topk(k, dim=1)
               for i in range(0, B, USER_CHUNK)]  # loop over chunks of histories
        return torch.cat([t.indices for t in top]), torch.cat([t.values for t in top])
    if kind == "liger":
        cold = parts.cold_rows.to(parts.gen_rows.device)
        rows, valid = union_rows(parts.gen_rows, cold.expand(parts.gen_rows.shape[0], -1), pad=-1)
        scores = torch.where(valid, parts.dense.gather(1, rows.clamp_min(0)), float("-inf"))
        return _top(rows, scores, k)
    p = pool(parts)
    if kind == "blend":
        a = float(params["alpha"])
        scores = a * p.features[..., 0] + (1.0 - a) * p.features[..., 1]
    elif kind == "rrf":
        k0, C = float(params["k0"]), parts.num_candidates
        scores = (torch.where(p.gen_rank < C, 1.0 / (k0 + 1.0 + p.gen_rank), 0.0)
                  + torch.where(p.dense_rank < C, 1.0 / (k0 + 1.0 + p.dense_rank), 0.0))
    else:  # learned
        scores = p.features @ torch.tensor(params["weights"], dtype=p.features.dtype, device=p.features.device)
    return _top(p.rows, torch.where(p.valid, scores, float("-inf")), k)


def _top(rows: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rows.shape[1] < k:  # a pool narrower than k: pad with empty slots
        pad = k - rows.shape[1]
        rows = torch.nn.functional.pad(rows, (0, pad), value=-1)
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    # a stable sort: tied scores (reciprocal ranks tie often) keep the pool's order (generative list first), the same
    # on every device
    top, order = scores.sort(dim=1, descending=True, stable=True)
    top, order = top[:, :k], order[:, :k]
    return torch.where(torch.isfinite(top), rows.gather(1, order), -1), top


def fused_ranking(fusion: tuple[str, dict[str, Any]] | None, parts: Parts, k: int, item_ids: torch.Tensor,
                  codes_of_rows: Callable[[torch.Tensor], torch.Tensor]) -> Ranking:
    """The hybrid's :class:`Ranking` (B, k): ``fusion`` (kind, params) of ``parts``, rows mapped to ``item_ids`` (N,)
    and to codes by ``codes_of_rows`` (rows (B, k), -1 where a pool ran short -> (B, k, L), -1 there)."""
    if fusion is None:
        raise ValueError("the hybrid decoder needs a fusion (chosen on validation users) or a blend weight (`--alpha A`; `alpha=` in Python)")
    kind, params = fusion
    if kind not in ("full", "levels"):  # these rank every item
        check_k(k, parts.num_candidates, f"the hybrid's candidates per list for fusion {kind!r}: ask for fewer items, "
                "or pass a larger `num_candidates`")
    rows, scores = fuse(kind, params, parts, k)
    return Ranking(torch.where(rows >= 0, item_ids[rows.clamp_min(0)], -1), scores, codes_of_rows(rows),
                   BLEND if kind == "blend" else FUSED, False)


def cat_parts(parts: Sequence[Parts]) -> Parts:
    """Parts of several batches of histories as one (their cold rows are the same)."""
    def cat(field: str) -> torch.Tensor | None:
        return None if getattr(parts[0], field) is None else torch.cat([getattr(p, field) for p in parts])

    return Parts(cat("exact"), cat("dense"), cat("gen_rows"), parts[0].cold_rows, cat("dense_rows"), cat("code_levels"),
                 parts[0].item_nodes)


# ---- choosing on validation ------------------------------------------------------------------------------------------
def _ndcg(kind: str, params: dict[str, Any], parts: Parts, target_rows: torch.Tensor, k: int = 10) -> float:
    rows, _ = fuse(kind, params, parts, k)
    return float(ndcg_at_k(rows, target_rows, k).mean())


def fit_learned(parts: Parts, target_rows: torch.Tensor, *, l2: float = 1e-2, init_alpha: float = 0.5,
                steps: int = 200) -> list[float]:
    """Weights of the ``learned`` fusion: maximise the log-softmax of the target over each history's pool (histories
    whose target is not in the pool carry no signal and are left out), L2-regularised, with L-BFGS."""
    p = pool(parts)
    hit = (p.rows == target_rows[:, None].to(p.rows.device)) & p.valid  # (B, W)
    keep = hit.any(1)
    feats, valid, target = p.features[keep].clone(), p.valid[keep].clone(), hit[keep].float().argmax(1)
    w = torch.zeros(len(FEATURES), dtype=feats.dtype, device=feats.device)
    w[0], w[1] = init_alpha, 1.0 - init_alpha  # start at the plain blend
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.where(valid, feats @ w, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    if keep.any():
        with torch.inference_mode(False), torch.enable_grad():  # callers may decode under inference mode
            opt.step(closure)
    return [float(x) for x in w.detach()]


def fit_levels(parts: Parts, target_rows: torch.Tensor, *, start: float) -> list[float]:
    """Weights of the ``levels`` fusion: from ``start`` at every level (the ``full`` blend's alpha), each level's
    weight in turn set to the :data:`LEVEL_GRID` value with the best NDCG@10 on these histories, the others held
    (:data:`LEVEL_SWEEPS` passes). A level whose terms are 0 for every item (only children) takes the weight of the
    level before it (``start`` for level 0). Holds
    the histories' (B, L, N) gaps (code_l - dense_l), filled :data:`USER_CHUNK` histories at a time."""
    B = parts.dense.shape[0]
    gaps = parts.dense.new_empty(B, parts.code_levels.shape[1], parts.dense.shape[1])
    for i in range(0, B, USER_CHUNK):  # loop over chunks of histories
        gaps[i:i + USER_CHUNK] = level_gaps(parts, slice(i, i + USER_CHUNK))
    live = [lv for lv in range(gaps.shape[1]) if bool(gaps[:, lv].any())]
    w = [float(start)] * gaps.shape[1]

    def ndcg(weights: list[float]) -> float:
        x = torch.tensor(weights, dtype=gaps.dtype, device=gaps.device)
        rows = torch.cat([(parts.dense[i:i + USER_CHUNK] + torch.einsum("bln,l->bn", gaps[i:i + USER_CHUNK], x)).topk(10, dim=1).indices
                          for i in range(0, B, USER_CHUNK)])  # loop over chunks of histories
        return float(ndcg_at_k(rows, target_rows, 10).mean())

    for _ in range(LEVEL_SWEEPS):  # loop over passes
        for lv in live:  # loop over levels
            w[lv] = max(LEVEL_GRID, key=lambda a, lv=lv: (ndcg(w[:lv] + [a] + w[lv + 1:]), a == w[lv]))
    for lv in range(1, len(w)):  # a level without siblings scores 0 either way: its neighbour's weight saves its
        if lv not in live:  # node masses when serving (the telescoped score, _levels_scores)
            w[lv] = w[lv - 1]
    return w


def fit_params(kind: str, parts: Parts, target_rows: torch.Tensor, *, blend_alpha: float | None = None,
               full_alpha: float | None = None) -> dict[str, Any]:
    """The parameters of fusion ``kind`` that maximise NDCG@10 on these (validation) histories (``learned`` starts
    from the pool blend's fitted weight, ``blend_alpha`` when it is known already; ``levels`` from the full blend's,
    ``full_alpha``)."""
    if kind in ("blend", "full"):
        return {"alpha": max(ALPHA_GRID, key=lambda a: _ndcg(kind, {"alpha": a}, parts, target_rows))}
    if kind == "levels":
        a = fit_params("full", parts, target_rows)["alpha"] if full_alpha is None else full_alpha
        return {"weights": fit_levels(parts, target_rows, start=a)}
    if kind == "rrf":
        return {"k0": max(RRF_GRID, key=lambda k0: _ndcg(kind, {"k0": k0}, parts, target_rows))}
    if kind == "learned":
        a = fit_params("blend", parts, target_rows)["alpha"] if blend_alpha is None else blend_alpha
        return {"weights": fit_learned(parts, target_rows, init_alpha=a)}
    return {}


def choose_fusion(fit: Parts, fit_targets: torch.Tensor, select: Parts, select_targets: torch.Tensor,
                  kinds: Sequence[str] = FUSIONS) -> FusionChoice:
    """Fit every fusion on ``fit`` histories, choose the best by NDCG@10 on the disjoint ``select`` histories.

    Targets are catalogue rows (B,). Both samples must be validation users. On a tie the earlier kind wins.
    """
    if not kinds or any(kind not in FUSIONS for kind in kinds):
        raise ValueError(f"`kinds` must name fusions among {list(FUSIONS)}, got {list(kinds)!r}")
    table: dict[str, dict[str, Any]] = {}
    for kind in kinds:  # loop over the fusions (six)
        params = fit_params(kind, fit, fit_targets, blend_alpha=table.get("blend", {}).get("params", {}).get("alpha"),
                            full_alpha=table.get("full", {}).get("params", {}).get("alpha"))
        table[kind] = {"params": params, "fit_ndcg@10": _ndcg(kind, params, fit, fit_targets),
                       "select_ndcg@10": _ndcg(kind, params, select, select_targets)}
    best = max(table, key=lambda name: (table[name]["select_ndcg@10"], -list(table).index(name)))
    return FusionChoice(best, table[best]["params"], table)
