"""Exact scoring of every item under a memory budget: the causal model's ``exact`` and ``dense`` top-k in chunks.

:func:`generator.decoding.causal.exact_scores` holds a (B, N) float matrix; at millions of items and hundreds of
users that is gigabytes. :func:`exact_topk` gives the same top k (items and scores) while holding at most
``max_score_bytes`` of (users x items) floats: users in blocks of b, items in chunks of c, and a running top k per
user merged after every chunk. An item's log-likelihood needs, at every level, its parent's normaliser (a
log-sum-exp over the parent's children); those are computed first, per block of users, by an online log-sum-exp
over chunks of edges (the edges of a level are grouped by parent, so a chunk touches a contiguous run of parents).
What a block holds: b x c scores and logits, and b x P normalisers (P: the parents with two or more children, summed
over levels; far fewer than N for semantic IDs); the budget covers them all whenever one user fits.

Shapes: B histories, b users per block, N items, c items (or edges) per chunk, D d_model, A_l active edges of level
l, P_l their parents.
"""

from __future__ import annotations

from typing import Any

import torch

from generator.decoding.mips import exact_topk as mips_topk
from generator.decoding.paths import check_table_dtype, new_table, product_layout
from generator.models.causal import CausalGenerator
from semid.safe_read import is_int

DEFAULT_MAX_SCORE_BYTES = 256 * 2**20  # 256 MiB of scores at a time
DEFAULT_ITEM_CHUNK = 65536
FLOAT_BYTES = 4


def check_budget(max_score_bytes: int) -> int:
    if not is_int(max_score_bytes) or max_score_bytes < FLOAT_BYTES:
        raise ValueError(f"`max_score_bytes` must be an int >= {FLOAT_BYTES} (one float), got {max_score_bytes!r}")
    return int(max_score_bytes)


