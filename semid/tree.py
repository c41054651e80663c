"""PrefixTree: every valid token sequence, compiled into flat tensors.

The tree is data, not objects (after STATIC, youtube/static-constraint-decoding). Nodes are numbered breadth
first, so a node's children are one contiguous run of edges, sorted by token:

    row_ptr     LongTensor (num_nodes + 1,)  edges of node n are row_ptr[n] : row_ptr[n + 1]
    child_token LongTensor (E,)              the token on each edge, ascending within a node
    child_node  LongTensor (E,)              the node each edge leads to
    edge_key    LongTensor (E,)              parent * V + token, ascending: one searchsorted finds any edge
    dense_next  LongTensor (n_dense, V)      for the shallow nodes (ids < n_dense), next node per token or -1
    node_value  LongTensor (num_nodes,)      the value (item id) of the sequence that ends here, else -1
    node_depth  LongTensor (num_nodes,)

One decoding step for a batch of beams is a gather: node ids -> allowed-token mask, (node, token) -> next node.
No Python loop over beams or items; the only loops are over depth (the sequence length). Node id -1 means
"not in the tree": it allows nothing and leads nowhere.

Generic over variable-length sequences, so it holds semantic IDs (fixed length) and tokenised titles
(GENRE-style) alike. With ``end_token`` every sequence is closed by that token (so one sequence may be a prefix of
another); with ``pad_token`` a finished sequence may be followed by padding (what beam search feeds finished beams).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from semid.ids import SemanticIDs
from semid.layout import TokenLayout

log = logging.getLogger(__name__)

DENSE_BUDGET = 1 << 22  # entries of the dense next-node table (32 MiB of int64) before shallow levels go sparse


class PrefixTree:
    """A compiled prefix tree over token sequences. Build with :meth:`from_sequences` or :meth:`from_semantic_ids`."""

    def __init__(
        self,
        *,
        row_ptr: torch.Tensor,
        child_token: torch.Tensor,
        child_node: torch.Tensor,
        node_value: torch.Tensor,
        node_depth: torch.Tensor,
        dense_next: torch.Tensor,
        vocab_size: int,
    ) -> None:
        self.row_ptr = row_ptr
        self.child_token = child_token
        self.child_node = child_node
        self.node_value = node_value
        self.node_depth = node_depth
        self.dense_next = dense_next
        self.vocab_size = int(vocab_size)
        parent = torch.repeat_interleave(torch.arange(self.num_nodes, device=row_ptr.device), row_ptr.diff())
        self.edge_key = parent * self.vocab_size + child_token

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_sequences(
        cls,
        sequences: np.ndarray | Sequence[Sequence[int]],
        values: np.ndarray | Sequence[int],
        vocab_size: int,
        *,
        end_token: int | None = None,
        pad_token: int | None = None,
        dense_budget: int = DENSE_BUDGET,
    ) -> PrefixTree:
        """Compile sequences into a tree.

        Args:
            sequences: int array (N, T), each row a sequence of tokens in [0, vocab_size) padded at the end with -1;
                or a list of N int sequences of any lengths >= 1.
            values: int array (N,) >= 0, what each sequence maps back to (item ids).
            vocab_size: V; every token must be in [0, V).
            end_token: appended to every sequence (eos); lets one sequence be a prefix of another.
            pad_token: if given, a finished sequence may be followed by any number of pad tokens.
            dense_budget: the shallow levels get a dense (nodes x V) next-node table while it has at most this
                many entries; deeper levels use the sparse edges.
        """
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"`vocab_size` must be a positive int, got {vocab_size!r}")
        seqs = _as_padded(sequences)
        values = np.asarray(values)
        N, T = seqs.shape
        if values.shape != (N,) or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"`values` must be an integer array of shape ({N},), got {values.dtype} {values.shape}")
        if (values < 0).any():
            raise ValueError(f"`values` must be >= 0, got {int(values.min())}")
        lengths = _check_tokens(seqs, vocab_size)
        for name, tok in (("end_token", end_token), ("pad_token", pad_token)):
            if tok is not None and not 0 <= tok < vocab_size:
                raise ValueError(f"`{name}` must be in [0, {vocab_size}), got {tok!r}")
            if tok is not None and (seqs == tok).any():
                row = int(np.argwhere(seqs == tok)[0, 0])
                raise ValueError(f"sequence {row} (value {int(values[row])}) contains `{name}` {tok}; it may only be added by the tree")
        if end_token is not None:
            seqs = np.concatenate([seqs, np.full((N, 1), -1, dtype=np.int64)], axis=1)
            seqs[np.arange(N), lengths] = end_token
            lengths = lengths + 1
            T += 1

        # 1. lexicographic order (-1 padding sorts first, so a prefix comes before its extensions)
        order = np.lexsort(seqs.T[::-1])
        seqs, lengths, values = seqs[order], lengths[order], values[order]
        neq = seqs[1:] != seqs[:-1]  # (N-1, T)
        first_diff = np.where(neq.any(axis=1), neq.argmax(axis=1), T)
        dup = np.flatnonzero(first_diff == T)
        if dup.size:
            i = int(dup[0])
            raise ValueError(f"duplicate sequence: values {int(values[i])} and {int(values[i + 1])} have the same tokens {seqs[i][: lengths[i]].tolist()}")
        if end_token is None:
            # a sequence that is a prefix of the next one would end at an internal node: ambiguous without end_token
            is_prefix = first_diff >= lengths[:-1]
            if is_prefix.any():
                i = int(np.flatnonzero(is_prefix)[0])
                raise ValueError(f"sequence of value {int(values[i])} is a prefix of that of value {int(values[i + 1])}: pass `end_token`")

        # 2. nodes depth by depth: row i opens a new node at depth d+1 iff it differs from row i-1 in columns <= d
        node_of_row = np.zeros(N, dtype=np.int64)  # node each row is at, at the current depth (root = 0)
        parents, tokens, depths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(1, np.int64)]
        node_value = [np.full(1, -1, np.int64)]
        next_id = 1
        starts_any = np.ones(N, dtype=bool)
        for d in range(T):
            valid = lengths > d
            if not valid.any():
                break
            starts_any[1:] = first_diff <= d
            opens = valid & starts_any
            new_ids = next_id + np.cumsum(opens) - 1  # for valid rows: id of the node they are at after column d
            first_rows = np.flatnonzero(opens)
            parents.append(node_of_row[first_rows])
            tokens.append(seqs[first_rows, d])
            depths.append(np.full(first_rows.size, d + 1, np.int64))
            vals = np.full(first_rows.size, -1, np.int64)
            node_of_row = np.where(valid, new_ids, node_of_row)
            # a row whose content ends here (last real token, or its end token) gives the node its value
            ends = valid & ((lengths == d + 1) | ((end_token is not None) & (lengths == d + 2)))
            vals[node_of_row[ends] - next_id] = values[ends]
            node_value.append(vals)
            next_id += first_rows.size
        parent = np.concatenate(parents)
        token = np.concatenate(tokens)
        depth = np.concatenate(depths)
        value = np.concatenate(node_value)
        num_nodes = next_id
        child = np.arange(1, num_nodes, dtype=np.int64)  # edges are created in node order: edge e leads to e + 1

        # 3. padding after a finished sequence: leaves loop to themselves on pad
        if pad_token is not None:
            is_leaf = np.bincount(parent, minlength=num_nodes) == 0
            leaves = np.flatnonzero(is_leaf)
            parent = np.concatenate([parent, leaves])
            token = np.concatenate([token, np.full(leaves.size, pad_token, np.int64)])
            child = np.concatenate([child, leaves])
            edge_order = np.argsort(parent * vocab_size + token, kind="stable")
            parent, token, child = parent[edge_order], token[edge_order], child[edge_order]
        row_ptr = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=num_nodes))])

        # 4. dense next-node table for the shallowest levels that fit the budget (nodes are in depth order)
        nodes_upto = np.cumsum(np.bincount(depth))  # nodes with depth <= d
        fits = np.flatnonzero(nodes_upto * vocab_size <= dense_budget)
        n_dense = int(nodes_upto[fits[-1]]) if fits.size else 0
        dense = np.full((n_dense, vocab_size), -1, dtype=np.int64)
        in_dense = parent < n_dense
        dense[parent[in_dense], token[in_dense]] = child[in_dense]

        t = torch.from_numpy
        tree = cls(
            row_ptr=t(row_ptr.astype(np.int64)),
            child_token=t(token),
            child_node=t(child),
            node_value=t(value),
            node_depth=t(depth),
            dense_next=t(dense),
            vocab_size=int(vocab_size),
        )
        log.debug("built %r", tree)
        return tree

    @classmethod
    def from_semantic_ids(cls, ids: SemanticIDs, layout: TokenLayout, **kwargs: int) -> PrefixTree:
        """The tree of every item's code tokens followed by eos; finished beams may be padded."""
        if layout.codebook_sizes != ids.codebook_sizes:
            raise ValueError(f"`layout` has codebook sizes {list(layout.codebook_sizes)}, the IDs {list(ids.codebook_sizes)}")
        tokens = np.asarray(layout.codes_to_tokens(ids.codes))
        return cls.from_sequences(
            tokens, ids.item_ids, layout.vocab_size, end_token=layout.eos_token_id, pad_token=layout.pad_token_id, **kwargs
        )

    # ---- size ----------------------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return int(self.row_ptr.numel() - 1)

    @property
    def num_dense(self) -> int:
        return int(self.dense_next.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.node_depth.max())

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    @property
    def nbytes(self) -> int:
        tensors = (self.row_ptr, self.child_token, self.child_node, self.edge_key, self.node_value, self.node_depth, self.dense_next)
        return sum(x.numel() * x.element_size() for x in tensors)

    def to(self, device: torch.device | str) -> PrefixTree:
        """A copy of the tree on ``device``."""
        out = object.__new__(PrefixTree)
        for name, value in vars(self).items():
            setattr(out, name, value.to(device) if isinstance(value, torch.Tensor) else value)
        return out

    def __repr__(self) -> str:
        return f"PrefixTree(num_nodes={self.num_nodes}, edges={self.child_token.numel()}, vocab_size={self.vocab_size}, num_dense={self.num_dense}, bytes={self.nbytes})"

    # ---- decoding steps (vectorised over the batch) -------------------------------------------------------------
    def next_nodes(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Follow one edge per row.

        Args:
            nodes: LongTensor (B,) in [-1, num_nodes).
            tokens: LongTensor (B,).
        Returns:
            LongTensor (B,): the child reached, or -1 where that token is not allowed (or the node is -1).
        """
        V = self.vocab_size
        ok = (nodes >= 0) & (tokens >= 0) & (tokens < V)
        keys = torch.where(ok, nodes * V + tokens, -1)
        pos = torch.searchsorted(self.edge_key, keys).clamp_max(self.edge_key.numel() - 1)
        hit = ok & (self.edge_key[pos] == keys)
        return torch.where(hit, self.child_node[pos], -1)

    def walk(self, prefixes: torch.Tensor) -> torch.Tensor:
        """Node reached by each prefix from the root. prefixes: LongTensor (B, T) -> LongTensor (B,), -1 if not in the tree."""
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for t in range(prefixes.shape[1]):  # loop over depth, not beams
            nodes = self.next_nodes(nodes, prefixes[:, t])
        return nodes

    def lookup(self, sequences: torch.Tensor) -> torch.Tensor:
        """Value of each complete sequence (with or without its end token / trailing pads); -1 if none.

        sequences: LongTensor (B, T) -> LongTensor (B,).
        """
        nodes = self.walk(sequences)
        return torch.where(nodes >= 0, self.node_value[nodes.clamp_min(0)], -1)

    def allowed_mask(self, nodes: torch.Tensor, token_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Which tokens may follow each node.

        Args:
            nodes: LongTensor (B,) in [-1, num_nodes); -1 allows nothing.
            token_range: (lo, hi) to get only the columns lo..hi-1 (children outside it are not shown).
        Returns:
            BoolTensor (B, hi - lo), or (B, V) without ``token_range``.
        """
        lo, hi = token_range if token_range is not None else (0, self.vocab_size)
        if not 0 <= lo < hi <= self.vocab_size:
            raise ValueError(f"`token_range` must satisfy 0 <= lo < hi <= {self.vocab_size}, got {token_range!r}")
        B = nodes.shape[0]
        mask = torch.zeros(B, hi - lo, dtype=torch.bool, device=nodes.device)
        dense = (nodes >= 0) & (nodes < self.num_dense)
        if dense.any():
            rows = dense.nonzero().squeeze(1)
            mask[rows] = self.dense_next[nodes[rows], lo:hi] >= 0
        sparse = nodes >= self.num_dense
        if sparse.any():
            rows = sparse.nonzero().squeeze(1)
            start = self.row_ptr[nodes[rows]]
            degree = self.row_ptr[nodes[rows] + 1] - start
            # one entry per (row, child) pair: row index, and the edge it reads
            pair_row = torch.repeat_interleave(rows, degree)
            first = torch.repeat_interleave(start - (torch.cumsum(degree, 0) - degree), degree)
            edge = first + torch.arange(pair_row.numel(), device=nodes.device)
            tok = self.child_token[edge] - lo
            keep = (tok >= 0) & (tok < hi - lo)
            mask[pair_row[keep], tok[keep]] = True
        return mask


# ---- input checks (public boundary only) ---------------------------------------------------------------------------
def _as_padded(sequences: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
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


def _check_tokens(seqs: np.ndarray, vocab_size: int) -> np.ndarray:
    """Validate tokens and -1 padding; return each row's length."""
    is_pad = seqs == -1
    lengths = np.where(is_pad.any(axis=1), is_pad.argmax(axis=1), seqs.shape[1])
    pad_inside = is_pad & (np.arange(seqs.shape[1]) < lengths[:, None])
    after = ~is_pad & (np.arange(seqs.shape[1]) >= lengths[:, None])
    if after.any() or pad_inside.any():
        row = int(np.argwhere(after)[0, 0])
        raise ValueError(f"sequence {row} has tokens after its -1 padding: padding may only come at the end")
    if (lengths == 0).any():
        raise ValueError(f"sequence {int(np.flatnonzero(lengths == 0)[0])} is empty; every sequence needs at least one token")
    bad = ~is_pad & ((seqs < 0) | (seqs >= vocab_size))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"sequence {row} has token {int(seqs[row, col])} at position {col}, outside [0, {vocab_size})")
    return lengths
