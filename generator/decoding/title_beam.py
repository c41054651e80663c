"""Beam search over titles: constrained by the title tree (GENRE) or free (the first step of BIGRec).

The one beam loop (``generator.decoding.beam.search``, with eos) over title positions, on the title head
(:class:`TitleSteps`); everything inside is batched over users x beams (no loop over beams):

- every live beam's next-token logits come from one GRU step of the title head (``TitleGenerator.step``);
- constrained: masked by ``PrefixTree.allowed_mask`` of each beam's node and log-softmaxed over the allowed tokens
  only, so a title's score is its log-probability among the catalogue's titles; free: log-softmax over the whole
  vocabulary (pad excluded);
- a beam that emitted eos is finished: it stays in the pool with its score (its only continuation is pad, log 1 =
  0: the tree's pad self-loop on leaves), so finished and live beams compete for the M slots;
- one ``topk`` over M x V picks the next beams by ``score / length ** length_penalty`` (length in tokens, eos
  included; ``length_penalty`` 0 is the plain sum of log-probabilities, D3's choice).

Constrained, every finished beam is a leaf of the tree, so one item; beams are distinct paths, so the items are
distinct. Free, a finished beam is any token sequence: whether it is a title of the catalogue is looked up in the
tree afterwards.

Shapes: B histories, M beams, V title vocabulary, J title positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from generator.decoding.beam import Free, TreeConstraint, search
from generator.models.titles import TitleGenerator
from semid.tree import PrefixTree


class TitleBeams(NamedTuple):
    """All M beams of each history, best first by the ranking score.

    tokens: LongTensor (B, M, J) generated tokens (eos included, pad after); lengths: (B, M) tokens up to and
    including eos; scores: (B, M) ``logp / length ** length_penalty`` (-inf for a dead beam); logp: (B, M) the
    sum of log-probabilities; finished: (B, M) bool, eos emitted; nodes: (B, M) the tree node reached (-1: not in
    the tree, or no tree).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    logp: torch.Tensor
    finished: torch.Tensor
    nodes: torch.Tensor


class TitleSteps:
    """The title head as a :class:`~generator.decoding.beam.Backbone`: one GRU step (``TitleGenerator.step``) of the
    unfinished beams per title position, over the whole vocabulary; a finished beam's row is zeros (never read)."""

    def __init__(self, model: TitleGenerator, h: torch.Tensor) -> None:
        self.model, self.B, self.device, self.V = model, h.shape[0], h.device, model.config.vocab_size
        self.state, self.cond = model.title_start(h)  # (B*m, E) each
        self.new_state = self.state

    def window(self, step: int) -> tuple[int, int]:
        return 0, self.V

    def logits(self, step: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        live = torch.nonzero(~done).squeeze(1)  # only unfinished beams take a step (most are finished late on)
        out, state = self.model.step(None if step == 0 else prefix[live, -1], self.state[live], self.cond[live])
        self.new_state = self.state.index_copy(0, live, state)
        return out.new_zeros(done.shape[0], self.V).index_copy(0, live, out)  # (B*m, V)

    def reorder(self, step: int, rows: torch.Tensor) -> None:
        self.state, self.cond = self.new_state[rows], self.cond[rows]


def title_beam_search(model: TitleGenerator, h: torch.Tensor, *, num_beams: int, tree: PrefixTree | None = None,
                      length_penalty: float = 0.0, max_steps: int | None = None) -> TitleBeams:
    """Beam search from backbone states h (B, D); constrained by ``tree`` (None: free generation).

    Args:
        max_steps: title positions at most (eos included); default the tree's depth, or the longest training
            title + 1 when free. A free beam cut by it is returned unfinished.
    """
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int, got {num_beams!r}")
    if length_penalty < 0:
        raise ValueError(f"`length_penalty` must be >= 0, got {length_penalty!r}")
    cfg = model.config
    V, pad, eos = cfg.vocab_size, cfg.pad_id, cfg.eos_id
    if tree is not None and tree.vocab_size != V:
        raise ValueError(f"the title tree has vocabulary {tree.vocab_size}, the model {V}: built for another tokenizer")
    if max_steps is None:
        max_steps = tree.max_depth if tree is not None else int(model.title_lengths.max())
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    B, M = h.shape[0], num_beams
    on_tree = Free(pad) if tree is None else TreeConstraint(tree, B, h.device)
    beams = search(TitleSteps(model, h), on_tree, num_beams=M, steps=max_steps, eos=eos, pad=pad, length_penalty=length_penalty)
    nodes = on_tree.nodes if tree is not None else torch.full((B * M,), -1, dtype=torch.long, device=h.device)
    logp_sum, length = beams.logp, beams.lengths
    alive = torch.isfinite(logp_sum)
    scores = logp_sum / length.clamp_min(1).to(logp_sum.dtype).pow(length_penalty) if length_penalty else logp_sum.clone()
    scores = torch.where(alive, scores, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)  # the pool was picked by key; rank it by score
    take = lambda x: x.gather(1, order)  # noqa: E731
    toks = beams.tokens.gather(1, order[:, :, None].expand(-1, -1, beams.tokens.shape[2]))
    return TitleBeams(toks, take(length), take(scores), take(logp_sum), take((beams.tokens == eos).any(2) & alive),
                      take(nodes.view(B, M)))


def beam_items(beams: TitleBeams, tree: PrefixTree, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(items (B, k), scores (B, k)) of a constrained search's top k; an error if any of them is not an item."""
    top = beams.nodes[:, :k]
    finished = beams.finished[:, :k]
    items = torch.where((top >= 0) & finished, tree.node_value[top.clamp_min(0)], -1)
    if (items < 0).any():
        raise RuntimeError(
            f"constrained title beam search ended {int((items < 0).sum())} of its top {k} beams outside the title tree's "
            "leaves (fewer live beams than k?): raise `num_beams` or check the tree"
        )
    return items, beams.scores[:, :k]


def lookup_generated(beams: TitleBeams, tree: PrefixTree) -> torch.Tensor:
    """The item each beam's tokens name (a complete path of the title tree, eos included), else -1: (B, M)."""
    B, M, J = beams.tokens.shape
    nodes = tree.walk(beams.tokens.view(B * M, J)).view(B, M)  # pads after eos loop on the leaf
    items = torch.where(nodes >= 0, tree.node_value[nodes.clamp_min(0)], -1)
    return torch.where(beams.finished, items, -1)
