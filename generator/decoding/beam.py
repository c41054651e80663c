"""One beam search for every backbone (causal, T5, title) and every constraint (prefix tree, none).

A :class:`Backbone` is bound to the states of B histories (the causal and title models' state after each history,
T5's encoder output through :class:`~generator.decoding.t5_step.T5Step`). Step by step it gives every beam's raw
next-token logits over that step's token window (level l's block for semantic IDs, the whole vocabulary for titles)
given the tokens chosen so far, and it keeps its own per-beam state (T5's self-attention cache, the title head's GRU
state) for the beams that survive a step. A constraint turns the logits into log-probabilities and follows the
beams: :class:`TreeConstraint` (``semid.tree.masked_log_softmax`` over what the prefix tree allows after each beam's
prefix) or :class:`Free` (a plain log-softmax). :func:`search` is the one loop, over steps only: candidates = beam
scores + log-probabilities, one ``topk`` over M x K per history, the parents gathered; nothing loops over beams.

With ``eos`` (titles) a beam that emitted eos is finished: it stays in the pool with its score and its only
continuation is ``pad`` (log 1 = 0: the tree's pad self-loop on leaves), so finished and live beams compete for the M
slots, ranked by ``score / length ** length_penalty`` (length in tokens, eos included); the loop ends when every beam
has finished. Without ``eos`` (semantic IDs) every beam takes exactly ``steps`` tokens.

Rows are history-major: row b * m + j is beam j of history b (m = 1 before the first step, M after).
Shapes: B histories, M beams, K a step's token window, T steps taken.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from semid.tree import PrefixTree, masked_log_softmax


class Backbone(Protocol):
    """A model's next-token logits for the beams of B histories (see the module docstring)."""

    B: int
    device: torch.device

    def window(self, step: int) -> tuple[int, int]:
        """The token window (lo, hi) of step ``step``."""

    def logits(self, step: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        """FloatTensor (B*m, hi - lo): every beam's logits after ``prefix`` LongTensor (B*m, step), its tokens so far;
        ``done`` BoolTensor (B*m,) (with eos) marks finished beams, whose rows are not read."""

    def reorder(self, step: int, rows: torch.Tensor) -> None:
        """Keep the per-beam state of rows LongTensor (B*M,) (each surviving beam's parent) after step ``step``."""


class TreeConstraint:
    """Beams on a prefix tree: each beam's node (-1: dead, allows nothing).

    With ``trained_tree`` (the tree of the items the model was trained with, when items were added since) each node's
    log-probabilities are normalised over its trained children where it has any, as exact scoring does.
    """

    def __init__(self, tree: PrefixTree, rows: int, device: torch.device, trained_tree: PrefixTree | None = None) -> None:
        self.tree, self.trained_tree = tree, trained_tree
        self.nodes = torch.zeros(rows, dtype=torch.long, device=device)  # (R,) tree node of each beam
        self.old_nodes = self.nodes.clone()  # the same prefixes in trained_tree (-1 where only added items lead)

    def logp(self, logits: torch.Tensor, lo: int, hi: int, done: torch.Tensor | None = None) -> torch.Tensor:
        allowed = self.tree.allowed_mask(self.nodes if done is None else torch.where(done, -1, self.nodes), token_range=(lo, hi))
        if self.trained_tree is None:
            return masked_log_softmax(logits, allowed)
        norm = self.trained_tree.allowed_mask(self.old_nodes, token_range=(lo, hi))
        return masked_log_softmax(logits, allowed, torch.where(norm.any(1, keepdim=True), norm, allowed))

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        self.nodes = torch.where(alive, self.tree.next_nodes(self.nodes[rows], tokens), -1)
        if self.trained_tree is not None:
            self.old_nodes = self.trained_tree.next_nodes(self.old_nodes[rows], tokens)

    def items(self, B: int, k: int) -> torch.Tensor:
        """The items (B, k) of the best k beams (every beam a path of a fixed-length tree); an error if one is not."""
        top = self.nodes.view(B, -1)[:, :k]
        items = torch.where(top >= 0, self.tree.node_value[top.clamp_min(0)], -1)
        if (items < 0).any():
            raise RuntimeError("beam search kept a path outside the prefix tree among the top k: the tree is not fixed-length")
        return items


class Free:
    """No tree: each step's log-softmax over its whole window, ``pad`` excluded when given (free generation)."""

    def __init__(self, pad: int | None = None) -> None:
        self.pad = pad

    def logp(self, logits: torch.Tensor, lo: int, hi: int, done: torch.Tensor | None = None) -> torch.Tensor:
        if self.pad is not None:
            logits = logits.index_fill(1, torch.tensor([self.pad - lo], device=logits.device), float("-inf"))
        return logits.log_softmax(-1)

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        pass


class Beams(NamedTuple):
    """All M beams of each history, in ``topk`` order of the last step's ranking key.

    tokens: LongTensor (B, M, T) chosen tokens (with eos: eos included, pad after); logp: (B, M) the sum of their
    log-probabilities (-inf: a dead beam); lengths: LongTensor (B, M) tokens up to and including eos (T without eos).
    """

    tokens: torch.Tensor
    logp: torch.Tensor
    lengths: torch.Tensor


def search(backbone: Backbone, constraint: TreeConstraint | Free, *, num_beams: int, steps: int, eos: int | None = None,
           pad: int | None = None, length_penalty: float = 0.0) -> Beams:
    """Beam search of ``num_beams`` beams per history over at most ``steps`` steps (see the module docstring)."""
    assert steps >= 1 and (eos is None) == (pad is None), f"steps {steps}, eos {eos}, pad {pad}"
    B, M, device = backbone.B, num_beams, backbone.device
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)  # (B*m, t) the tokens chosen so far
    length = finished = None  # (B, m) lengths and finished beams, with eos
    if eos is not None:
        length = torch.zeros(B, 1, dtype=torch.long, device=device)
        finished = torch.zeros(B, 1, dtype=torch.bool, device=device)
    m = 1
    for step in range(steps):  # the only loop: over steps
        if finished is not None and bool(finished.all()):
            break
        lo, hi = backbone.window(step)
        K = hi - lo
        done = None if finished is None else finished.view(-1)  # (B*m,)
        logp = constraint.logp(backbone.logits(step, tokens, m, done), lo, hi, done)  # (B*m, K)
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
        rows = (torch.arange(B, device=idx.device)[:, None] * m + parent).view(-1)  # (B*M,) each beam's parent row
        if eos is not None:
            length = length.gather(1, parent) + (~finished).gather(1, parent).long()
            finished = (finished.view(-1)[rows] | (tok == eos) | ~alive.view(-1)).view(B, M)
        constraint.advance(rows, tok, alive.view(-1))
        backbone.reorder(step, rows)
        tokens = torch.cat([tokens[rows], tok[:, None]], dim=1)
        m = M
    T = tokens.shape[1]
    lengths = length if length is not None else torch.full((B, M), T, dtype=torch.long, device=tokens.device)
    return Beams(tokens.view(B, M, T), scores, lengths)
