"""Top-k items by constrained beam search with stock ``model.generate`` (the reference decoder).

Scores are the sum over code levels of the code's log-probability *renormalised over the tokens the prefix tree
allows* (``renormalize_logits=True``): a proper distribution over valid items, and the quantity the fast beam
search in ``generator.decoding.t5_beam`` computes exactly. The eos step then contributes log 1 = 0.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from semid.layout import TokenLayout
from semid.processor import PrefixTreeLogitsProcessor
from semid.tree import PrefixTree

log = logging.getLogger(__name__)


class BeamResult(NamedTuple):
    """Top-k items per input, best first.

    items:  LongTensor (B, k), item ids (never invalid: every one is a leaf of the prefix tree).
    scores: FloatTensor (B, k), sum of renormalised code log-probabilities.
    codes:  LongTensor (B, k, L), the generated code tuples.
    """

    items: torch.Tensor
    scores: torch.Tensor
    codes: torch.Tensor


def check_beam_args(k: int, num_beams: int, num_items: int) -> None:
    """Validate decoding arguments (shared by every decoder)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int, got {num_beams!r}")
    if k > num_items:
        raise ValueError(f"`k` must be at most the catalogue size ({num_items} items), got {k}")
    if num_beams < k:
        raise ValueError(f"`num_beams` must be >= k to return k items, got num_beams={num_beams}, k={k}")
    if num_beams > num_items:
        raise ValueError(f"`num_beams` must be at most the catalogue size ({num_items} items), got {num_beams}")


@torch.inference_mode()
def generate_topk(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    *,
    k: int,
    num_beams: int,
) -> BeamResult:
    """Constrained beam search through ``model.generate`` and :class:`PrefixTreeLogitsProcessor`.

    Args:
        model: an encoder-decoder whose decoder starts with ``layout.bos_token_id``.
        input_ids: LongTensor (B, S) encoder tokens; attention_mask: (B, S), 1 for real tokens.
        tree: the tree of every item's code tokens + eos (``PrefixTree.from_semantic_ids``).
        k: items to return per input; num_beams: M >= k.
    """
    check_beam_args(k, num_beams, tree.num_sequences)
    L = layout.num_levels
    B = input_ids.shape[0]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_beams=num_beams,
        num_return_sequences=k,
        max_new_tokens=L + 1,
        min_new_tokens=0,
        do_sample=False,
        early_stopping=True,
        length_penalty=0.0,
        renormalize_logits=True,
        logits_processor=LogitsProcessorList([PrefixTreeLogitsProcessor(tree, prefix_start=1)]),
        decoder_start_token_id=layout.bos_token_id,
        pad_token_id=layout.pad_token_id,
        eos_token_id=layout.eos_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    sequences = out.sequences[:, 1 : L + 1]  # (B*k, L) code tokens, decoder start dropped
    items = tree.lookup(out.sequences[:, 1:])
    assert (items >= 0).all(), "constrained generate returned a sequence outside the prefix tree"
    codes = layout.tokens_to_codes(sequences)
    if num_beams == 1:  # generate takes its greedy path: no sequences_scores, sum the chosen tokens' scores
        steps = torch.stack(out.scores, dim=1)  # (B, T, V), renormalised and masked
        chosen = steps.gather(2, out.sequences[:, 1 : 1 + steps.shape[1], None]).squeeze(2)  # (B, T)
        scores = torch.where(torch.isfinite(chosen), chosen, 0.0).sum(1)  # pads after eos are -inf: not part of the item
    else:
        scores = out.sequences_scores
    return BeamResult(items.view(B, k), scores.view(B, k).float(), codes.view(B, k, L))


# ---- choosing a decoder ------------------------------------------------------------------------------------------
DECODERS = ("auto", "beam", "generate")


def get_decoder(name: str) -> Callable[..., BeamResult]:
    """The top-k function for ``name``; every one has the signature and return of :func:`generate_topk`.

    ``"generate"`` is :func:`generate_topk` (stock ``model.generate``); ``"beam"`` is ``generator.decoding.t5_beam.fast_topk``
    (the fast constrained beam search), an error where that module is not installed; ``"auto"`` is ``"beam"`` where
    available, else ``"generate"`` (the choice is logged).
    """
    if name not in DECODERS:
        raise ValueError(f"`decoder` must be one of {list(DECODERS)}, got {name!r}")
    if name == "generate":
        return generate_topk
    try:
        beam = importlib.import_module("generator.decoding.t5_beam")
    except ModuleNotFoundError as e:
        if e.name != "generator.decoding.t5_beam":
            raise  # generator.decoding.t5_beam exists but one of its own imports is missing: show that
        if name == "beam":
            raise ValueError(
                "`decoder='beam'` needs generator.decoding.t5_beam.fast_topk, which this installation does not have; "
                "use decoder='generate'"
            ) from None
        log.warning("decoder 'auto': generator.decoding.t5_beam is not installed, falling back to model.generate (much slower)")
        return generate_topk
    fast_topk = beam.fast_topk  # an AttributeError here is a broken generator.decoding.t5_beam: show it, do not fall back
    log.debug("decoder %r: generator.decoding.t5_beam.fast_topk", name)
    return fast_topk
