"""beam_search against stock generate (generate_beam_search) and against brute-force scoring of every item.

The brute-force reference reads the allowed tokens from a plain dict trie (tests/reference.py), not from
``PrefixTree``: beam search and generate both mask with ``PrefixTree.allowed_mask``, so a tree bug shows here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, T5Config, T5ForConditionalGeneration

from generator.decoding.protocol import LOG_LIKELIHOOD, Decoder, Histories
from generator.t5 import beam as t5_beam
from generator.t5 import step as t5_step
from generator.t5.beam import T5Beam, beam_search
from generator.t5.generate import T5Generate, generate_beam_search
from generator.t5.step import T5Step
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.processor import PrefixTreeLogitsProcessor
from semid.tree import PrefixTree
from tests.reference import DictTrie

HEADS = ("tied", "unscaled", "separate")  # T5 rescale on / off; "separate": an lm_head with its own weights


def make_ids(num_levels: int, num_items: int, seed: int) -> SemanticIDs:
    """Few items on small codebooks: level 0 has 3 codes, fewer than 5 or 20 beams."""
    rng = np.random.default_rng(seed)
    sizes = (3, 4, 4)[: num_levels - 1]
    codes = rng.integers(0, sizes, size=(num_items, len(sizes)))
    return SemanticIDs.from_codes(codes, sizes, extra_level_size=num_items)


def make_model(layout: TokenLayout, head: str, seed: int = 0, decoder_layers: int = 2) -> T5ForConditionalGeneration:
    """A tiny random T5. generate needs as many decoder as encoder layers (its cache is sized by the encoder's)."""
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=layout.vocab_size + 3,  # a padded vocabulary: tokens beyond the layout's are never allowed
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=decoder_layers,
        dropout_rate=0.1,  # must be off in eval mode
        tie_word_embeddings=head == "tied",
        decoder_start_token_id=layout.bos_token_id,
    )
    model = T5ForConditionalGeneration(cfg)
    if head == "separate":
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
    return model.eval()


def make_batch(layout: TokenLayout, B: int, S: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories of code tokens with padding at the end of some rows."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = layout.level_range(0)[0], layout.user_offset + layout.num_user_tokens
    input_ids = torch.randint(lo, hi, (B, S), generator=g)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    attention_mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    return input_ids.masked_fill(attention_mask == 0, layout.pad_token_id), attention_mask


def greedy_reference(model, input_ids, attention_mask, tree, layout):
    """num_beams = 1: generate takes its greedy path (no sequences_scores), so score the steps here."""
    L = layout.num_levels
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_beams=1,
        do_sample=False,
        max_new_tokens=L + 1,
        renormalize_logits=True,
        logits_processor=LogitsProcessorList([PrefixTreeLogitsProcessor(tree)]),
        decoder_start_token_id=layout.bos_token_id,
        pad_token_id=layout.pad_token_id,
        eos_token_id=layout.eos_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    seq = out.sequences[:, 1:]
    step = torch.stack([out.scores[t].gather(1, seq[:, t : t + 1])[:, 0] for t in range(L)], dim=1)
    return tree.lookup(seq)[:, None], step.sum(1, keepdim=True), layout.tokens_to_codes(seq[:, :L])[:, None]


def dict_trie(ids: SemanticIDs, layout: TokenLayout) -> DictTrie:
    """The items' code tokens + eos in a plain dict trie (the reference's tree; no PrefixTree)."""
    tokens = np.asarray(layout.codes_to_tokens(ids.codes)).tolist()
    return DictTrie(tokens, ids.item_ids.tolist(), end_token=layout.eos_token_id)


def brute_force_scores(model, input_ids, attention_mask, layout, ids):
    """Exact score of every item for every history, from model.forward with teacher forcing: (B, N).

    Level l's log-softmax is renormalised over the tokens the dict trie allows after the item's first l tokens.
    """
    B, N, L, V = input_ids.shape[0], ids.num_items, layout.num_levels, model.config.vocab_size
    trie = dict_trie(ids, layout)
    tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes)))  # (N, L)
    dec_in = torch.cat([torch.full((N, 1), layout.bos_token_id), tokens[:, :-1]], dim=1)  # (N, L)
    allowed = torch.zeros(N, L, V, dtype=torch.bool)
    for n, seq in enumerate(tokens.tolist()):  # loop over items (a few dozen)
        for level in range(L):
            allowed[n, level, sorted(trie.allowed(seq[:level]))] = True
    out = torch.empty(B, N)
    with torch.no_grad():
        for b in range(B):
            logits = model(
                input_ids=input_ids[b].expand(N, -1),
                attention_mask=attention_mask[b].expand(N, -1),
                decoder_input_ids=dec_in,
                use_cache=False,
            ).logits  # (N, L, V), the whole (padded) vocabulary
            logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            out[b] = logp.gather(2, tokens[:, :, None])[..., 0].sum(1)
    return out, torch.as_tensor(ids.item_ids)


