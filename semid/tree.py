"""PrefixTree: every valid token sequence, compiled into flat tensors.

The tree is data, not objects (after STATIC, youtube/static-constraint-decoding). Nodes are numbered breadth
first, so a node's children are one contiguous run of edges, sorted by token:

    row_ptr     LongTensor (num_nodes + 1,)  edges of node n are row_ptr[n] : row_ptr[n + 1]
    child_token LongTensor (E,)              the token on each edge, ascending within a node
    child_node  LongTensor (E,)              the node each edge leads to
    edge_key    LongTensor (E,)              parent * V + token, ascending: one searchsorted finds any edge
    dense_next  Int/LongTensor (entries,)    dense next-node tables (node, token) -> child or -1, for some depths
    dense_spec  LongTensor (depths, 4)       per depth: its children's token window (first token, width), and
                                             whether it is dense with its table's offset: (offset, lo, width, dense)
    dense_allowed BoolTensor (entries,)      dense_next >= 0
    node_value  LongTensor (num_nodes,)      the value (item id) of the sequence that ends here, else -1
    node_depth  LongTensor (num_nodes,)

One decoding step for a batch of beams is a gather: node ids -> allowed-token mask, (node, token) -> next node.
No Python loop over beams or items; the only loops are over depth (the sequence length). Node id -1 means
"not in the tree": it allows nothing and leads nowhere.

A step does a fixed amount of work per beam whatever the tree's size: depths whose nodes have many children get
a dense table over that depth's token window (the block of one code level for semantic IDs: nodes x K entries,
int32, plus a bool copy for masks), chosen by average degree within ``dense_budget``; the other depths have few
children per node and are read through a fixed-width window of their CSR row, not a search over all edges.

Generic over variable-length sequences, so it holds semantic IDs (fixed length) and tokenised titles
(GENRE-style) alike. With ``end_token`` every sequence is closed by that token (so one sequence may be a prefix of
another); with ``pad_token`` a finished sequence may be followed by padding (what beam search feeds finished beams).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from semid._tree_build import as_tokens, check_inputs, dense_tables
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.prefix_index import number_rows

log = logging.getLogger(__name__)

DENSE_BUDGET = 1 << 25  # entries of the dense next-node tables (128 MiB of int32) before high-degree depths go sparse
ROW_SCAN_WIDTH = 32  # sparse depths whose nodes have at most this many children scan their row; wider ones search


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
        dense_spec: torch.Tensor,
        vocab_size: int,
        num_sequences: int,
        end_token: int | None = None,
    ) -> None:
        self.row_ptr = row_ptr
        self.child_token = child_token
        self.child_node = child_node
        self.node_value = node_value
        self.node_depth = node_depth
        self.dense_next = dense_next
        self.dense_spec = dense_spec
        self.vocab_size = int(vocab_size)
        self.num_sequences = int(num_sequences)  # N, the sequences (items) the tree was built from
        self.end_token = end_token  # what closes every sequence (None: nothing), read by lookup
        parent = torch.repeat_interleave(torch.arange(self.num_nodes, device=row_ptr.device), row_ptr.diff())
        self.edge_key = parent * self.vocab_size + child_token
        self.dense_allowed = dense_next >= 0  # the dense tables as masks: a step gathers bytes, not int32s
        # per-depth layout as Python ints (read on every step; no device sync): nodes of depth d are
        # first[d] : first[d + 1] (breadth-first numbering); max_degree[d] children at most
        counts = torch.bincount(node_depth.cpu(), minlength=dense_spec.shape[0])
        self._first = [0, *torch.cumsum(counts, 0).tolist()]
        self._depth_start = torch.tensor(self._first[1:-1], dtype=torch.long, device=row_ptr.device)  # (depths - 1,)
        self._scan = torch.arange(ROW_SCAN_WIDTH, device=row_ptr.device)
        degree = row_ptr.diff().cpu()
        self._max_degree = [int(degree[a:b].max()) if b > a else 0 for a, b in pairwise(self._first)]
        self._spec = [tuple(int(v) for v in row) for row in dense_spec.cpu()]  # (offset, lo, width, dense)

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
        seqs, values, lengths = check_inputs(sequences, values, vocab_size, end_token, pad_token)
        N = seqs.shape[0]
        if end_token is not None:
            seqs = np.concatenate([seqs, np.full((N, 1), -1, dtype=np.int64)], axis=1)
            seqs[np.arange(N), lengths] = end_token
            lengths = lengths + 1

        # 1. lexicographic order (-1 padding sorts first, so a prefix comes before its extensions), nodes numbered
        order, new, at = number_rows(seqs, lengths)
        seqs, lengths, values = seqs[order], lengths[order], values[order]
        dup = np.flatnonzero(~new[1:, -1])  # a row equal to the one before it
        if dup.size:
            i = int(dup[0])
            raise ValueError(
                f"duplicate sequence: values {int(values[i])} and {int(values[i + 1])} have the same tokens {seqs[i][: lengths[i]].tolist()}"
            )
        if end_token is None:
            # a sequence that is a prefix of the next one would end at an internal node: ambiguous without end_token
            is_prefix = ~new[1:][np.arange(N - 1), lengths[:-1] - 1]
            if is_prefix.any():
                i = int(np.flatnonzero(is_prefix)[0])
                raise ValueError(
                    f"sequence of value {int(values[i])} is a prefix of that of value {int(values[i + 1])}: pass `end_token`"
                )

        # 2. nodes depth by depth, breadth first: sorted row i opens one at depth d + 1 iff it is that long and new[i, d]
        opens = new & (np.arange(seqs.shape[1]) < lengths[:, None])
        first = np.concatenate([[1], 1 + np.cumsum(opens.sum(0))])  # number of each depth's first node (the root is 0)
        ids, num_nodes = at + first[:-1], int(first[-1])  # (N, T) each row's node at depth d + 1
        d, r = np.nonzero(opens.T)  # the new nodes depth by depth, in row order
        parent, token, depth = np.where(d > 0, ids[r, d - 1], 0), seqs[r, d], np.concatenate([[0], d + 1])
        value = np.full(num_nodes, -1, dtype=np.int64)  # a sequence's value at its last token (and at its end token)
        value[ids[np.arange(N), lengths - 1]] = values
        if end_token is not None:
            value[ids[np.arange(N), lengths - 2]] = values
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

        # 4. dense next-node tables over each depth's token window, highest average degree first, within budget
        dense_spec, dense = dense_tables(parent, token, child, depth, row_ptr, num_nodes, dense_budget)

        t = torch.from_numpy
        tree = cls(
            row_ptr=t(row_ptr.astype(np.int64)),
            child_token=t(token),
            child_node=t(child),
            node_value=t(value),
            node_depth=t(depth),
            dense_next=t(dense),
            dense_spec=t(dense_spec),
            vocab_size=int(vocab_size),
            num_sequences=N,
            end_token=None if end_token is None else int(end_token),
        )
        log.debug("built %r", tree)
        return tree

    @classmethod
    def from_semantic_ids(cls, ids: SemanticIDs, layout: TokenLayout, **kwargs: int) -> PrefixTree:
        """The tree of every item's code tokens followed by eos; finished beams may be padded."""
        if layout.codebook_sizes != ids.codebook_sizes:
            raise ValueError(
                f"`layout` has codebook sizes {list(layout.codebook_sizes)}, the IDs {list(ids.codebook_sizes)}"
            )
        tokens = np.asarray(layout.codes_to_tokens(ids.codes))
        return cls.from_sequences(
            tokens,
            ids.item_ids,
            layout.vocab_size,
            end_token=layout.eos_token_id,
            pad_token=layout.pad_token_id,
            **kwargs,
        )

    # ---- size ----------------------------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return int(self.row_ptr.numel() - 1)

    @property
    def num_dense(self) -> int:
        """Nodes with a dense next-node row."""
        return sum(
            b - a for (*_, dense), (a, b) in zip(self._spec, pairwise(self._first), strict=True) if dense
        )

    @property
    def max_depth(self) -> int:
        return int(self.node_depth.max())

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    @property
    def nbytes(self) -> int:
        tensors = (
            self.row_ptr,
            self.child_token,
            self.child_node,
            self.edge_key,
            self.node_value,
            self.node_depth,
            self.dense_next,
            self.dense_spec,
            self.dense_allowed,
        )
        return sum(x.numel() * x.element_size() for x in tensors)

    def to(self, device: torch.device | str) -> PrefixTree:
        """The tree on ``device``: itself if it is there already (a tree is never changed in place), else a copy."""
        want, here = torch.device(device), self.device
        if want.type == here.type and want.index in (None, here.index):
            return self
        out = object.__new__(PrefixTree)
        for name, value in vars(self).items():
            setattr(out, name, value.to(device) if isinstance(value, torch.Tensor) else value)
        return out

    def __repr__(self) -> str:
        return f"PrefixTree(num_nodes={self.num_nodes}, edges={self.child_token.numel()}, vocab_size={self.vocab_size}, num_dense={self.num_dense}, bytes={self.nbytes})"

    # ---- decoding steps (vectorised over the batch) -------------------------------------------------------------
    def next_nodes(self, nodes: torch.Tensor, tokens: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Follow one edge per row.

        Args:
            nodes: LongTensor (B,) in [-1, num_nodes).
            tokens: LongTensor (B,).
            depth: where every node but -1 is known to be at this depth (a beam of fixed-length IDs at a step):
                no search for the depths present (no read of the nodes' values on the host: no device sync).
        Returns:
            LongTensor (B,): the child reached, or -1 where that token is not allowed (or the node is -1).
        """
        if depth is not None:
            if not 0 <= depth < len(self._spec):
                raise ValueError(f"`depth` must be in [0, {len(self._spec)}), got {depth!r}")
            live = nodes >= 0
            out = self._next_at_depth(depth, torch.where(live, nodes, self._first[depth]), tokens)
            return torch.where(live, out, -1)
        out = None
        for d, rows in self._by_depth(nodes):  # loop over the depths present (one in a decoding step)
            if rows is None:
                return self._next_at_depth(d, nodes, tokens)
            out = torch.full_like(nodes, -1) if out is None else out
            out[rows] = self._next_at_depth(d, nodes[rows], tokens[rows])
        return torch.full_like(nodes, -1) if out is None else out

    def _next_at_depth(self, d: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """next_nodes for rows whose nodes all have depth d (>= 0)."""
        offset, lo, width, dense = self._spec[d]
        if dense:  # one gather from the depth's table
            col = tokens - lo
            ok = (col >= 0) & (col < width)
            idx = offset + (nodes - self._first[d]) * width + col.clamp(0, width - 1)
            return torch.where(ok, self.dense_next[idx].long(), -1)
        W, V = self._max_degree[d], self.vocab_size
        if W == 0:
            return torch.full_like(nodes, -1)
        keys = torch.where(
            (tokens >= 0) & (tokens < V), nodes * V + tokens, -1
        )  # edge_key of the wanted edge
        if W <= ROW_SCAN_WIDTH:  # compare with the keys of a fixed-width window from the node's first edge
            window = self.row_ptr[nodes][:, None] + self._scan[:W]  # (B, W)
            edge = window.clamp_max(self.edge_key.numel() - 1)
            # at most one hit per row: keys are unique, and the positions past the last edge (clamped onto it) never hit
            hit = (_take(self.edge_key, edge) == keys[:, None]) & (window < self.edge_key.numel())
            return torch.where(hit.any(dim=1), self.child_node[(edge * hit).sum(dim=1)], -1)
        pos = torch.searchsorted(self.edge_key, keys).clamp_max(self.edge_key.numel() - 1)  # wide rows: search
        return torch.where(self.edge_key[pos] == keys, self.child_node[pos], -1)

    def _by_depth(self, nodes: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """(depth, rows) for each depth among the live nodes; rows None when every row is live at that depth."""
        if nodes.numel() == 0:
            return []
        lo, hi = nodes.aminmax()
        lo, hi = int(lo), int(hi)  # one device sync
        if lo >= 0 and bisect_right(self._first, lo) == bisect_right(self._first, hi):  # one depth: the usual step
            return [(bisect_right(self._first, lo) - 1, None)]
        # depth from the node id alone (nodes are numbered depth by depth): no gather from the node arrays
        depth = torch.where(nodes >= 0, torch.searchsorted(self._depth_start, nodes, right=True), -1)
        return [(d, (depth == d).nonzero().squeeze(1)) for d in torch.unique(depth).tolist() if d >= 0]

    def walk(self, prefixes: torch.Tensor, *, stop_after_end: bool = False) -> torch.Tensor:
        """Node reached by each prefix from the root. prefixes: LongTensor (B, T) -> LongTensor (B,), -1 if not in the tree.
        ``stop_after_end``: tokens after a row's first end token are not read (what a finished beam is padded with)."""
        prefixes = as_tokens(prefixes, "prefixes")
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        ended = torch.zeros_like(nodes, dtype=torch.bool) if stop_after_end and self.end_token is not None else None
        for t in range(prefixes.shape[1]):  # loop over depth, not beams
            step = self.next_nodes(nodes, prefixes[:, t])
            if ended is not None:
                step = torch.where(ended, nodes, step)
                ended |= prefixes[:, t] == self.end_token
            nodes = step
        return nodes

    def lookup(self, sequences: torch.Tensor) -> torch.Tensor:
        """Value of each complete sequence (with or without its end token / trailing pads or end tokens: transformers'
        ``generate`` pads finished beams with eos where the pad id is 0); -1 if none.

        sequences: LongTensor (B, T) -> LongTensor (B,).
        """
        nodes = self.walk(sequences, stop_after_end=True)
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
            raise ValueError(
                f"`token_range` must satisfy 0 <= lo < hi <= {self.vocab_size}, got {token_range!r}"
            )
        mask = None
        for d, rows in self._by_depth(nodes):  # loop over the depths present (one in a decoding step)
            if rows is None:
                return self._mask_at_depth(d, nodes, lo, hi)
            mask = (
                torch.zeros(nodes.shape[0], hi - lo, dtype=torch.bool, device=nodes.device)
                if mask is None
                else mask
            )
            mask[rows] = self._mask_at_depth(d, nodes[rows], lo, hi)
        return (
            torch.zeros(nodes.shape[0], hi - lo, dtype=torch.bool, device=nodes.device)
            if mask is None
            else mask
        )

    def _mask_at_depth(self, d: int, nodes: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """allowed_mask (B, hi - lo) of rows whose nodes all have depth d (>= 0)."""
        offset, first_tok, width, dense = self._spec[d]
        B, K = nodes.shape[0], hi - lo
        if (
            dense
        ):  # gather the rows of the depth's table, keep the columns of its window that fall in [lo, hi)
            n_d = self._first[d + 1] - self._first[d]
            table = self.dense_allowed[offset : offset + n_d * width].view(n_d, width)
            rows = torch.index_select(table, 0, nodes - self._first[d])  # (B, width)
            if (first_tok, width) == (lo, K):
                return rows
            out = torch.zeros(B, K, dtype=torch.bool, device=nodes.device)
            a, b = max(lo, first_tok), min(hi, first_tok + width)
            if a < b:
                out[:, a - lo : b - lo] = rows[:, a - first_tok : b - first_tok]
            return out
        W = self._max_degree[d]
        if (
            W <= ROW_SCAN_WIDTH
        ):  # scatter a fixed-width window of each row's tokens; misses go to a spare column
            start, end = self.row_ptr[nodes], self.row_ptr[nodes + 1]
            edge = start[:, None] + self._scan[:W]  # (B, W)
            tok = _take(self.child_token, edge.clamp_max(self.child_token.numel() - 1)) - lo
            drop = edge >= end[:, None]
            if not lo <= first_tok <= first_tok + width <= hi:  # some children fall outside [lo, hi)
                drop |= (tok < 0) | (tok >= K)
            out = torch.zeros(B, K + 1, dtype=torch.bool, device=nodes.device)
            return out.scatter_(1, tok.masked_fill_(drop, K), True)[:, :K]
        out = torch.zeros(B, K, dtype=torch.bool, device=nodes.device)
        start = self.row_ptr[nodes]
        degree = self.row_ptr[nodes + 1] - start
        # wide rows: one entry per (row, child) pair: row index, and the edge it reads
        pair_row = torch.repeat_interleave(torch.arange(B, device=nodes.device), degree)
        first = torch.repeat_interleave(start - (torch.cumsum(degree, 0) - degree), degree)
        edge = first + torch.arange(pair_row.numel(), device=nodes.device)
        tok = self.child_token[edge] - lo
        keep = (tok >= 0) & (tok < K)
        out[pair_row[keep], tok[keep]] = True
        return out


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for a 1-D x and an index of any shape; index_select is ~2x faster than advanced indexing here."""
    return torch.index_select(x, 0, index.reshape(-1)).view(index.shape)

