"""``generate``: top-k items by constrained beam search with stock ``model.generate`` (the reference decoder).

Scores are the sum over code levels of the code's log-probability *renormalised over the tokens the prefix tree
allows* (``renormalize_logits=True``): a proper distribution over valid items, and the quantity the fast beam
search in ``generator.t5.beam`` computes exactly. The eos step then contributes log 1 = 0.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, PreTrainedModel

from generator.decoding.protocol import LOG_LIKELIHOOD, Histories, Ranking, check_decode_args
from semid.layout import TokenLayout
from semid.processor import PrefixTreeLogitsProcessor
from semid.tree import PrefixTree


@torch.inference_mode()
def generate_beam_search(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    *,
    k: int,
    num_beams: int,
) -> Ranking:
    """Constrained beam search through ``model.generate`` and :class:`PrefixTreeLogitsProcessor`.

    Args:
        model: an encoder-decoder whose decoder starts with ``layout.bos_token_id``.
        input_ids: LongTensor (B, S) encoder tokens; attention_mask: (B, S), 1 for real tokens.
        tree: the tree of every item's code tokens + eos (``PrefixTree.from_semantic_ids``).
        k: items to return per input; num_beams: M >= k.
    """
    check_decode_args(k, num_beams, tree.num_sequences)
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
    return Ranking(items.view(B, k), scores.view(B, k).float(), codes.view(B, k, L), LOG_LIKELIHOOD, True)


class T5Generate:
    """``generate``: :func:`generate_beam_search` as a :class:`~generator.decoding.protocol.Decoder` of one T5 model."""

    name, score, leaves = "generate", LOG_LIKELIHOOD, True

    def __init__(self, model: PreTrainedModel, tree: PrefixTree, layout: TokenLayout, *, num_beams: int) -> None:
        self.model, self.tree, self.layout, self.num_beams = model, tree, layout, num_beams

    def __call__(self, histories: Histories, k: int) -> Ranking:
        return generate_beam_search(self.model, histories.tokens, histories.mask.long(), self.tree, self.layout, k=k,
                                    num_beams=self.num_beams)