def assert_valid_distinct(result, trie: DictTrie, layout, k):
    """Shapes, codes that spell the items (read from the dict trie), distinct items, best first."""
    B = result.items.shape[0]
    assert result.items.shape == (B, k) and result.scores.shape == (B, k)
    assert result.codes.shape == (B, k, layout.num_levels)
    assert result.score == LOG_LIKELIHOOD and result.leaves
    tokens = layout.codes_to_tokens(result.codes).view(B * k, -1).tolist()
    spelled = torch.tensor([trie.value([*t, layout.eos_token_id]) for t in tokens]).view(B, k)
    assert torch.equal(spelled, result.items), "codes do not spell the items"
    assert (result.items >= 0).all()
    assert (result.items.sort(dim=1).values.diff(dim=1) != 0).all(), "an item is returned twice for one history"
    assert (result.scores.diff(dim=1) <= 0).all(), "not best first"


@pytest.mark.parametrize("num_levels", [2, 4])
@pytest.mark.parametrize("num_beams", [1, 5, 20])
@pytest.mark.parametrize("head", HEADS)
def test_matches_generate(num_levels, num_beams, head):
    ids = make_ids(num_levels, num_items=24, seed=num_levels)
    layout = ids.layout(num_user_tokens=5)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, head)
    input_ids, attention_mask = make_batch(layout, B=5, S=7, seed=num_beams)
    before = input_ids.clone()
    trie = dict_trie(ids, layout)
    for k in sorted({1, min(3, num_beams), num_beams}):
        got = beam_search(model, input_ids, attention_mask, tree, layout, k=k, num_beams=num_beams)
        if num_beams == 1:
            items, scores, codes = greedy_reference(model, input_ids, attention_mask, tree, layout)
        else:
            items, scores, codes, *_ = generate_beam_search(model, input_ids, attention_mask, tree, layout, k=k, num_beams=num_beams)
        assert torch.equal(got.items, items), f"k={k}"
        assert torch.equal(got.codes, codes)
        torch.testing.assert_close(got.scores, scores, atol=1e-4, rtol=0)
        assert_valid_distinct(got, trie, layout, k)
    assert torch.equal(input_ids, before), "inputs changed in place"


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    num_levels=st.sampled_from([2, 3, 4]),
    num_items=st.integers(1, 30),
    seed=st.integers(0, 2**16),
    head=st.sampled_from(HEADS),
)
def test_all_beams_is_exact_top_k(num_levels, num_items, seed, head):
    """With as many beams as items beam search prunes nothing: its top k is the brute-force top k."""
    ids = make_ids(num_levels, num_items, seed)
    layout = ids.layout(num_user_tokens=3)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, head, seed=seed, decoder_layers=3)
    input_ids, attention_mask = make_batch(layout, B=3, S=5, seed=seed)
    k = min(num_items, 4)
    got = beam_search(model, input_ids, attention_mask, tree, layout, k=k, num_beams=num_items)
    scores, item_ids = brute_force_scores(model, input_ids, attention_mask, layout, ids)
    best, order = scores.topk(k, dim=1)
    assert torch.equal(got.items, item_ids[order])
    torch.testing.assert_close(got.scores, best, atol=1e-4, rtol=0)
    assert_valid_distinct(got, dict_trie(ids, layout), layout, k)


