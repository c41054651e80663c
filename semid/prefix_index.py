"""The prefix key and the prefix index of a set of code tuples: every table about ID prefixes, built once.

**Key** (:func:`prefix_key`): the prefix ``(c_0, ..., c_{d-1})`` (level j's code in ``[0, K_j)``) has the
mixed-radix int64 key ``(c_0 K_1 + c_1) K_2 + ... + c_{d-1}``; the empty prefix has key 0. Keys of prefixes of one
length sort as the prefixes do.

**Index** (:class:`PrefixIndex`): the N tuples (N, L) sorted once (``order``); a sorted row opens a node at depth d
(its prefix of length d) exactly when it differs from the row before in its first d codes, so every depth's nodes
are numbered 0, 1, ... in key order by one cumsum (:func:`number_rows`, which ``PrefixTree`` numbers its nodes with
too). Per depth d = 0..L (depth 0: the root; E_d nodes) and level l = 0..L-1 (the step from depth l to l + 1):

    keys[d]         LongTensor (E_d,)      the nodes' keys, ascending (keys[0] = [0])
    node            LongTensor (N, L + 1)  each item's path: its node at every depth
    first_item[d]   LongTensor (E_d,)      the smallest item row under each node
    parent[l]       LongTensor (E_{l+1},)  each depth-(l + 1) node's parent; code[l]: its last code
    child_start[l]  LongTensor (E_l + 1,)  the children of depth-l node r are the depth-(l + 1) nodes
                                           child_start[l][r] : child_start[l][r + 1] (CSR: nodes of one parent are
                                           consecutive, their codes ``code[l]`` ascending)
    child_codes[l]  LongTensor (E_l, W_l)  the same children padded: codes ascending, -1 padded to the level's largest
                                           degree W_l; child_index[l]: their nodes. Built on first use (the model's
                                           node-vector buffers); decoders read the CSR form, whose size does not
                                           depend on the largest degree
    offsets         LongTensor (L + 2,)    node (d, r) is node offsets[d] + r of the tree, breadth first

Built with vectorised numpy (loops over levels only); a lookup (:meth:`PrefixIndex.find`) is one ``searchsorted``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def prefix_key(codes: Array, sizes: Sequence[int]) -> Array:
    """Mixed-radix int64 key of code prefixes (..., d), codes[..., j] in [0, sizes[j]) -> (...), numpy or torch as
    given; -1 where a code is out of its level's range. Raises when prefixes of length d overflow an int64 key."""
    d, space = codes.shape[-1], math.prod(int(k) for k in sizes[: codes.shape[-1]])
    if d > len(sizes):
        raise ValueError(f"`codes` has {d} levels, but only {len(sizes)} codebook sizes were given ({list(sizes)})")
    if space >= 2**62:
        raise ValueError(f"the code space {[int(k) for k in sizes[:d]]} has {space} prefixes, more than an int64 key can hold")
    is_torch = isinstance(codes, torch.Tensor)
    key = codes.new_zeros(codes.shape[:-1], dtype=torch.long) if is_torch else np.zeros(codes.shape[:-1], dtype=np.int64)
    bad = key < 0
    for j in range(d):  # loop over levels
        key, bad = key * int(sizes[j]) + codes[..., j], bad | (codes[..., j] < 0) | (codes[..., j] >= int(sizes[j]))
    return (torch.where if is_torch else np.where)(bad, -1, key)


def find(sorted_keys: Array, keys: Array) -> Array:
    """Row of each key (...) among ``sorted_keys`` (E,) (ascending, distinct); -1 where it is not there."""
    is_torch = isinstance(keys, torch.Tensor)
    if sorted_keys.shape[0] == 0:
        return keys * 0 - 1
    pos = (torch.searchsorted(sorted_keys, keys.contiguous()) if is_torch else np.searchsorted(sorted_keys, keys))
    pos = pos.clip(max=sorted_keys.shape[0] - 1)
    return (torch.where if is_torch else np.where)(sorted_keys[pos] == keys, pos, -1)


