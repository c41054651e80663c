"""fast_topk against stock generate (generate_topk) and against brute-force scoring of every item."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, T5Config, T5ForConditionalGeneration

from generator.decoding.t5_beam import auto_batch_size, fast_topk
from generator.decoding.t5_generate import generate_topk
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.processor import PrefixTreeLogitsProcessor
from semid.tree import PrefixTree

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


def brute_force_scores(model, input_ids, attention_mask, tree, layout, ids):
    """Exact score of every item for every history, from model.forward with teacher forcing: (B, N)."""
    B, N, L = input_ids.shape[0], ids.num_items, layout.num_levels
    tokens = torch.as_tensor(layout.codes_to_tokens(ids.codes))  # (N, L)
    dec_in = torch.cat([torch.full((N, 1), layout.bos_token_id), tokens[:, :-1]], dim=1)  # (N, L)
    allowed = torch.stack(
        [tree.allowed_mask(tree.walk(tokens[:, :level]), token_range=(0, tree.vocab_size)) for level in range(L)], dim=1
    )  # (N, L, V)
    out = torch.empty(B, N)
    with torch.no_grad():
        for b in range(B):
            logits = model(
                input_ids=input_ids[b].expand(N, -1),
                attention_mask=attention_mask[b].expand(N, -1),
                decoder_input_ids=dec_in,
                use_cache=False,
            ).logits[..., : tree.vocab_size]
            logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            out[b] = logp.gather(2, tokens[:, :, None])[..., 0].sum(1)
    return out, torch.as_tensor(ids.item_ids)


def assert_valid_distinct(result, tree, layout, k):
    B = result.items.shape[0]
    assert result.items.shape == (B, k) and result.scores.shape == (B, k)
    assert result.codes.shape == (B, k, layout.num_levels)
    tokens = layout.codes_to_tokens(result.codes).view(B * k, -1)
    assert torch.equal(tree.lookup(tokens).view(B, k), result.items), "codes do not spell the items"
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
    for k in sorted({1, min(3, num_beams), num_beams}):
        got = fast_topk(model, input_ids, attention_mask, tree, layout, k=k, num_beams=num_beams)
        if num_beams == 1:
            items, scores, codes = greedy_reference(model, input_ids, attention_mask, tree, layout)
        else:
            items, scores, codes = generate_topk(model, input_ids, attention_mask, tree, layout, k=k, num_beams=num_beams)
        assert torch.equal(got.items, items), f"k={k}"
        assert torch.equal(got.codes, codes)
        torch.testing.assert_close(got.scores, scores, atol=1e-4, rtol=0)
        assert_valid_distinct(got, tree, layout, k)
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
    got = fast_topk(model, input_ids, attention_mask, tree, layout, k=k, num_beams=num_items)
    scores, item_ids = brute_force_scores(model, input_ids, attention_mask, tree, layout, ids)
    best, order = scores.topk(k, dim=1)
    assert torch.equal(got.items, item_ids[order])
    torch.testing.assert_close(got.scores, best, atol=1e-4, rtol=0)
    assert_valid_distinct(got, tree, layout, k)


def test_chunks_give_the_same_result():
    ids = make_ids(4, num_items=24, seed=1)
    layout = ids.layout(num_user_tokens=5)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied")
    input_ids, attention_mask = make_batch(layout, B=7, S=6, seed=3)
    whole = fast_topk(model, input_ids, attention_mask, tree, layout, k=4, num_beams=6)
    for batch_size in (1, 3):
        part = fast_topk(model, input_ids, attention_mask, tree, layout, k=4, num_beams=6, batch_size=batch_size)
        assert torch.equal(part.items, whole.items) and torch.equal(part.codes, whole.codes)
        torch.testing.assert_close(part.scores, whole.scores, atol=1e-5, rtol=0)
    assert 1 <= auto_batch_size(model, 6, 6, layout) <= 4096
    empty = fast_topk(model, input_ids[:0], attention_mask[:0], tree, layout, k=4, num_beams=6)
    assert empty.items.shape == (0, 4) and empty.codes.shape == (0, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_generate_on_gpu():
    ids = make_ids(4, num_items=24, seed=2)
    layout = ids.layout(num_user_tokens=5)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied").cuda()
    input_ids, attention_mask = make_batch(layout, B=5, S=7, seed=2)
    cpu = fast_topk(model.cpu(), input_ids, attention_mask, tree, layout, k=5, num_beams=10)
    model.cuda()
    got = fast_topk(model, input_ids.cuda(), attention_mask.cuda(), tree.to("cuda"), layout, k=5, num_beams=10)
    ref = generate_topk(model, input_ids.cuda(), attention_mask.cuda(), tree, layout, k=5, num_beams=10)
    assert got.items.device.type == "cuda"
    assert torch.equal(got.items.cpu(), ref.items.cpu()) and torch.equal(got.items.cpu(), cpu.items)
    torch.testing.assert_close(got.scores.cpu(), ref.scores.cpu(), atol=1e-4, rtol=0)


def test_argument_errors():
    ids = make_ids(2, num_items=6, seed=0)
    layout = ids.layout(num_user_tokens=2)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    model = make_model(layout, "tied")
    x, am = make_batch(layout, B=2, S=4, seed=0)
    call = lambda **kw: fast_topk(**{"model": model, "input_ids": x, "attention_mask": am, "tree": tree,  # noqa: E731
                                     "layout": layout, "k": 2, "num_beams": 3, **kw})
    with pytest.raises(ValueError, match="`num_beams` must be >= k"):
        call(k=4)
    with pytest.raises(ValueError, match="`num_beams` must be at most the catalogue size"):
        call(num_beams=7)
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
    got = fast_topk(model, input_ids, attention_mask, tree, layout, k=1, num_beams=1)
    assert got.items.tolist() == [[1], [1]] and got.codes.tolist() == [[[0, 0]], [[0, 0]]]
    torch.testing.assert_close(got.scores, torch.zeros(2, 1))  # one allowed token per level: log 1
