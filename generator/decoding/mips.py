"""Maximum inner-product search: the dense head's decoder.

Two backends behind one interface, :class:`MIPSIndex`:

- ``"exact"``: torch ``matmul`` + ``topk``, chunked over queries and items so memory stays at
  (query_chunk x item_chunk) scores whatever N is. Runs on whatever device the vectors are on.
- ``"faiss-flat"`` (``IndexFlatIP``, exact), ``"faiss-ivf"`` (``IndexIVFFlat``, inverted lists, for millions of items)
  and ``"faiss-hnsw"`` (``IndexHNSWFlat``, a graph), all with the inner-product metric.

:func:`dense_index` picks one for a dense decoder: exact up to a catalogue size, IVF beyond.

Ties: within the returned k, items with equal scores come in ascending item-id order; which of several tied items
makes it into the top k at the boundary is up to the backend. Dimensions: B queries, N items, d vector dim, E items
excluded per query.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch

from semid.prefix_index import find
from semid.safe_read import is_int

log = logging.getLogger(__name__)

KINDS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
DENSE_INDEXES = ("auto", *KINDS)  # what a dense decoder searches with; "auto": exact up to EXACT_MAX_ITEMS, then IVF
EXACT_MAX_ITEMS = 1_000_000  # auto: exact (torch, chunked) up to this many items, an approximate faiss IVF beyond
DEFAULT_NPROBE = 32  # the fewest lists an IVF query visits by default
PROBE_SHARE = 25  # and at least one list in 25: 32 of 3,162 lists at 10M items kept 0.860 of exact recall@10, 127 keep ~0.97


def default_nprobe(nlist: int) -> int:
    """Lists an IVF query visits by default: ``DEFAULT_NPROBE``, or one list in ``PROBE_SHARE`` where that is more
    (``experiments/results/ivf_recall.md``: recall@10 against exact at 10M clustered items 0.860 at 32, 0.974 at 128)."""
    return max(DEFAULT_NPROBE, -(-int(nlist) // PROBE_SHARE))


class SearchResult(NamedTuple):
    """Top-k per query, best first.

    item_ids: LongTensor (B, k); -1 where the index had fewer than k items to give (approximate indexes).
    scores:   FloatTensor (B, k), inner products; -inf where ``item_ids`` is -1.
    """

    item_ids: torch.Tensor
    scores: torch.Tensor


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "faiss is not installed (semid depends on faiss-cpu): `pip install faiss-cpu` (or faiss-gpu), or use kind='exact'"
        ) from e
    return faiss


def exact_topk(
    queries: torch.Tensor,
    item_vecs: torch.Tensor,
    k: int,
    *,
    exclude_rows: torch.Tensor | None = None,
    query_chunk: int = 1024,
    item_chunk: int = 65536,
) -> SearchResult:
    """Exact top-k rows by inner product, chunked; returns *rows* of ``item_vecs`` in ``item_ids``.

    Args:
        queries: FloatTensor (B, d); item_vecs: FloatTensor (N, d).
        k: 1 <= k <= N - E.
        exclude_rows: LongTensor (B, E) rows never to return for each query (e.g. its history), padded with -1.
        query_chunk, item_chunk: block sizes of the score matrix.
    """
    B, N = queries.shape[0], item_vecs.shape[0]
    out_rows = torch.empty(B, k, dtype=torch.long, device=queries.device)
    out_scores = torch.empty(B, k, dtype=queries.dtype, device=queries.device)
    for q0 in range(0, B, query_chunk):
        q = queries[q0 : q0 + query_chunk]  # (b, d)
        excl = exclude_rows[q0 : q0 + query_chunk] if exclude_rows is not None else None
        best_s = torch.full((q.shape[0], 0), float("-inf"), dtype=q.dtype, device=q.device)
        best_r = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for i0 in range(0, N, item_chunk):
            scores = q @ item_vecs.mT[:, i0 : i0 + item_chunk].to(q.dtype)  # (b, n); 16-bit vectors upcast per chunk
            if excl is not None:
                _mask_rows(scores, excl, i0)
            s, r = scores.topk(min(k, scores.shape[1]), dim=1)
            best_s, idx = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
            best_r = torch.cat([best_r, r + i0], 1).gather(1, idx)
        out_rows[q0 : q0 + q.shape[0]] = best_r
        out_scores[q0 : q0 + q.shape[0]] = best_s
    return SearchResult(out_rows, out_scores)


class MIPSIndex:
    """Top-k items by inner product, exact or through faiss. Build with :meth:`build`.

    Attributes:
        kind: one of ``KINDS``.
        item_ids: LongTensor (N,), the id of each indexed vector, in insertion order (unique).
    """

    def __init__(self, kind: str, dim: int, backend: Any, item_vecs: torch.Tensor | None) -> None:
        self.kind = kind
        self.dim = dim
        self._backend = backend  # faiss index, or None for exact
        self._vecs = item_vecs  # (N, d) for exact
        self.item_ids = torch.zeros(0, dtype=torch.long)

    @classmethod
    def build(
        cls,
        item_vecs: torch.Tensor,
        item_ids: torch.Tensor | None = None,
        kind: str = "exact",
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        seed: int = 0,
    ) -> MIPSIndex:
        """Index item vectors.

        Args:
            item_vecs: FloatTensor (N, d), N >= 1.
            item_ids: LongTensor (N,) unique ids; default 0..N-1 (rows).
            kind: ``"exact"``, ``"faiss-flat"``, ``"faiss-ivf"`` or ``"faiss-hnsw"``.
            nlist: inverted lists for IVF; default about 4 sqrt(N) (faiss's guideline), at most N.
            nprobe: lists visited per IVF query (recall vs speed).
            hnsw_m: HNSW graph degree; ef_search: HNSW search breadth (recall vs speed).
            seed: the IVF k-means seed.
        """
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
        vecs = _check_vecs(item_vecs, None)
        N, d = vecs.shape
        if N == 0:
            raise ValueError("`item_vecs` must hold at least one vector, got none")
        for name, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
            if not is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        nprobe, hnsw_m, ef_search = int(nprobe), int(hnsw_m), int(ef_search)  # (faiss's SWIG takes no numpy ints)
        if kind == "exact":
            index = cls(kind, d, None, vecs[:0])
        else:
            faiss = import_faiss()
            metric = faiss.METRIC_INNER_PRODUCT
            if kind == "faiss-flat":
                backend = faiss.IndexFlatIP(d)
            elif kind == "faiss-hnsw":
                backend = faiss.IndexHNSWFlat(d, hnsw_m, metric)
                backend.hnsw.efSearch = ef_search
            else:
                nlist = nlist if nlist is not None else max(1, min(N, int(4 * N**0.5)))
                if not is_int(nlist) or not 1 <= nlist <= N:
                    raise ValueError(f"`nlist` must be an int in [1, {N}] (at most one list per item), got {nlist!r}")
                nlist = int(nlist)
                backend = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, metric)
                backend.cp.seed = seed
                backend.train(_np32(vecs))
                backend.nprobe = min(nprobe, nlist)
            index = cls(kind, d, backend, None)
        index.add(vecs, torch.arange(N) if item_ids is None else item_ids)
        log.info("built %r", index)
        return index

    @property
    def num_items(self) -> int:
        return int(self.item_ids.numel())

    def add(self, vecs: torch.Tensor, ids: torch.Tensor) -> None:
        """Add vectors (M, d) with ids (M,), unique and new to the index (cold-start items)."""
        vecs = _check_vecs(vecs, self.dim)
        ids = torch.as_tensor(ids)
        if ids.shape != (vecs.shape[0],) or ids.dtype.is_floating_point:
            raise ValueError(f"`ids` must be an integer tensor of shape ({vecs.shape[0]},), got {ids.dtype} {tuple(ids.shape)}")
        all_ids = torch.cat([self.item_ids, ids.long().cpu()])
        uniq = torch.unique(all_ids)
        if uniq.numel() != all_ids.numel():
            dup = _first_duplicate(all_ids)
            raise ValueError(f"`ids` must be unique and new to the index, got item id {dup} twice")
        if self._backend is None:
            self._vecs = torch.cat([self._vecs, vecs.to(self._vecs)])
        else:
            self._backend.add(_np32(vecs))
        self.item_ids = all_ids

    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> SearchResult:
        """Top-k items by inner product for each query.

        Args:
            queries: FloatTensor (B, d).
            k: 1 <= k <= num_items - E.
            exclude: LongTensor (B, E) item ids never to return for that query (its history, say), padded with -1;
                ids not in the index are ignored.
        Returns:
            :class:`SearchResult` with item ids (B, k) and scores (B, k), best first.
        """
        queries = _check_vecs(queries, self.dim, name="queries")
        E = 0 if exclude is None else exclude.shape[1]
        if exclude is not None and (exclude.ndim != 2 or exclude.shape[0] != queries.shape[0]):
            raise ValueError(f"`exclude` must be (B={queries.shape[0]}, E), got shape {tuple(exclude.shape)}")
        if not is_int(k) or not 1 <= k <= self.num_items - E:
            raise ValueError(f"`k` must be an int in [1, {self.num_items - E}] ({self.num_items} items, {E} excluded per query), got {k!r}")
        k = int(k)
        if self._backend is None:
            excl = None if exclude is None else self._rows_of(exclude)
            vecs = self._vecs.to(queries.device)
            res = exact_topk(queries, vecs, k, exclude_rows=excl.to(queries.device) if excl is not None else None)
            ids, scores = self.item_ids.to(queries.device)[res.item_ids], res.scores
        else:
            scores_np, labels = self._backend.search(_np32(queries), k + E)  # (B, k + E), labels -1 when short
            labels_t = torch.from_numpy(labels)
            ids = torch.where(labels_t >= 0, self.item_ids[labels_t.clamp_min(0)], -1)
            scores = torch.from_numpy(scores_np).float().masked_fill(labels_t < 0, float("-inf"))
            if exclude is not None:
                drop = (ids.unsqueeze(2) == exclude.cpu().unsqueeze(1)).any(2) & (ids >= 0)  # (B, k + E)
                scores = scores.masked_fill(drop, float("-inf"))
                ids = ids.masked_fill(drop, -1)
            scores, ids = _sort_desc(scores, ids)
            ids, scores = ids[:, :k].to(queries.device), scores[:, :k].to(queries.device)
        scores, ids = _sort_desc(scores, ids)
        return SearchResult(ids, scores)

    def _rows_of(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Rows (B, E) of item ids; -1 for padding and ids not in the index."""
        order = torch.argsort(self.item_ids)
        ids = item_ids.cpu().long()
        pos = find(self.item_ids[order], ids)
        return torch.where((pos >= 0) & (ids >= 0), order[pos.clamp_min(0)], -1)

    def __repr__(self) -> str:
        return f"MIPSIndex(kind={self.kind!r}, num_items={self.num_items}, dim={self.dim})"


def dense_index(item_vecs: torch.Tensor, kind: str = "auto", *, exact_max_items: int = EXACT_MAX_ITEMS,
                nprobe: int | None = None, seed: int = 0) -> MIPSIndex | None:
    """The index a dense decoder searches over item vectors (N, d), their rows as ids; None for ``"exact"``.

    ``"exact"`` is the torch ``matmul`` + ``topk`` (chunked under a memory budget by the caller), the same ranking as
    faiss's ``IndexFlatIP`` (``tests/test_mips.py``); ``"auto"`` is exact up to ``exact_max_items`` items and an
    IVF index beyond (``nlist`` = sqrt(N) lists, ``nprobe`` of them visited per query, default
    :func:`default_nprobe`; its recall@10 against exact
    is measured in ``experiments/results/scale.md``).
    """
    if kind not in DENSE_INDEXES:
        raise ValueError(f"`dense_index` must be one of {DENSE_INDEXES}, got {kind!r}")
    if not is_int(exact_max_items) or exact_max_items < 1:
        raise ValueError(f"`exact_max_items` must be a positive int, got {exact_max_items!r}")
    N = int(item_vecs.shape[0])
    if kind == "auto":
        kind = "exact" if N <= exact_max_items else "faiss-ivf"
    if kind == "exact":
        return None
    nlist = max(1, min(N, int(N**0.5))) if kind == "faiss-ivf" else None
    if nprobe is None:
        nprobe = default_nprobe(nlist) if nlist else DEFAULT_NPROBE
    return MIPSIndex.build(item_vecs.detach().cpu(), kind=kind, nlist=nlist, nprobe=nprobe, seed=seed)


# ---- helpers -------------------------------------------------------------------------------------------------------
def _mask_rows(scores: torch.Tensor, exclude_rows: torch.Tensor, start: int) -> None:
    """Set scores[b, r - start] = -inf in place for every excluded row r inside [start, start + n)."""
    local = exclude_rows - start
    hit = (exclude_rows >= 0) & (local >= 0) & (local < scores.shape[1])
    b = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(local)
    scores[b[hit], local[hit]] = float("-inf")


def _sort_desc(scores: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by score descending, ties by ascending id (two stable sorts)."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, by_score), ids.gather(1, by_score)


def _check_vecs(vecs: torch.Tensor, dim: int | None, name: str = "item_vecs") -> torch.Tensor:
    vecs = torch.as_tensor(vecs)
    if vecs.ndim != 2 or not vecs.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a float (n, d) tensor, got {vecs.dtype} {tuple(vecs.shape)}")
    if dim is not None and vecs.shape[1] != dim:
        raise ValueError(f"`{name}` must have d={dim} columns (the index's), got {vecs.shape[1]}")
    return vecs.detach()


def _np32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().float().numpy())


def _first_duplicate(ids: torch.Tensor) -> int:
    sorted_ids, _ = torch.sort(ids)
    return int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