def number_rows(seqs: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (N, T) sorted lexicographically (-1 padding first; stable) and their prefixes numbered depth by depth.

    Returns ``order`` (N,); ``new`` (N, T): sorted row i differs from row i - 1 in its first d + 1 tokens (row 0
    always); ``at`` (N, T): sorted row i's node at depth d + 1 among the rows longer than d (``lengths``, default
    T), numbered 0, 1, ... in sorted order (meaningful where d < the row's length)."""
    order = np.lexsort(seqs.T[::-1])
    s = seqs[order]
    new = np.ones(s.shape, dtype=bool)
    new[1:] = np.logical_or.accumulate(s[1:] != s[:-1], axis=1)
    opens = new if lengths is None else new & (np.arange(s.shape[1]) < lengths[order][:, None])
    return order, new, np.cumsum(opens, axis=0) - 1


def rank_within_groups(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (N, T), T >= 1 -> (each row's rank among the rows equal to it, in row order; the size of its group),
    both int64 (N,)."""
    order, new, _ = number_rows(rows)  # stable: equal rows stay in row order
    pos = np.arange(rows.shape[0], dtype=np.int64)
    group, rank, size = np.cumsum(new[:, -1]) - 1, np.empty_like(pos), np.empty_like(pos)
    rank[order], size[order] = pos - np.maximum.accumulate(np.where(new[:, -1], pos, 0)), np.bincount(group)[group]
    return rank, size


class PrefixIndex:
    """Every prefix of N code tuples as numbered nodes, per depth, with the tables decoders and models read.

    Args:
        codes: int array or LongTensor (N, L), N >= 1, codes[:, l] in [0, sizes[l]); a repeated tuple is one path.
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
        order, opens, at = number_rows(codes.astype(np.int64))  # stable: equal tuples keep their row order
        s, node = codes[order].astype(np.int64), np.zeros((N, L + 1), dtype=np.int64)
        node[order, 1:] = at
        starts = [np.zeros(1, dtype=np.int64)] + [np.flatnonzero(opens[:, lv]) for lv in range(L)]  # per depth
        keys = [prefix_key(s[st, :d], self.sizes) for d, st in enumerate(starts)]  # (raises on an int64 overflow)
        parent = [at[starts[lv + 1], lv - 1] if lv else np.zeros(starts[1].size, dtype=np.int64) for lv in range(L)]
        code = [s[starts[lv + 1], lv] for lv in range(L)]
        t = torch.from_numpy
        self.child_start = [t(np.concatenate([[0], np.cumsum(np.bincount(parent[lv], minlength=keys[lv].size))]))
                            for lv in range(L)]  # parent[l] ascends: a parent's children are one run
        self._padded: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.order, self.node, self.keys = t(order), t(node), [t(k) for k in keys]
        self.parent, self.code = [t(p) for p in parent], [t(c) for c in code]
        self.first_item = [t(np.minimum.reduceat(order, st)) for st in starts]
        self.offsets = t(np.cumsum([0] + [k.size for k in keys]))
        self._start = t(np.concatenate(starts))  # per tree node: its items' span in `order`
        self._stop = t(np.concatenate([np.append(st[1:], N) for st in starts]))

    @property
    def child_codes(self) -> list[torch.Tensor]:
        """Per level l, LongTensor (E_l, W_l): each depth-l node's children's codes, ascending, -1 padded."""
        return self._padded_children()[0]

    @property
    def child_index(self) -> list[torch.Tensor]:
        """Per level l, LongTensor (E_l, W_l): each depth-l node's children (depth-(l + 1) nodes), -1 padded."""
        return self._padded_children()[1]

    def _padded_children(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._padded is None:
            codes, index = [], []
            for lv, (start, parent) in enumerate(zip(self.child_start, self.parent, strict=True)):  # loop over levels
                deg, C = start.diff(), parent.numel()
                child = torch.arange(C, device=parent.device)
                cc, ci = (torch.full((deg.numel(), int(deg.max())), -1, dtype=torch.long, device=parent.device) for _ in range(2))
                slot = child - start[parent]
                cc[parent, slot], ci[parent, slot] = self.code[lv].long(), child  # (a serving copy keeps codes as int32)
                codes.append(cc)
                index.append(ci)
            self._padded = codes, index
        return self._padded

    def find(self, codes: torch.Tensor) -> torch.Tensor:
        """Node of each prefix (..., d), d <= L, at depth d; -1 where no tuple has that prefix."""
        return find(self.keys[codes.shape[-1]], prefix_key(codes, self.sizes))

    def span(self, depth: int | torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, stop) (...): the items under nodes ``rows`` (...) of ``depth`` (int or (...)) are order[start:stop]."""
        number = self.offsets[depth] + rows
        return self._start[number], self._stop[number]

    def tree_nodes(self) -> torch.Tensor:
        """(N, L + 1) each item's path as node numbers of ``PrefixTree.from_semantic_ids`` over these tuples."""
        return self.node + self.offsets[: len(self.sizes) + 1]

    def to(self, device: torch.device | str) -> PrefixIndex:
        """A copy on ``device`` (an index is never changed in place)."""
        out = object.__new__(PrefixIndex)
        for name, v in vars(self).items():
            setattr(out, name, [x.to(device) for x in v] if isinstance(v, list) else v.to(device) if isinstance(v, torch.Tensor) else v)
        out._padded = None  # built again there on first use
        return out