def block_sizes(B: int, N: int, held_per_user: int, max_score_bytes: int, item_chunk: int | None = None) -> tuple[int, int]:
    """(users per block b, items per chunk c) such that b x (2 c + held_per_user) floats fit ``max_score_bytes``
    (b = 1 at least); ``item_chunk`` fixes c."""
    floats = max_score_bytes // FLOAT_BYTES
    if item_chunk is None:
        item_chunk = max(1, min(N, DEFAULT_ITEM_CHUNK, (floats - held_per_user) // 2))
    b = max(1, min(B, floats // (2 * item_chunk + held_per_user)))
    return b, item_chunk


def fits(B: int, N: int, max_score_bytes: int) -> bool:
    """Whether the whole (B, N) score matrix (and as much again for the intermediate logits) fits the budget."""
    return 2 * B * N * FLOAT_BYTES <= max_score_bytes


def _merge(best_s: torch.Tensor, best_r: torch.Tensor, s: torch.Tensor, r: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a running top (b, k') and a chunk's scores (b, n) with their rows (n,)."""
    top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
    cat_s, cat_r = torch.cat([best_s, top_s], 1), torch.cat([best_r, r[top_i]], 1)
    keep_s, idx = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
    return keep_s, cat_r.gather(1, idx)


def level_normalisers(hq: torch.Tensor, vectors: torch.Tensor, biases: torch.Tensor, parent: torch.Tensor,
                      in_norm: torch.Tensor, chunk: int) -> torch.Tensor:
    """log-sum-exp of each parent's normalised edges: hq (b, D), edges' vectors (A, D), biases (A,), parent (A,)
    non-decreasing in [0, P), in_norm (A,) bool -> (b, P); edges in chunks of ``chunk``."""
    b, A = hq.shape[0], vectors.shape[0]
    P = int(parent[-1]) + 1
    peak = hq.new_full((b, P), float("-inf"))
    total = hq.new_zeros(b, P)
    all_norm = bool(in_norm.all())
    for e0 in range(0, A, chunk):  # loop over chunks of edges, not edges
        e1 = min(A, e0 + chunk)
        logits = hq @ vectors.mT[:, e0:e1].to(hq.dtype) + biases[e0:e1]  # (b, n); a 16-bit table upcast chunk by chunk
        if not all_norm:
            logits = logits.masked_fill(~in_norm[e0:e1], float("-inf"))
        p0, p1 = int(parent[e0]), int(parent[e1 - 1]) + 1
        local = (parent[e0:e1] - p0).expand(b, -1)  # (b, n) in [0, p1 - p0)
        chunk_peak = hq.new_full((b, p1 - p0), float("-inf")).scatter_reduce(1, local, logits, reduce="amax")
        new = torch.maximum(peak[:, p0:p1], chunk_peak)
        safe = torch.where(torch.isfinite(new), new, 0.0)
        sums = hq.new_zeros(b, p1 - p0).scatter_add(1, local, (logits - safe.gather(1, local)).exp())
        total[:, p0:p1] = total[:, p0:p1] * (peak[:, p0:p1] - safe).exp() + sums
        peak[:, p0:p1] = new
    return peak + total.log()


@torch.no_grad()
def exact_topk(model: CausalGenerator, h: torch.Tensor, paths: Any, tables: Any, k: int, *,
               max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES, item_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items of highest log-likelihood for each state, as :func:`~generator.decoding.causal.exact_scores`
    followed by ``topk`` would give them, holding at most ``max_score_bytes`` of scores (see the module docstring).

    Args:
        h: FloatTensor (B, D) states; paths, tables: the model's ``ItemPaths`` and ``EdgeTables``
            (``generator.decoding.causal``, which imports this module).
        k: 1 <= k <= N (checked by the caller).
        item_chunk: items (and edges) per chunk; default the largest the budget allows, at most 65536.
    Returns:
        (scores (B, k), rows (B, k)), best first.
    """
    check_budget(max_score_bytes)
    L, N = model.layout.num_levels, paths.tokens.shape[0]
    levels = [lv for lv in range(L) if paths.active[lv].numel()]  # a level of only children adds log 1 = 0
    parents = [int(paths.active_parent[lv][-1]) + 1 for lv in levels]
    for lv in levels:
        ap = paths.active_parent[lv]
        assert ap.numel() < 2 or bool((ap[1:] >= ap[:-1]).all()), "a level's active edges must be grouped by parent"
    hq_all = model.level_queries(h)  # (B, L, D), or an ensemble's (K, B, L, D): then the sum of its members' scores
    experts = hq_all[None] if hq_all.ndim == 3 else hq_all  # (E, B, L, D)
    b, c = block_sizes(h.shape[0], N, experts.shape[0] * sum(parents), max_score_bytes, item_chunk)  # E normalisers each
    vectors = [v[None] if v.ndim == 2 else v for v in tables.vectors]  # per level (E, A_l, D)
    biases = [x[None] if x.ndim == 1 else x for x in tables.biases]  # per level (E, A_l)
    out_s, out_r = [], []
    for u0 in range(0, h.shape[0], b):  # loop over blocks of users
        hqs = experts[:, u0 : u0 + b]  # (E, b, L, D)
        norms = {lv: [level_normalisers(hq[:, lv], vectors[lv][x], biases[lv][x], paths.active_parent[lv],  # loop over members
                                        paths.norm_edge[lv][paths.active[lv]], c) for x, hq in enumerate(hqs)] for lv in levels}
        best_s = hqs.new_empty(hqs.shape[1], 0)
        best_r = torch.empty(hqs.shape[1], 0, dtype=torch.long, device=h.device)
        for i0 in range(0, N, c):  # loop over chunks of items
            rows = torch.arange(i0, min(N, i0 + c), device=h.device)
            s = hqs.new_zeros(hqs.shape[1], rows.numel())  # (b, n)
            for lv in levels:  # loop over levels (L <= 4)
                A = paths.active[lv].numel()
                slot = paths.item_slot[lv][rows]  # (n,) the item's active edge; A for an only child
                real, e = slot < A, slot.clamp_max(A - 1)
                for x, hq in enumerate(hqs):  # loop over an ensemble's members (one for a single model)
                    logp = hq[:, lv] @ vectors[lv][x][e].to(hq.dtype).T + biases[lv][x][e] - norms[lv][x][:, paths.active_parent[lv][e]]
                    s = s + torch.where(real, logp, 0.0)
            best_s, best_r = _merge(best_s, best_r, s, rows, k)
        out_s.append(best_s)
        out_r.append(best_r)
    return torch.cat(out_s), torch.cat(out_r)


@torch.no_grad()
def dense_topk(queries: torch.Tensor, vectors: torch.Tensor, k: int, *, max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
               item_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products (scores (B, k), rows (B, k)) of queries (B, d) with item vectors (N, d), holding at
    most ``max_score_bytes`` of scores (:func:`generator.decoding.mips.exact_topk` with budgeted chunks)."""
    check_budget(max_score_bytes)
    b, c = block_sizes(queries.shape[0], vectors.shape[0], 0, max_score_bytes, item_chunk)
    res = mips_topk(queries, vectors, k, query_chunk=b, item_chunk=c)
    return res.scores, res.item_ids


@torch.no_grad()
def item_vectors(model: CausalGenerator, chunk: int = DEFAULT_ITEM_CHUNK, *, dtype: str = "float32") -> torch.Tensor:
    """The model's item vectors (N, d), ``chunk`` items at a time: the build holds (chunk, L, D) code embeddings, not
    (N, L, D) (1 GB at 1M items). The last chunk ends at the last item (overlapping the one before), so every
    projection has ``chunk`` rows: bit-identical to one pass (``tests/test_edge_tables.py``). ``dtype``: their
    storage (``generator.decoding.paths.TABLE_DTYPES``; computed in float32, rounded when stored)."""
    store, N = check_table_dtype(dtype), model.num_items
    if N <= chunk:
        return product_layout(model.item_vectors().to(store))
    out = None
    for a in range(0, N, chunk):  # loop over chunks of items
        b = min(N, a + chunk)
        a = max(0, b - chunk)  # the last chunk: `chunk` items ending at the last
        part = model.item_vectors(torch.arange(a, b, device=model.item_tokens.device))
        out = new_table(N, part.shape[1], like=part, dtype=store) if out is None else out  # (N, d), as decoders store it
        out[a:b] = part
    return out