@pytest.mark.parametrize("k", [1, 5, 10])
def test_fewer_candidates_than_beams_at_the_first_levels_is_still_exact(k):
    """Level 0 has 2 codes, fewer than the 10 beams: the search pads its candidates with dead ones (8 dead beams
    carried into level 1), and with as many beams as items it still returns the brute-force top k (and what generate
    returns). The tree is uneven (code 1 at level 0 has one child, collision groups of 1 to 4), so the masks matter."""
    codes = np.array([[0, 0]] * 3 + [[0, 1]] * 2 + [[0, 2]] + [[1, 0]] * 4)  # (10, 2)
    ids = SemanticIDs.from_codes(codes, (2, 3), extra_level_size=4)
    layout = ids.layout(num_user_tokens=3)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied", seed=5)
    input_ids, attention_mask = make_batch(layout, B=3, S=5, seed=5)
    got = beam_search(model, input_ids, attention_mask, tree, layout, k=k, num_beams=10)
    scores, item_ids = brute_force_scores(model, input_ids, attention_mask, layout, ids)
    best, order = scores.topk(k, dim=1)
    assert torch.equal(got.items, item_ids[order])
    torch.testing.assert_close(got.scores, best, atol=1e-4, rtol=0)
    assert_valid_distinct(got, dict_trie(ids, layout), layout, k)
    ref = generate_beam_search(model, input_ids, attention_mask, tree, layout, k=k, num_beams=10)
    assert torch.equal(got.items, ref.items) and torch.equal(got.codes, ref.codes)
    if k == 10:  # every item comes back, and their probabilities sum to 1
        torch.testing.assert_close(got.scores.exp().sum(1), torch.ones(3), atol=1e-5, rtol=0)


def test_chunks_give_the_same_result():
    ids = make_ids(4, num_items=24, seed=1)
    layout = ids.layout(num_user_tokens=5)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied")
    input_ids, attention_mask = make_batch(layout, B=7, S=6, seed=3)
    whole = beam_search(model, input_ids, attention_mask, tree, layout, k=4, num_beams=6)
    for batch_size in (1, 3):
        part = beam_search(model, input_ids, attention_mask, tree, layout, k=4, num_beams=6, batch_size=batch_size)
        assert torch.equal(part.items, whole.items) and torch.equal(part.codes, whole.codes)
        torch.testing.assert_close(part.scores, whole.scores, atol=1e-5, rtol=0)
    empty = beam_search(model, input_ids[:0], attention_mask[:0], tree, layout, k=4, num_beams=6)
    assert empty.items.shape == (0, 4) and empty.codes.shape == (0, 4, 4)


def test_the_memory_budget_sets_the_chunks(monkeypatch):
    """batch_size=None: chunks follow the memory budget; a budget below one history still decodes one history per
    chunk, and no chunk exceeds MAX_BATCH_SIZE; the result never changes."""
    ids = make_ids(4, num_items=24, seed=1)
    layout = ids.layout(num_user_tokens=5)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied")
    input_ids, attention_mask = make_batch(layout, B=7, S=6, seed=3)
    whole = beam_search(model, input_ids, attention_mask, tree, layout, k=4, num_beams=6, batch_size=7)
    chunks: list[int] = []

    class CountingStep(T5Step):
        def __init__(self, model, layout, input_ids, attention_mask):
            chunks.append(input_ids.shape[0])
            super().__init__(model, layout, input_ids, attention_mask)

    monkeypatch.setattr(t5_beam, "T5Step", CountingStep)

    def decode(budget: int, cap: int = t5_step.MAX_BATCH_SIZE) -> list[int]:
        chunks.clear()
        monkeypatch.setattr(t5_step, "CPU_MEMORY_BUDGET", budget)
        monkeypatch.setattr(t5_step, "MAX_BATCH_SIZE", cap)
        got = beam_search(model, input_ids, attention_mask, tree, layout, k=4, num_beams=6)
        assert torch.equal(got.items, whole.items) and torch.equal(got.codes, whole.codes)
        torch.testing.assert_close(got.scores, whole.scores, atol=1e-5, rtol=0)
        return list(chunks)

    assert decode(t5_step.CPU_MEMORY_BUDGET) == [7]  # a tiny model: all histories in one chunk
    assert decode(0) == [1] * 7  # no room for even one history: one at a time, never a chunk of 0
    assert decode(1 << 50, cap=3) == [3, 3, 1]  # room for everything, but at most the cap per chunk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_generate_on_gpu():
    ids = make_ids(4, num_items=24, seed=2)
    layout = ids.layout(num_user_tokens=5)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied").cuda()
    input_ids, attention_mask = make_batch(layout, B=5, S=7, seed=2)
    cpu = beam_search(model.cpu(), input_ids, attention_mask, tree, layout, k=5, num_beams=10)
    model.cuda()
    got = beam_search(model, input_ids.cuda(), attention_mask.cuda(), tree.to("cuda"), layout, k=5, num_beams=10)
    ref = generate_beam_search(model, input_ids.cuda(), attention_mask.cuda(), tree, layout, k=5, num_beams=10)
    assert got.items.device.type == "cuda"
    assert torch.equal(got.items.cpu(), ref.items.cpu()) and torch.equal(got.items.cpu(), cpu.items)
    torch.testing.assert_close(got.scores.cpu(), ref.scores.cpu(), atol=1e-4, rtol=0)


