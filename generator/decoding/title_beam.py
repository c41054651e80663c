"""Beam search over titles: constrained by the title tree (GENRE) or free (the first step of BIGRec).

One loop over title positions; everything inside is batched over users x beams (no loop over beams):

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

from generator.models.causal_loss import masked_log_softmax
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
    B, M, device = h.shape[0], num_beams, h.device
    state, cond = model.title_start(h)  # (B, E) each
    nodes = torch.zeros(B, dtype=torch.long, device=device) if tree is not None else torch.full((B,), -1, device=device)
    logp_sum = torch.zeros(B, 1, dtype=h.dtype, device=device)  # (B, m)
    length = torch.zeros(B, 1, dtype=torch.long, device=device)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=device)
    tokens = torch.empty(B, 0, dtype=torch.long, device=device)  # (B*m, t)
    prev: torch.Tensor | None = None
    pad_only = torch.full((V,), float("-inf"), dtype=h.dtype, device=device)
    pad_only[pad] = 0.0
    m = 1
    for _ in range(max_steps):  # the only loop: over title positions
        if bool(finished.all()):
            break
        done = finished.view(-1)  # (B*m,)
        live = torch.nonzero(~done).squeeze(1)  # only unfinished beams take a step (most are finished late on)
        step_logits, step_state = model.step(None if prev is None else prev[live], state[live], cond[live])
        logits = step_logits.new_zeros(done.shape[0], V).index_copy(0, live, step_logits)  # (B*m, V)
        new_state = state.index_copy(0, live, step_state)
        if tree is not None:
            allowed = tree.allowed_mask(torch.where(done, -1, nodes))  # finished beams' nodes are leaves: skip them
            logp = masked_log_softmax(logits, allowed)
        else:
            logp = logits.index_fill(1, torch.tensor([pad], device=device), float("-inf")).log_softmax(-1)
        logp = torch.where(done[:, None], pad_only, logp)  # a finished beam's only continuation: pad, log 1 = 0
        cand = logp_sum[:, :, None] + logp.view(B, m, V)  # (B, m, V)
        new_len = (length + (~finished).long())[:, :, None].expand(B, m, V)
        key = cand / new_len.to(cand.dtype).pow(length_penalty) if length_penalty else cand
        key = key.reshape(B, m * V)
        if m * V < M:
            key = torch.nn.functional.pad(key, (0, M - m * V), value=float("-inf"))
        top, idx = key.topk(M, dim=1)  # (B, M)
        idx = idx.clamp_max(m * V - 1)
        parent, tok = idx // V, idx % V
        logp_sum = cand.reshape(B, m * V).gather(1, idx)
        length = length.gather(1, parent) + (~finished).gather(1, parent).long()
        rows = (torch.arange(B, device=device)[:, None] * m + parent).view(-1)  # (B*M,)
        alive = torch.isfinite(top).view(-1)
        tok = tok.view(-1)
        finished = (finished.view(-1)[rows] | (tok == eos) | ~alive).view(B, M)
        logp_sum = torch.where(alive.view(B, M), logp_sum, float("-inf"))
        if tree is not None:
            nodes = torch.where(alive, tree.next_nodes(nodes[rows], tok), -1)
        tokens = torch.cat([tokens[rows], tok[:, None]], dim=1)
        state, cond, prev = new_state[rows], cond[rows], tok
        m = M
    if m == 1:  # no step ran (max_steps 0): one empty beam per history, padded to M
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    if tree is None:
        nodes = torch.full((B * M,), -1, dtype=torch.long, device=device)
    ended = tokens == eos
    finished_eos = ended.any(1).view(B, M)
    alive = torch.isfinite(logp_sum)
    scores = logp_sum / length.clamp_min(1).to(logp_sum.dtype).pow(length_penalty) if length_penalty else logp_sum.clone()
    scores = torch.where(alive, scores, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)  # the pool was picked by key; rank it by score
    take = lambda x: x.gather(1, order)  # noqa: E731
    toks = tokens.view(B, M, -1).gather(1, order[:, :, None].expand(-1, -1, tokens.shape[1]))
    return TitleBeams(toks, take(length), take(scores), take(logp_sum), take(finished_eos & alive),
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
