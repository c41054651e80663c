"""The prefix key and the prefix index of a set of code tuples: every table about ID prefixes, built once.

**Key.** A prefix ``(c_0, ..., c_{d-1})`` of codes (level j in ``[0, K_j)``) has the mixed-radix int64 key
``((c_0 K_1 + c_1) K_2 + ...) + c_{d-1}`` in ``[0, K_0 ... K_{d-1})`` (:func:`prefix_key`; the empty prefix has key
0). Keys of prefixes of one length sort as the prefixes do, lexicographically.

**Index.** :class:`PrefixIndex` sorts the N tuples (N, L) once (``order``); a sorted row opens a node at depth d (its
prefix of length d) exactly when it differs from the row before in its first d codes, so the nodes of every depth
are numbered 0, 1, ... in key order by one cumsum (the order ``PrefixTree.from_semantic_ids`` numbers them in).
Per depth d = 0..L (depth 0 is the root, depth d holds E_d nodes) and per level l = 0..L-1 (the step from depth l
to depth l + 1):

    keys[d]          LongTensor (E_d,)           the nodes' keys, ascending (keys[0] = [0])
    node             LongTensor (N, L + 1)       each item's path: its node at every depth (column 0: the root)
    first_item[d]    LongTensor (E_d,)           the smallest item row under each node
    parent[l]        LongTensor (E_{l+1},)       each depth-(l+1) node's parent at depth l
    code[l]          LongTensor (E_{l+1},)       its last code (level l)
    child_codes[l]   LongTensor (E_l, W_l)       each depth-l node's children's codes, ascending, -1 padded to the
                                                 level's largest degree W_l
    child_index[l]   LongTensor (E_l, W_l)       the same children's nodes at depth l + 1 (-1 padded)
    offsets          LongTensor (L + 2,)         node (d, r) is number offsets[d] + r breadth first (``tree_nodes``)

The items under node (d, r) are ``order[start : stop]`` (:meth:`span`). Built with vectorised numpy (the loops run
over levels only); lookups (:meth:`find`) are one ``searchsorted`` over a depth's keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def prefix_key(codes: Array, sizes: Sequence[int]) -> Array:
    """Mixed-radix int64 key of code prefixes: codes (..., d) with codes[..., j] in [0, sizes[j]) -> keys (...).

    numpy in, numpy out; torch in, torch out (same device). -1 where a code is outside its level's range (such a
    prefix is no node of any index). Raises when the prefixes of length d do not fit an int64 key."""
    d = codes.shape[-1]
    if d > len(sizes):
        raise ValueError(f"`codes` has {d} levels, but only {len(sizes)} codebook sizes were given ({list(sizes)})")
    if math.prod(int(k) for k in sizes[:d]) >= 2**62:
        raise ValueError(f"the code space {[int(k) for k in sizes[:d]]} has {math.prod(int(k) for k in sizes[:d])} "
                         "prefixes, more than an int64 key can hold")
    if isinstance(codes, torch.Tensor):
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        bad = torch.zeros(codes.shape[:-1], dtype=torch.bool, device=codes.device)
    else:
        key, bad = np.zeros(codes.shape[:-1], dtype=np.int64), np.zeros(codes.shape[:-1], dtype=bool)
    for j in range(d):  # loop over levels
        c = codes[..., j]
        key = key * int(sizes[j]) + c
        bad = bad | (c < 0) | (c >= int(sizes[j]))
    return torch.where(bad, -1, key) if isinstance(key, torch.Tensor) else np.where(bad, -1, key)


def find(sorted_keys: Array, keys: Array) -> Array:
    """Row of each key (...) among ``sorted_keys`` (E,) (ascending, distinct); -1 where it is not there."""
    n = sorted_keys.shape[0]
    if isinstance(keys, torch.Tensor):
        if n == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(sorted_keys, keys.contiguous()).clamp_max(n - 1)
        return torch.where(sorted_keys[pos] == keys, pos, -1)
    if n == 0:
        return np.full(np.shape(keys), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), n - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


class PrefixIndex:
    """Every prefix of N code tuples as numbered nodes, per depth, with the tables decoders and models read.

    Args:
        codes: int array or LongTensor (N, L), N >= 1, codes[:, l] in [0, sizes[l]); tuples may repeat (items
            sharing a tuple share its nodes).
        sizes: the codebook size K_l of each level (at least L of them).
    """

    def __init__(self, codes: Array, sizes: Sequence[int]) -> None:
        codes = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] == 0 or not 1 <= codes.shape[1] <= len(sizes):
            raise ValueError(f"`codes` must be a non-empty (N, L) array with 1 <= L <= {len(sizes)}, got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"`codes` must hold integers, got dtype {codes.dtype}")
        N, L = codes.shape
        self.sizes = tuple(int(k) for k in sizes[:L])
        bad = (codes < 0) | (codes >= np.asarray(self.sizes))
        if bad.any():
            row, level = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"`codes[{row}, {level}]` is {int(codes[row, level])}; level {level} takes codes in [0, {self.sizes[level]})")
        prefix_key(codes[:1], self.sizes)  # the key space fits an int64 (raises otherwise)
        codes = codes.astype(np.int64)
        order = np.lexsort(codes.T[::-1])  # rows by tuple; stable: equal tuples keep their row order
        s = codes[order]
        opens = np.ones((N, L), dtype=bool)  # sorted row i opens a node at depth l + 1
        opens[1:] = np.logical_or.accumulate(s[1:] != s[:-1], axis=1)
        at = np.cumsum(opens, axis=0) - 1  # (N, L) each sorted row's node at depth l + 1
        node = np.zeros((N, L + 1), dtype=np.int64)
        node[order, 1:] = at
        starts = [np.zeros(1, dtype=np.int64)] + [np.flatnonzero(opens[:, lv]) for lv in range(L)]  # per depth
        keys = [prefix_key(s[st, :d], self.sizes) for d, st in enumerate(starts)]
        parent = [at[starts[lv + 1], lv - 1] if lv else np.zeros(starts[1].size, dtype=np.int64) for lv in range(L)]
        code = [s[starts[lv + 1], lv] for lv in range(L)]
        child_codes, child_index = [], []
        for lv in range(L):  # loop over levels: children of each depth-l node, padded to the largest degree
            deg = np.bincount(parent[lv], minlength=keys[lv].size)
            slot = np.arange(code[lv].size) - (np.cumsum(deg) - deg)[parent[lv]]
            cc, ci = (np.full((keys[lv].size, int(deg.max())), -1, dtype=np.int64) for _ in range(2))
            cc[parent[lv], slot], ci[parent[lv], slot] = code[lv], np.arange(code[lv].size)
            child_codes.append(cc)
            child_index.append(ci)
        t = torch.from_numpy
        self.order, self.node = t(order), t(node)
        self.keys, self.parent, self.code = [t(k) for k in keys], [t(p) for p in parent], [t(c) for c in code]
        self.first_item = [t(np.minimum.reduceat(order, st)) for st in starts]
        self.child_codes, self.child_index = [t(c) for c in child_codes], [t(c) for c in child_index]
        self.offsets = t(np.cumsum([0] + [k.size for k in keys]))
        self._start = t(np.concatenate(starts))  # per node (breadth first): its items' span in `order`
        self._stop = t(np.concatenate([np.append(st[1:], N) for st in starts]))

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    @property
    def num_items(self) -> int:
        return int(self.order.numel())

    def find(self, codes: torch.Tensor) -> torch.Tensor:
        """Node row of each prefix (..., d), d <= L, at depth d; -1 where no tuple has that prefix."""
        return find(self.keys[codes.shape[-1]], prefix_key(codes, self.sizes))

    def span(self, depth: int | torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, stop) (...) of the items under nodes ``rows`` (...) of ``depth`` (an int or (...)) in ``order``."""
        number = self.offsets[depth] + rows
        return self._start[number], self._stop[number]

    def tree_nodes(self) -> torch.Tensor:
        """(N, L + 1) each item's path as node numbers of ``PrefixTree.from_semantic_ids`` over these tuples."""
        return self.node + self.offsets[: self.num_levels + 1]

    def to(self, device: torch.device | str) -> PrefixIndex:
        """A copy on ``device`` (the index is never changed in place)."""
        out = object.__new__(PrefixIndex)
        for name, v in vars(self).items():
            setattr(out, name, [x.to(device) for x in v] if isinstance(v, list) else v.to(device) if isinstance(v, torch.Tensor) else v)
        return out
