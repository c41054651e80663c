"""Constrained beam search for the T5 generator (``beam``, the default T5 decoder), on :class:`T5Step`.

Stock ``model.generate`` (``generator.t5.generate``) treats every beam as its own sequence: it expands the
encoder output to B*M rows, computes and stores the cross-attention keys/values for every beam, reorders that whole
cache at every step and projects onto the full vocabulary. Here the step (``generator.t5.step``) computes
the encoder and cross-attention once per history, level l's logits over level l's block only, masked by the tree;
the one beam loop (``generator.decoding.beam.search``) picks the next beams with one ``topk`` over M x K_l
candidates per history, and only the filled positions of the per-beam self-attention cache are reordered. Equal to
``generate`` with the same M (items identical, scores to float rounding).

Shapes: B histories, S encoder tokens, M beams, L levels, K_l level l's block.
"""

from __future__ import annotations

import logging

import torch
from transformers import T5ForConditionalGeneration

from generator.decoding.beam import leaf_search
from generator.decoding.protocol import LOG_LIKELIHOOD, Histories, Ranking, check_decode_args
from generator.t5.step import T5Step, auto_batch_size
from semid.layout import TokenLayout
from semid.safe_read import is_int
from semid.tree import PrefixTree

log = logging.getLogger(__name__)


@torch.inference_mode()
def beam_search(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    *,
    k: int,
    num_beams: int,
    batch_size: int | None = None,
) -> Ranking:
    """Top-k items per history by beam search over the prefix tree, exact w.r.t. the model.

    Args:
        model: a ``T5ForConditionalGeneration`` in eval mode whose decoder starts with ``layout.bos_token_id``;
            runs on the model's device.
        input_ids: LongTensor (B, S), encoder tokens.
        attention_mask: (B, S), 1 for real tokens, 0 for padding.
        tree: the tree of every item's code tokens + eos (``PrefixTree.from_semantic_ids``); copied to the
            model's device if it is elsewhere (move it once yourself to avoid the copy per call).
        layout: the token layout the model was trained with (L = ``layout.num_levels``).
        k: items to return per history; num_beams: M >= k beams kept at every level.
        batch_size: histories decoded together; None picks it from a memory budget.
    Returns:
        Ranking: items (B, k), scores (B, k) float32 = the items' log-likelihood (the sum over levels of the code
        log-probability renormalised over the tokens the tree allows, as ``generate_beam_search``), codes
        (B, k, L); best first; every item a leaf.
    """
    _check_inputs(model, input_ids, attention_mask, tree, layout, batch_size)
    check_decode_args(k, num_beams, tree.num_sequences)
    device = model.device
    if tree.device != device:
        log.debug("copying the prefix tree to %s for this call", device)
        tree = tree.to(device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    B, S = input_ids.shape
    if B == 0:
        empty = torch.empty(0, k, dtype=torch.long, device=device)
        return Ranking(empty, empty.float(), torch.empty(0, k, layout.num_levels, dtype=torch.long, device=device), LOG_LIKELIHOOD, True)
    chunk = batch_size or auto_batch_size(model, S, num_beams, layout)
    log.debug("beam_search: %d histories in chunks of %d, %d beams", B, chunk, num_beams)
    parts = [leaf_search(T5Step(model, layout, input_ids[i : i + chunk], attention_mask[i : i + chunk]), tree,
                         levels=layout.num_levels, k=k, num_beams=num_beams) for i in range(0, B, chunk)]  # chunks of histories
    items, scores, tokens = (torch.cat(p, dim=0) for p in zip(*parts, strict=True))
    return Ranking(items, scores, layout.tokens_to_codes(tokens), LOG_LIKELIHOOD, True)


# ---- input checks (public boundary only) --------------------------------------------------------------------------
def _check_inputs(model: T5ForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  tree: PrefixTree, layout: TokenLayout, batch_size: int | None) -> None:
    if not isinstance(model, T5ForConditionalGeneration):
        raise TypeError(f"`model` must be a T5ForConditionalGeneration, got {type(model).__name__}")
    if model.training:
        raise ValueError("`model` must be in eval mode (call `model.eval()`): decoding with dropout is not exact")
    if not isinstance(tree, PrefixTree):
        raise TypeError(f"`tree` must be a PrefixTree, got {type(tree).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"`layout` must be a TokenLayout, got {type(layout).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"`input_ids` must be a LongTensor (B, S), got {_describe(input_ids)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must be a tensor of shape {tuple(input_ids.shape)}, got {_describe(attention_mask)}")
    if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}")
    V = model.get_output_embeddings().weight.shape[0]
    if layout.vocab_size > V or tree.vocab_size > V:
        raise ValueError(f"`layout` ({layout.vocab_size} tokens) and `tree` ({tree.vocab_size}) must fit the model's vocabulary of {V}")
    if tree.max_depth != layout.num_levels + 1:
        raise ValueError(f"`tree` must hold {layout.num_levels} code tokens + eos per item (depth {layout.num_levels + 1}), got depth {tree.max_depth}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(type(x).__name__)


class T5Beam:
    """``beam``: :func:`beam_search` as a :class:`~generator.decoding.protocol.Decoder` of one T5 model."""

    name, score, leaves = "beam", LOG_LIKELIHOOD, True

    def __init__(self, model: T5ForConditionalGeneration, tree: PrefixTree, layout: TokenLayout, *, num_beams: int) -> None:
        self.model, self.tree, self.layout, self.num_beams = model, tree, layout, num_beams

    def __call__(self, histories: Histories, k: int) -> Ranking:
        return beam_search(self.model, histories.tokens, histories.mask.long(), self.tree, self.layout, k=k, num_beams=self.num_beams)
