"""The processor against transformers' own prefix_allowed_tokens_fn fed from a dict trie."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList, T5Config, T5ForConditionalGeneration

from generator.decoding.protocol import LOG_LIKELIHOOD
from generator.t5.generate import generate_beam_search
from semid.ids import SemanticIDs
from semid.processor import PrefixTreeLogitsProcessor
from semid.tree import PrefixTree
from tests.reference import DictTrie


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = SemanticIDs.from_codes(rng.integers(0, 6, size=(150, 3)), [6, 6, 6], extra_level_size=6)
    layout = ids.layout(num_user_tokens=4)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    config = T5Config(
        vocab_size=layout.vocab_size, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
        pad_token_id=layout.pad_token_id, eos_token_id=layout.eos_token_id, decoder_start_token_id=layout.bos_token_id,
    )
    model = T5ForConditionalGeneration(config).eval()
    inputs = torch.randint(layout.level_offsets[0], layout.user_offset, (5, 9))
    mask = torch.ones_like(inputs)
    mask[0, :3] = 0  # one padded history
    return ids, layout, tree, model, inputs, mask


def test_processor_does_not_modify_scores_in_place(setup):
    _, layout, tree, _, _, _ = setup
    proc = PrefixTreeLogitsProcessor(tree)
    scores = torch.randn(3, layout.vocab_size)
    before = scores.clone()
    input_ids = torch.tensor([[layout.bos_token_id]] * 3)
    out = proc(input_ids, scores)
    assert torch.equal(scores, before)
    lo, hi = layout.level_range(0)
    assert torch.isfinite(out[:, lo:hi]).any() and torch.isinf(out[:, :lo]).all() and torch.isinf(out[:, hi:]).all()


def test_generate_with_processor_equals_prefix_allowed_tokens_fn(setup):
    ids, layout, tree, model, inputs, mask = setup
    L = layout.num_levels
    seqs = layout.codes_to_tokens(ids.codes).tolist()
    trie = DictTrie(seqs, ids.item_ids.tolist(), end_token=layout.eos_token_id)

    def allowed(batch_id, sent):
        prefix = sent[1:].tolist()
        if prefix and prefix[-1] in (layout.eos_token_id, layout.pad_token_id):
            return [layout.pad_token_id]
        return sorted(trie.allowed(prefix))

    common = dict(
        input_ids=inputs, attention_mask=mask, num_beams=20, num_return_sequences=20, max_new_tokens=L + 1,
        do_sample=False, length_penalty=0.0, early_stopping=True, return_dict_in_generate=True, output_scores=True,
        decoder_start_token_id=layout.bos_token_id, pad_token_id=layout.pad_token_id, eos_token_id=layout.eos_token_id,
    )
    with torch.inference_mode():
        ours = model.generate(**common, logits_processor=LogitsProcessorList([PrefixTreeLogitsProcessor(tree)]))
        theirs = model.generate(**common, prefix_allowed_tokens_fn=allowed)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)

    items = tree.lookup(ours.sequences[:, 1:]).view(inputs.shape[0], 20)
    assert (items > 0).all()  # every returned sequence is a real item
    assert all(len(set(row.tolist())) == 20 for row in items)  # distinct items per input
    assert torch.equal(items.flatten(), torch.tensor([trie.value(s[1:].tolist()) for s in ours.sequences]))


def test_generate_beam_search_returns_valid_distinct_items(setup):
    ids, layout, tree, model, inputs, mask = setup
    result = generate_beam_search(model, inputs, mask, tree, layout, k=10, num_beams=20)
    assert result.items.shape == (5, 10) and result.codes.shape == (5, 10, layout.num_levels)
    assert result.score == LOG_LIKELIHOOD and result.leaves
    assert np.array_equal(ids.items_of(result.codes.numpy()), result.items.numpy())
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()  # best first
    # renormalised over allowed tokens: with as many beams as items every item comes back, and the item
    # probabilities sum to 1 (raw log-probabilities would sum to P(some valid item) < 1)
    four = SemanticIDs.from_codes(np.array([[0, 1, 2], [0, 1, 3], [5, 0, 0], [2, 2, 2]]), [6, 6, 6], extra_level_size=6)
    assert four.layout(num_user_tokens=4) == layout  # the model's vocabulary
    everything = generate_beam_search(model, inputs, mask, PrefixTree.from_semantic_ids(four, layout), layout, k=4, num_beams=4)
    assert sorted(everything.items[0].tolist()) == [1, 2, 3, 4]
    torch.testing.assert_close(everything.scores.exp().sum(1), torch.ones(5), atol=1e-5, rtol=0)


def test_processor_argument_errors(setup):
    _, layout, tree, _, _, _ = setup
    with pytest.raises(TypeError, match="`tree` must be a PrefixTree"):
        PrefixTreeLogitsProcessor("tree")
    with pytest.raises(ValueError, match="`prefix_start` must be"):
        PrefixTreeLogitsProcessor(tree, prefix_start=-1)
    with pytest.raises(ValueError, match="fewer than the tree's vocabulary"):
        PrefixTreeLogitsProcessor(tree)(torch.tensor([[2]]), torch.zeros(1, 3))


def test_generate_beam_search_greedy_and_catalogue_size(setup):
    ids, layout, tree, model, inputs, mask = setup
    greedy = generate_beam_search(model, inputs, mask, tree, layout, k=1, num_beams=1)
    beam = generate_beam_search(model, inputs, mask, tree, layout, k=1, num_beams=2)
    assert greedy.items.shape == (5, 1) and (greedy.items > 0).all()
    assert (greedy.scores <= beam.scores + 1e-5).all()  # beam search finds at least as good an item
    # 3 items: each has a code node and an eos node carrying its id, but the catalogue is 3, not 6
    three = SemanticIDs.from_codes(np.array([[0], [1], [2]]), [6], extra_level_size=1)
    small = PrefixTree.from_semantic_ids(three, three.layout(num_user_tokens=0))
    assert small.num_sequences == 3
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 3\] \(the catalogue size\), got 4"):
        generate_beam_search(model, inputs, mask, small, three.layout(num_user_tokens=0), k=4, num_beams=4)
    with pytest.raises(ValueError, match=r"`num_beams` must be an int in \[k=2, 3\] \(k to the catalogue size\), got 4"):
        generate_beam_search(model, inputs, mask, small, three.layout(num_user_tokens=0), k=2, num_beams=4)
