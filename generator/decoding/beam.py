"""One beam search for every backbone (causal, T5, title) and every constraint (prefix tree, none).

A :class:`Backbone` is bound to the states of B histories (the causal and title models' state after each history, T5's
encoder output through ``T5Step``); step by step it gives every beam's logits over the step's token window (level l's
block, or the title vocabulary) after the beam's tokens so far, and keeps its own per-beam state (T5's cache, the
title head's GRU state) for the beams that survive. A constraint turns logits into log-probabilities and follows the
beams: :class:`TreeConstraint` (``semid.processor.masked_log_softmax`` over what the prefix tree allows) or :class:`Free`.
:func:`search` is the one loop, over steps only: candidates = beam scores + log-probabilities, one ``topk`` over
M x K per history, parents gathered; no loop over beams. With ``eos`` (titles) a beam that emitted eos is finished:
it stays in the pool, its only continuation ``pad`` (log 1 = 0: the tree's pad self-loop on leaves), finished and live
beams compete for the M slots by ``score / length ** length_penalty`` (length in tokens, eos included), and the loop
ends when all have finished; without (semantic IDs) every beam takes ``steps`` tokens.

Rows are history-major: row b * m + j is beam j of history b (m = 1 before the first step, M after).
Shapes: B histories, M beams, K a step's token window, T steps taken.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from semid.prefix_index import PrefixIndex
from semid.processor import masked_log_softmax
from semid.tree import PrefixTree


class Backbone(Protocol):
    """A model bound to the states of B histories (see the module docstring)."""

    B: int
    device: torch.device
    # masked (optional, default False): its logits are -inf wherever the tree has no child (EdgeLevels': it reads
    # only the children), so a constraint need not mask them

    def window(self, step: int) -> tuple[int, int]:
        """The token window (lo, hi) of step ``step``."""

    def logits(self, step: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        """FloatTensor (B*m, hi - lo): every beam's logits after ``prefix`` LongTensor (B*m, step), its tokens so far;
        the rows of finished beams (``done`` (B*m,), with eos) are not read. An ensemble gives its E members' logits,
        (E, B*m, hi - lo), which :class:`TreeConstraint` normalises each on its own and adds."""

    def reorder(self, step: int, rows: torch.Tensor) -> None:
        """Keep the per-beam state of rows LongTensor (B*M,) (each surviving beam's parent) after step ``step``."""


class TreeConstraint:
    """Beams on a prefix tree: each beam's node (-1: dead, allows nothing). With ``trained_tree`` (the tree of the
    items the model was trained with, when items were added since) each node's log-probabilities are normalised over
    its trained children where it has any, as exact scoring does."""

    def __init__(self, tree: PrefixTree, rows: int, device: torch.device, trained_tree: PrefixTree | None = None) -> None:
        self.tree, self.trained_tree = tree, trained_tree
        self.nodes = torch.zeros(rows, dtype=torch.long, device=device)  # (R,) tree node of each beam
        self.old_nodes = self.nodes.clone()  # the same prefixes in trained_tree (-1 where only added items lead)

    def logp(self, logits: torch.Tensor, lo: int, hi: int, done: torch.Tensor | None = None, masked: bool = False
             ) -> torch.Tensor:
        """(R, K) log-probabilities from logits (R, K), or from the logits of E experts (E, R, K) (an ensemble's
        members): the sum of each expert's log-probabilities, each normalised over the allowed codes on its own.
        ``masked``: the logits are -inf wherever the tree allows nothing (a ``masked`` backbone's), so no mask."""
        if masked and done is None and self.trained_tree is None:
            return premasked_log_softmax(logits, self.nodes)
        allowed = self.tree.allowed_mask(self.nodes if done is None else torch.where(done, -1, self.nodes), token_range=(lo, hi))
        if self.trained_tree is None:
            out = masked_log_softmax(logits, allowed)
        else:
            norm = self.trained_tree.allowed_mask(self.old_nodes, token_range=(lo, hi))
            out = masked_log_softmax(logits, allowed, norm)  # (a node with no trained child: normalised over allowed)
        return out.sum(0) if out.ndim == 3 else out

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor, depth: int | None = None) -> None:
        """Each beam of ``rows`` (its parent's row) takes its token; ``depth``: the depth every live parent is at
        (fixed-length IDs; with eos a finished beam stays on its leaf, so none is given)."""
        self.nodes = torch.where(alive, self.tree.next_nodes(self.nodes[rows], tokens, depth), -1)
        if self.trained_tree is not None:
            self.old_nodes = self.trained_tree.next_nodes(self.old_nodes[rows], tokens, depth)


