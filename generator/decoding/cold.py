"""Cold items into beam results by semantic-ID prefix (TIGER, Rajput et al. 2023, cold-start section).

The generator never saw a cold item's code path, so beam search does not reach it even once it is in the prefix
tree. TIGER's remedy: generate candidates as usual, then retrieve the *new* items whose semantic-ID prefix (the
first ``prefix_levels`` codes) matches a candidate's, and let them take at most a share ``epsilon`` of the top-k.

:class:`ColdStartBeam` (``cold-beam``) does that around a backbone's beam decoder (T5 or causal), vectorised over users
and candidates (loops only over code levels): candidates -> their prefix's node in a ``semid.prefix_index.PrefixIndex``
of the cold items, built once at construction (one ``searchsorted``) -> each matched cold item gets the score of the
best-ranked candidate it matched -> merge, drop duplicates, cap the cold items at ceil(epsilon * k), take the top-k.

Dimensions: B histories, C beam candidates, P cold matches kept per candidate, Q cold items, N items, L code levels.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from generator.decoding.protocol import PREFIX_MATCHED, Decoder, Histories, Ranking, check_int_in, check_k
from semid.ids import SemanticIDs
from semid.prefix_index import PrefixIndex
from semid.safe_read import is_int


class ColdStartBeam:
    """A beam decoder whose top-k may hold cold items that share a prefix with its candidates.

    Args:
        beam: the backbone's beam decoder (``T5Beam``, or the causal ``beam``); it is called with
            max(its num_beams, C) beams.
        ids: the semantic IDs *after* ``add_items`` (warm and cold items).
        cold_item_ids: int (Q,), the cold items (each in ``ids``).
        epsilon: the largest share of the top-k that cold items may take: at most ceil(epsilon * k) slots.
        prefix_levels: codes compared (default: all base levels but the last, ``ids.num_base_levels - 1``).
        num_candidates: C, beam candidates whose prefixes are looked up (default: max(k, num_beams) at each call).
        max_per_prefix: P, cold items retrieved per candidate (those sharing its prefix, by ascending item id).

    A matched cold item scores what
    its best-ranked matching candidate scored and ranks right after it; the rest of the top-k are the beam's own
    items, best first, no duplicates. Cold items the beam returns by itself count as cold too (capped alike). The
    cap needs the beam's C candidates to hold at least k - ceil(epsilon * k) warm items: a call asks the beam for
    twice as many candidates until every history's do (a beam over a tree that holds the cold items, as the causal
    one after ``semid add-items``, returns some of them itself). Only when the whole catalogue holds too few warm
    items do over-cap cold items fill the remaining slots (a ranking always has k items). With no match the result is the
    beam's own top-k.
    """

    name, score, leaves = "cold-beam", PREFIX_MATCHED, False

    def __init__(
        self,
        beam: Decoder,
        ids: SemanticIDs,
        cold_item_ids: np.ndarray,
        *,
        epsilon: float = 0.1,
        prefix_levels: int | None = None,
        num_candidates: int | None = None,
        max_per_prefix: int = 3,
    ) -> None:
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"`epsilon` must be a number in [0, 1], got {epsilon!r}")
        base = ids.num_base_levels
        prefix_levels = base - 1 if prefix_levels is None else prefix_levels
        if not is_int(prefix_levels) or not 1 <= prefix_levels <= ids.num_levels:
            raise ValueError(f"`prefix_levels` must be an int in [1, {ids.num_levels}], got {prefix_levels!r}")
        if not is_int(max_per_prefix) or max_per_prefix < 1:
            raise ValueError(f"`max_per_prefix` must be a positive int, got {max_per_prefix!r}")
        if num_candidates is not None:
            check_int_in("num_candidates", num_candidates, 1, ids.num_items, "the catalogue size")
        cold = np.unique(np.asarray(cold_item_ids, dtype=np.int64))
        if cold.size == 0:
            raise ValueError("`cold_item_ids` must hold at least one item")
        if not np.isin(cold, ids.item_ids).all():
            raise ValueError(f"`cold_item_ids` must be items of `ids`; {int(cold[~np.isin(cold, ids.item_ids)][0])} is not")
        self.ids, self.epsilon, self.prefix_levels = ids, float(epsilon), int(prefix_levels)
        self.beam, self.max_per_prefix = beam, int(max_per_prefix)
        self.num_candidates = None if num_candidates is None else int(num_candidates)
        self.cold_cap: int | None = None  # set on a copy for a call that keeps fewer items than it asks (exclusion.py)
        codes = torch.from_numpy(ids.codes_of(cold))  # (Q, L)
        self.index = PrefixIndex(codes[:, :prefix_levels], ids.codebook_sizes)  # order: by prefix, then by item id
        self.cold_items, self.cold_codes = torch.from_numpy(cold)[self.index.order], codes[self.index.order]

    @property
    def num_beams(self) -> int:
        """The beams of the beam decoder it wraps (``with_beams`` sets them there)."""
        return self.beam.num_beams

    def max_cold(self, k: int) -> int:
        """Cold slots allowed in a top-k: ceil(epsilon * k) (with a guard against float noise such as 0.1 * 30), or
        ``cold_cap`` where a call keeps only the first items of the k it asks for (its history's dropped after)."""
        return min(k, math.ceil(round(self.epsilon * k, 9)) if self.cold_cap is None else self.cold_cap)

    @torch.no_grad()
    def __call__(self, histories: Histories, k: int) -> Ranking:
        """Top-k (B, k) of the beam's candidates and the cold items matching their prefixes."""
        N = self.ids.num_items
        check_k(k, N, "the catalogue size")
        C = max(k, self.beam.num_beams if self.num_candidates is None else self.num_candidates)
        need = k - self.max_cold(k)  # warm items the candidates must hold for the cap to hold
        while True:  # at most log2(N / C) rounds: more candidates only where some history has too few warm ones
            beam = copy.copy(self.beam)  # the same decoder with enough beams for C candidates
            beam.num_beams = max(self.beam.num_beams, C)
            res = beam(histories, C)
            warm = (res.items >= 0) & torch.isfinite(res.scores) & ~torch.isin(res.items, self.cold_items.to(res.items.device))
            if C >= N or bool((warm.sum(1) >= need).all()):
                return self.merge(res, k, None if self.cold_cap is None else self._seen(histories))
            C = min(N, 2 * C)

    def _seen(self, histories: Histories) -> torch.Tensor:
        """The item ids (B, S) of histories of item rows + 1 (the causal design's, the only one cold-beam serves), -1
        at padding: what a call that leaves the history out drops after this decoder ranks."""
        rows = histories.tokens.cpu().numpy() - 1  # (B, S): a few ids looked up here, not the N ids moved per call
        return torch.from_numpy(np.where(rows >= 0, self.ids.item_ids[rows.clip(0)], -1)).to(histories.tokens.device)

    def merge(self, res: Ranking, k: int, seen: torch.Tensor | None = None) -> Ranking:
        """The top-k (B, k) of beam candidates ``res`` (B, C) and the cold items sharing their prefixes; ``seen``
        (B, S) item ids to be dropped after (the history, -1: none): its cold items do not count against the cap."""
        B, C = res.items.shape
        check_k(k, C, "the beam's candidates per history")
        device, P = res.items.device, self.max_per_prefix
        index, cold_items, cold_codes = self.index.to(device), self.cold_items.to(device), self.cold_codes.to(device)
        Q = cold_items.numel()
        valid_cand = torch.isfinite(res.scores) & (res.items >= 0)

        # candidates -> up to P cold items with the same prefix (node of the cold items' index): (B, C, P)
        node = index.find(res.codes[..., : self.prefix_levels])  # (B, C), -1 where no cold item has the prefix
        lo, hi = index.span(self.prefix_levels, node.clamp_min(0))  # the cold items under it, in `index.order`
        idx = lo.unsqueeze(-1) + torch.arange(P, device=device)  # (B, C, P)
        hit = (idx < hi.unsqueeze(-1)) & (valid_cand & (node >= 0)).unsqueeze(-1)
        idx = idx.clamp_max(Q - 1)
        m_items = torch.where(hit, cold_items[idx], -1).reshape(B, C * P)
        m_scores = torch.where(hit, res.scores.unsqueeze(-1), float("-inf")).reshape(B, C * P).to(res.scores.dtype)
        m_codes = cold_codes[idx].reshape(B, C * P, -1)

        # the pool: candidates first, then matches in candidate-rank order; sorted by score (stable: a match ranks
        # right after the best candidate it matched), so a duplicate's first occurrence is its best placement
        items = torch.cat([torch.where(valid_cand, res.items, -1), m_items], 1)  # (B, C + C*P)
        scores = torch.cat([torch.where(valid_cand, res.scores, float("-inf")), m_scores], 1)
        codes = torch.cat([res.codes, m_codes.to(res.codes.dtype)], 1)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        items, scores = items.gather(1, order), scores.gather(1, order)
        valid = items >= 0
        by_item = torch.argsort(items, dim=1, stable=True)  # among equal items, the best placement first
        sorted_items = items.gather(1, by_item)
        dup_sorted = torch.zeros_like(valid)
        dup_sorted[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
        dup = torch.zeros_like(valid).scatter(1, by_item, dup_sorted)

        # at most max_cold(k) cold items, the best-scored; warm items fill the rest
        fresh = valid & ~dup
        is_cold = fresh & torch.isin(items, cold_items)
        if seen is not None:  # (dropped after: a slot they took would leave the list short of its cold share)
            is_cold &= ~(items.unsqueeze(-1) == seen.unsqueeze(1)).any(-1)
        over = is_cold & (torch.cumsum(is_cold.long(), 1) > self.max_cold(k))
        tier = torch.where(fresh & ~over, 0, torch.where(fresh, 1, 2))  # kept, over-cap fill, nothing
        pos = torch.arange(items.shape[1], device=device)
        pick = torch.argsort(tier * items.shape[1] + pos, dim=1)[:, :k]  # (B, k) positions in score order
        take = order.gather(1, pick)  # positions in the pool
        L = codes.shape[2]
        return Ranking(items.gather(1, pick), scores.gather(1, pick), codes.gather(1, take.unsqueeze(2).expand(-1, -1, L)),
                       PREFIX_MATCHED, False)
