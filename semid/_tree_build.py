"""Build-time helpers of :class:`semid.tree.PrefixTree`: input checks and the per-depth dense tables.

Only the public boundary (``PrefixTree.from_sequences``) calls these; decoding never does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from semid.safe_read import int64_of, is_int


def dense_tables(
    parent: np.ndarray,
    token: np.ndarray,
    child: np.ndarray,
    depth: np.ndarray,
    row_ptr: np.ndarray,
    num_nodes: int,
    budget: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense next-node tables for the depths with the highest average degree that fit ``budget`` entries.

    Edges are sorted by parent and nodes numbered by depth, so depth d's nodes and their edges are contiguous.
    Returns dense_spec (depths, 4) = (offset, first token, width, dense) and the concatenated tables.
    """
    counts = np.bincount(depth)
    first = np.concatenate([[0], np.cumsum(counts)])
    D = counts.size
    windows = []  # (depth, first edge, last edge, lo, width, average degree)
    for d in range(D):
        e0, e1 = int(row_ptr[first[d]]), int(row_ptr[first[d + 1]])
        if e1 > e0:
            lo = int(token[e0:e1].min())
            windows.append((d, e0, e1, lo, int(token[e0:e1].max()) - lo + 1, (e1 - e0) / counts[d]))
    spec = np.zeros((D, 4), dtype=np.int64)
    for d, _, _, lo, width, _ in windows:
        spec[d, 1:3] = (lo, width)
    tables, used = [], 0
    dtype = np.int32 if num_nodes < 2**31 else np.int64
    for d, e0, e1, lo, width, _ in sorted(windows, key=lambda w: -w[5]):
        entries = int(counts[d]) * width
        if used + entries > budget:
            continue
        table = np.full(entries, -1, dtype=dtype)
        table[(parent[e0:e1] - first[d]) * width + token[e0:e1] - lo] = child[e0:e1]
        spec[d] = (used, lo, width, 1)
        tables.append(table)
        used += entries
    return spec, (np.concatenate(tables) if tables else np.zeros(0, dtype=dtype))


# ---- input checks (public boundary only) ---------------------------------------------------------------------------
def as_padded(sequences: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    if isinstance(sequences, (np.ndarray, torch.Tensor)):
        seqs = np.asarray(sequences)
        if seqs.ndim != 2 or seqs.shape[0] == 0 or seqs.shape[1] == 0:
            raise ValueError(f"`sequences` must be a non-empty (N, T) array, got shape {seqs.shape}")
        if not np.issubdtype(seqs.dtype, np.integer):
            raise TypeError(f"`sequences` must hold integers, got dtype {seqs.dtype}")
        return seqs.astype(np.int64)
    rows = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    if not rows:
        raise ValueError("`sequences` must hold at least one sequence, got none")
    T = max(r.size for r in rows)
    out = np.full((len(rows), max(T, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):  # construction only, not a decoding path
        out[i, : r.size] = r
    return out


def check_tokens(seqs: np.ndarray, vocab_size: int) -> np.ndarray:
    """Validate tokens and -1 padding; return each row's length."""
    is_pad = seqs == -1
    lengths = np.where(is_pad.any(axis=1), is_pad.argmax(axis=1), seqs.shape[1])
    pad_inside = is_pad & (np.arange(seqs.shape[1]) < lengths[:, None])
    after = ~is_pad & (np.arange(seqs.shape[1]) >= lengths[:, None])
    if after.any() or pad_inside.any():
        row = int(np.argwhere(after)[0, 0])
        raise ValueError(f"sequence {row} has tokens after its -1 padding: padding may only come at the end")
    if (lengths == 0).any():
        raise ValueError(
            f"sequence {int(np.flatnonzero(lengths == 0)[0])} is empty; every sequence needs at least one token"
        )
    bad = ~is_pad & ((seqs < 0) | (seqs >= vocab_size))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"sequence {row} has token {int(seqs[row, col])} at position {col}, outside [0, {vocab_size})"
        )
    return lengths


def check_inputs(sequences: np.ndarray | Sequence[Sequence[int]], values: np.ndarray | Sequence[int], vocab_size: int,
                 end_token: int | None, pad_token: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``PrefixTree.from_sequences``'s preconditions; returns (sequences (N, T) padded with -1, values (N,), lengths (N,))."""
    if not is_int(vocab_size) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive int, got {vocab_size!r}")
    seqs = as_padded(sequences)
    values = np.asarray(values)
    N, T = seqs.shape
    if values.shape != (N,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"`values` must be an integer array of shape ({N},), got {values.dtype} {values.shape}"
        )
    if (values < 0).any():
        raise ValueError(f"`values` must be >= 0, got {int(values.min())}")
    lengths = check_tokens(seqs, vocab_size)
    for name, tok in (("end_token", end_token), ("pad_token", pad_token)):
        if tok is not None and not 0 <= tok < vocab_size:
            raise ValueError(f"`{name}` must be in [0, {vocab_size}), got {tok!r}")
        if tok is not None and (seqs == tok).any():
            row = int(np.argwhere(seqs == tok)[0, 0])
            raise ValueError(
                f"sequence {row} (value {int(values[row])}) contains `{name}` {tok}; it may only be added by the tree"
            )
    return seqs, values, lengths


def as_tokens(x: object, name: str) -> torch.Tensor:
    """Token ids (B, T) as a LongTensor (numpy's too); a TypeError for floats or bools, a ValueError for another rank."""
    t = torch.as_tensor(int64_of(name, x))  # (numpy's tokens too)
    if t.ndim != 2:
        raise ValueError(f"`{name}` must be (B, T) token ids, got shape {tuple(t.shape)}")
    return t