def csr_pairs(index: PrefixIndex, depth: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair per child of each of ``nodes`` (R,) (tree node numbers at ``depth``, -1: none) in the index's CSR
    runs: (row (C,), the pair's entry of ``nodes``; child (C,), the child's row at depth + 1). Beams x their
    children, not x the level's largest degree; no loop."""
    node = (nodes - index.offsets[depth]).clamp_min(0)
    start = index.child_start[depth][node]
    degree = torch.where(nodes >= 0, index.child_start[depth][node + 1] - start, 0)  # (R,)
    row = torch.repeat_interleave(torch.arange(node.numel(), device=node.device), degree)  # (C,)
    first = torch.cumsum(degree, 0) - degree  # each entry's first pair
    child = torch.arange(row.numel(), device=node.device) + (start - first).index_select(0, row)
    return row, child


def csr_places(index: PrefixIndex, depth: int, nodes: torch.Tensor, width: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`csr_pairs`, and each pair's place in the step's (R, ``width``) block: its row x width + its child's
    code. (row, child, place), each (C,)."""
    row, child = csr_pairs(index, depth, nodes)
    return row, child, row * width + index.code[depth].index_select(0, child)


def premasked_log_softmax(logits: torch.Tensor, nodes: torch.Tensor, listed: bool | None = None) -> torch.Tensor:
    """``masked_log_softmax`` of logits (R, K) (or E experts' (E, R, K), summed) that are -inf already wherever the
    constraint allows nothing: the same numbers without a mask's two passes; a dead beam's row (``nodes`` -1, all
    -inf) is -inf. On the CPU the dead rows are listed (most steps have none: no pass over the block); elsewhere one
    masked pass, never reading the device's values back (no host synchronisation per step on a GPU); ``listed``
    chooses (default: by the device)."""
    out = logits.log_softmax(-1)
    out = out.sum(0) if out.ndim == 3 else out
    if not (out.device.type == "cpu" if listed is None else listed):
        return out.masked_fill_((nodes < 0).unsqueeze(-1), float("-inf"))
    dead = torch.nonzero(nodes < 0).squeeze(1)
    return out.index_fill_(0, dead, float("-inf")) if dead.numel() else out


class IndexConstraint:
    """Beams on a :class:`~semid.prefix_index.PrefixIndex` rather than its :class:`PrefixTree`: the same constraint
    and the same node numbers (node (d, r) is the tree's ``offsets[d] + r``, so a backbone that reads ``nodes``
    reads these alike), without the tree (its tables hold the index's structure again: 257 MB per million items).
    Items of L codes, one step per level, no eos; step l's token is level l's code + ``lo[l]`` (its window's start);
    ``values`` (N,): what a leaf gives for each row of the index's tuples (default: the row).
    A step's pairs (:func:`csr_pairs`) are computed once and shared with a backbone that asks (:meth:`pairs`)."""

    def __init__(self, index: PrefixIndex, lo: list[int], rows: int, device: torch.device,
                 values: torch.Tensor | None = None, dense: list[torch.Tensor | None] | None = None) -> None:
        self.index, self.lo, self.values, self.depth = index, lo, values, 0
        self.dense = dense or [None] * len(lo)  # per depth: (P + 1, K) child rows by parent and code (paths.dense_levels)
        self.nodes = torch.zeros(rows, dtype=torch.long, device=device)  # (R,) tree node of each beam, -1: dead
        self._pairs: tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._width = 0  # the step's window (K), set by logp for advance

    def pairs(self, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`csr_pairs` of the beams' nodes now, and each pair's place in a (R, ``width``) step block (its row x
        width + its child's code, ascending), made once per step for the backbone, the mask and the step's advance."""
        if self._pairs is None or self._pairs[0] is not self.nodes or self._pairs[1] != width:
            self._pairs = (self.nodes, width, csr_places(self.index, self.depth, self.nodes, width))
        return self._pairs[2]

    def dense_rows(self, table: torch.Tensor) -> torch.Tensor:
        """The beams' rows of a (P + 1, K) table of this depth (``dense``; its last row, all -1, a dead beam's): (R, K)."""
        return table.index_select(0, self._parents(self.nodes, table.shape[0] - 1))

    def _parents(self, nodes: torch.Tensor, dead: int) -> torch.Tensor:
        return torch.where(nodes >= 0, nodes - self.index.offsets[self.depth], dead)

    def logp(self, logits: torch.Tensor, lo: int, hi: int, done: torch.Tensor | None = None, masked: bool = False
             ) -> torch.Tensor:
        R, K = self.nodes.numel(), hi - lo
        self._width = K
        if masked and done is None:
            return premasked_log_softmax(logits, self.nodes)
        if self.dense[self.depth] is not None:  # a nearly full level: its children by code, read whole
            allowed = self.dense_rows(self.dense[self.depth] >= 0)  # ((P + 1) x K: made per step, 65k cells at 10M)
        else:
            allowed = torch.zeros(R * K, dtype=torch.bool, device=self.nodes.device).index_fill_(0, self.pairs(K)[2], True)
        out = masked_log_softmax(logits, allowed.view(R, K))
        return out.sum(0) if out.ndim == 3 else out  # an ensemble's members (E, R, K): the sum of each's

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor, depth: int | None = None) -> None:
        d, code = self.depth, tokens - self.lo[self.depth]  # (its own depth: every beam's, one step per level)
        table = self.dense[d]
        if table is not None:  # the chosen (beam, code)'s child, read by parent and code
            child = table[self._parents(self.nodes[rows], table.shape[0] - 1), code].long()
        else:  # found among the step's pairs by its place (ascending: one search per beam, no (R, K) map)
            _, children, place = self.pairs(self._width)
            key = rows * self._width + code
            pos = torch.searchsorted(place, key).clamp_max(max(place.numel() - 1, 0))
            child = (torch.where(place[pos] == key, children[pos], -1) if place.numel()
                     else torch.full_like(key, -1))
        self.nodes = torch.where(alive & (child >= 0), child + self.index.offsets[d + 1], -1)
        self.depth += 1

    def leaf_items(self, nodes: torch.Tensor) -> torch.Tensor:
        """The items of leaves (tree node numbers at depth L; -1 where not one): their rows in the index's tuples, or
        ``values`` at those rows (the item ids, as the tree's ``node_value`` holds them)."""
        rows = self.index.order[self.index._start[nodes.clamp_min(0)]].long()  # (a serving index keeps int32)
        return torch.where(nodes >= 0, rows if self.values is None else self.values[rows], -1)


class Free:
    """No tree: each step's log-softmax over its whole window, ``pad`` excluded when given (free generation)."""

    def __init__(self, pad: int | None = None) -> None:
        self.pad = pad

    def logp(self, logits: torch.Tensor, lo: int, hi: int, done: torch.Tensor | None = None, masked: bool = False
             ) -> torch.Tensor:
        if self.pad is not None:
            logits = logits.index_fill(-1, torch.tensor([self.pad - lo], device=logits.device), float("-inf"))
        out = logits.log_softmax(-1)
        return out.sum(0) if out.ndim == 3 else out  # an ensemble's members (E, R, K): the sum of each's

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor, depth: int | None = None) -> None:
        pass


class Beams(NamedTuple):
    """All M beams of each history, best first by ``scores``.

    tokens: LongTensor (B, M, T) chosen tokens (with eos: eos included, pad after); lengths: (B, M) tokens up to and
    including eos (T without eos; a dead beam's 0 there when no length penalty is given: nothing reads it);
    scores: (B, M) ``logp / length ** length_penalty`` (-inf for a dead beam); logp:
    (B, M) the sum of log-probabilities; finished: (B, M) bool, alive (and with eos, eos emitted); nodes: (B, M) the
    tree node reached (-1: not in the tree, or no tree).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    logp: torch.Tensor
    finished: torch.Tensor
    nodes: torch.Tensor


def search(backbone: Backbone, constraint: TreeConstraint | IndexConstraint | Free, *, num_beams: int, steps: int, eos: int | None = None,
           pad: int | None = None, length_penalty: float = 0.0) -> Beams:
    """Beam search of ``num_beams`` beams per history over at most ``steps`` steps (see the module docstring)."""
    assert steps >= 1 and (eos is None) == (pad is None), f"steps {steps}, eos {eos}, pad {pad}"
    B, M, device = backbone.B, num_beams, backbone.device
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)  # (B*m, t) the tokens chosen so far
    length = torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, m)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=device)  # (B, m) dead, or (with eos) eos emitted
    m = 1
    counted = eos is not None or bool(length_penalty)  # else lengths and finished follow from the scores at the end
    for step in range(steps):  # the only loop: over steps
        if eos is not None and bool(finished.all()):
            break
        lo, hi = backbone.window(step)
        K = hi - lo
        done = None if eos is None else finished.view(-1)  # (B*m,)
        logp = constraint.logp(backbone.logits(step, tokens, m, done), lo, hi, done, masked=getattr(backbone, "masked", False))  # (B*m, K)
        if step == 0:
            scores = logp.new_zeros(B, 1)  # (B, m) the beams' sums of log-probabilities
            if pad is not None:
                pad_only = logp.new_full((K,), float("-inf"))
                pad_only[pad - lo] = 0.0
        if done is not None:
            logp = torch.where(done[:, None], pad_only, logp)  # a finished beam's only continuation: pad, log 1 = 0
        cand = scores[:, :, None] + logp.view(B, m, K)  # (B, m, K)
        key = cand / (length + (~finished).long())[:, :, None].to(cand.dtype).pow(length_penalty) if length_penalty else cand
        key = key.reshape(B, m * K)
        if m * K < M:  # fewer candidates than beams: pad with dead ones
            key = torch.nn.functional.pad(key, (0, M - m * K), value=float("-inf"))
        top, idx = key.topk(M, dim=1)  # (B, M), best first
        idx = idx.clamp_max(m * K - 1)  # a padded slot points at a real parent
        parent, tok = idx // K, (idx % K).view(-1) + lo
        alive = torch.isfinite(top)
        scores = torch.where(alive, cand.reshape(B, m * K).gather(1, idx), float("-inf"))
        rows = (torch.arange(B, device=idx.device)[:, None] * m + parent).view(-1) if B > 1 else parent.view(-1)  # (B*M,)
        if counted:  # each beam's parent row above; lengths and finished beams (a fixed length: every live one is
            length = length.gather(1, parent) + (~finished).gather(1, parent).long()  # at step + 1, none finished)
            finished = (finished.view(-1)[rows] | ~alive.view(-1) | (tok == eos if eos is not None else False)).view(B, M)
        constraint.advance(rows, tok, alive.view(-1), step if eos is None else None)
        backbone.reorder(step, rows)
        tokens = torch.cat([tokens[rows], tok[:, None]], dim=1)
        m = M
    # the last step's key is each beam's final score (its length then is its final length), so ``top`` is sorted
    alive = torch.isfinite(scores)
    finished = alive if eos is None else alive & (tokens == eos).any(1).view(B, M)
    if not counted:  # fixed length, no penalty: a live beam took every step (a dead one's count is not read)
        length = torch.where(alive, step + 1, 0)
    nodes = constraint.nodes.view(B, M) if isinstance(constraint, TreeConstraint | IndexConstraint) else torch.full_like(length, -1)
    return Beams(tokens.view(B, M, -1), length, torch.where(alive, top, float("-inf")), scores, finished, nodes)


def leaf_items(beams: Beams, tree: PrefixTree | IndexConstraint, k: int) -> torch.Tensor:
    """The items (B, k) of the best k beams of a tree constraint (or of an :class:`IndexConstraint`'s): an error if
    one of them is not a finished leaf."""
    top = beams.nodes[:, :k]
    value = tree.leaf_items(top) if isinstance(tree, IndexConstraint) else tree.node_value[top.clamp_min(0)]
    items = torch.where((top >= 0) & beams.finished[:, :k], value, -1)
    if (items < 0).any():
        raise RuntimeError(f"beam search ended {int((items < 0).sum())} of its top {k} beams outside the tree's leaves "
                           "(fewer live beams than k, or a tree whose items are not all of one length?)")
    return items


def leaf_search(backbone: Backbone, tree: PrefixTree | None, *, levels: int, k: int, num_beams: int,
                trained_tree: PrefixTree | None = None, constraint: TreeConstraint | IndexConstraint | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The beam over a tree of L = ``levels`` tokens + eos per item (semantic IDs): (items (B, k), scores (B, k),
    tokens (B, k, L)) of the best k beams. The eos step is skipped: after level L the tree allows only eos (log 1).
    ``constraint``: the beams' :class:`TreeConstraint` on ``tree``, when the backbone reads its nodes (it carries
    ``trained_tree`` then), or an :class:`IndexConstraint` (``tree`` None: its leaves give the items)."""
    if constraint is not None and trained_tree is not None:
        raise ValueError("pass `trained_tree` to the `constraint` it normalises, not beside it")
    on_tree = constraint or TreeConstraint(tree, backbone.B, backbone.device, trained_tree)
    beams = search(backbone, on_tree, num_beams=num_beams, steps=levels)
    leaves = on_tree if isinstance(on_tree, IndexConstraint) else tree
    return leaf_items(beams, leaves, k), beams.logp[:, :k].contiguous(), beams.tokens[:, :k].contiguous()
