"""PrefixTreeLogitsProcessor: keeps transformers' beam search on the prefix tree.

For stock ``model.generate(num_beams=..., logits_processor=[PrefixTreeLogitsProcessor(tree)])``. Each call walks
every row's generated prefix down the tree (a gather per generated token, vectorised over all beams) and sets
every token the tree does not allow next to -inf. There is no Python loop over beams and no user callback, unlike
transformers' ``PrefixConstrainedLogitsProcessor``.

:func:`masked_log_softmax` is the one masked log-softmax of the code loss and of semid's own beam searches.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from semid.safe_read import is_int
from semid.tree import PrefixTree


class PrefixTreeLogitsProcessor(LogitsProcessor):
    """Mask scores to the continuations the tree allows.

    Args:
        tree: the compiled prefix tree; moved to the scores' device on first use.
        prefix_start: how many leading tokens of ``input_ids`` are not part of the tree's sequences (1 for an
            encoder-decoder, whose decoder input starts with the decoder start token).

    Rows whose prefix is not in the tree allow nothing (all -inf). Beam search only reaches such rows with beams
    whose score is already -inf (when fewer valid continuations exist than beams), so they never win.
    """

    def __init__(self, tree: PrefixTree, prefix_start: int = 1) -> None:
        if not isinstance(tree, PrefixTree):
            raise TypeError(f"`tree` must be a PrefixTree, got {type(tree).__name__}")
        if not is_int(prefix_start) or prefix_start < 0:
            raise ValueError(f"`prefix_start` must be a non-negative int, got {prefix_start!r}")
        self.tree = tree
        self.prefix_start = int(prefix_start)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """
        Args:
            input_ids: LongTensor (B*M, t), the decoder tokens so far.
            scores: FloatTensor (B*M, V') with V' >= the tree's V (a model may pad its vocabulary).
        Returns:
            FloatTensor (B*M, V'): a new tensor, -inf where the tree does not allow the token.
        """
        if scores.shape[-1] < self.tree.vocab_size:
            raise ValueError(f"`scores` has {scores.shape[-1]} columns, fewer than the tree's vocabulary of {self.tree.vocab_size}")
        if self.tree.device != scores.device:
            self.tree = self.tree.to(scores.device)
        nodes = self.tree.walk(input_ids[:, self.prefix_start :])
        allowed = self.tree.allowed_mask(nodes)
        if scores.shape[-1] > allowed.shape[-1]:  # tokens beyond the tree's vocabulary are never allowed
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - allowed.shape[-1]), value=False)
        return scores.masked_fill(~allowed, float("-inf"))


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Log-softmax over the last dimension normalised over ``norm`` (default: ``allowed``), -inf where not allowed.

    The one masked log-softmax of the code loss, the beam searches and teacher forcing. logits: (..., K) float;
    allowed, norm: BoolTensor (..., K). A row that allows nothing is all -inf. With ``norm`` (a node's trained
    children, where items were added since) an allowed entry outside it may score above 1 in total, as intended; a
    row whose ``norm`` is empty (every child added since) is normalised over ``allowed``.
    """
    if norm is not None:  # (an empty normaliser gave +inf to every allowed entry)
        norm = torch.where(norm.any(-1, keepdim=True), norm, allowed)
    if norm is None:
        out = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min).log_softmax(-1)
    else:
        out = logits - logits.masked_fill(~norm, float("-inf")).logsumexp(-1, keepdim=True)
    return out.masked_fill(~allowed, float("-inf"))