def test_argument_errors():
    ids = make_ids(2, num_items=6, seed=0)
    layout = ids.layout(num_user_tokens=2)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied")
    x, am = make_batch(layout, B=2, S=4, seed=0)
    call = lambda **kw: beam_search(**{"model": model, "input_ids": x, "attention_mask": am, "tree": tree,  # noqa: E731
                                       "layout": layout, "k": 2, "num_beams": 3, **kw})
    with pytest.raises(ValueError, match=r"`num_beams` must be an int in \[k=4, 6\] \(k to the catalogue size\), got 3"):
        call(k=4)
    with pytest.raises(ValueError, match=r"`num_beams` must be an int in \[k=2, 6\] \(k to the catalogue size\), got 7"):
        call(num_beams=7)
    with pytest.raises(ValueError, match=r"`num_beams` must be an int in \[k=2, 6\] \(k to the catalogue size\), got 3.0"):
        call(num_beams=3.0)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 6\] \(the catalogue size\), got 0"):
        call(k=0)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 6\] \(the catalogue size\), got 7"):
        call(k=7, num_beams=7)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 6\] \(the catalogue size\), got True"):
        call(k=True)  # bools are not ints here
    with pytest.raises(ValueError, match="`batch_size` must be a positive int or None, got 0"):
        call(batch_size=0)
    with pytest.raises(ValueError, match="`attention_mask` must be a tensor of shape"):
        call(attention_mask=am[:, :2])
    with pytest.raises(ValueError, match="`input_ids` must be a LongTensor"):
        call(input_ids=x.float())
    with pytest.raises(TypeError, match="`model` must be a T5ForConditionalGeneration"):
        call(model=torch.nn.Linear(2, 2))
    other = TokenLayout(codebook_sizes=(3, 6, 2), num_user_tokens=0)
    with pytest.raises(ValueError, match="`tree` must hold 3 code tokens"):
        call(layout=other)
    model.train()
    with pytest.raises(ValueError, match="`model` must be in eval mode"):
        call()


def test_one_item_one_code():
    ids = SemanticIDs.from_codes(np.zeros((1, 1), dtype=np.int64), (1,), extra_level_size=1)
    layout = ids.layout(num_user_tokens=1)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied")
    input_ids, attention_mask = make_batch(layout, B=2, S=3, seed=0)
    got = beam_search(model, input_ids, attention_mask, tree, layout, k=1, num_beams=1)
    assert got.items.tolist() == [[1], [1]] and got.codes.tolist() == [[[0, 0]], [[0, 0]]]
    torch.testing.assert_close(got.scores, torch.zeros(2, 1))  # one allowed token per level: log 1


def test_the_decoders_take_histories_and_equal_the_functions():
    ids = make_ids(3, num_items=20, seed=3)
    layout = ids.layout(num_user_tokens=4)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "separate")
    input_ids, attention_mask = make_batch(layout, B=4, S=6, seed=4)
    histories = Histories(input_ids, attention_mask.bool())
    for cls, fn in ((T5Beam, beam_search), (T5Generate, generate_beam_search)):
        dec = cls(model, tree, layout, num_beams=8)
        assert isinstance(dec, Decoder) and dec.score == LOG_LIKELIHOOD and dec.leaves
        got, ref = dec(histories, 5), fn(model, input_ids, attention_mask, tree, layout, k=5, num_beams=8)
        assert got.score == ref.score == LOG_LIKELIHOOD and got.leaves and ref.leaves
        assert torch.equal(got.items, ref.items) and torch.equal(got.codes, ref.codes)
        torch.testing.assert_close(got.scores, ref.scores, atol=1e-5, rtol=0)
    assert T5Beam(model, tree, layout, num_beams=8).name == "beam" and T5Generate(model, tree, layout, num_beams=8).name == "generate"
