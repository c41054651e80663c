"""Exact and dense scoring in chunks under a memory budget: the same top k (items and scores) as the whole
(users x items) matrix, for every chunk size down to one item."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.decoding.causal import CausalDecoders, exact_scores
from generator.decoding.chunked import block_sizes, dense_topk, exact_topk
from semid.tree import PrefixTree
from tests.test_causal import CFG, make

CHUNKS = [1, 2, 5, 17, 40, 1000]


def _decoders(num_items: int = 40, seed: int = 3, sizes: tuple[int, ...] = (3, 4)) -> CausalDecoders:
    model, ids, tree = make(num_items, seed=seed, sizes=sizes)
    return CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=8).refresh()


@pytest.mark.parametrize("item_chunk", CHUNKS)
@pytest.mark.parametrize("sizes", [(3, 4), (2, 2, 5)])
def test_exact_topk_in_chunks_equals_the_whole_matrix(item_chunk: int, sizes: tuple[int, ...]) -> None:
    dec = _decoders(sizes=sizes)
    h = torch.randn(9, CFG.d_model, generator=torch.Generator().manual_seed(1))
    want_s, want_r = exact_scores(dec.model, h, dec.paths, dec.tables).topk(10, dim=1)
    for budget in (4, 10**9):  # one user per block, and every user in one block
        s, r = exact_topk(dec.model, h, dec.paths, dec.tables, 10, item_chunk=item_chunk, max_score_bytes=budget)
        assert torch.equal(r, want_r)
        torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)


def test_exact_topk_with_items_added_after_training() -> None:
    """Added items are scored against their trained siblings' normaliser (``norm_edge``): the chunked normaliser
    leaves them out as the whole-matrix one does."""
    model, ids, _ = make(num_items=20, seed=7)
    grown = ids.add_items(np.array([[2, 3], [0, 1], [1, 1]]), np.array([21, 22, 23]))
    layout = model.layout
    model.add_items(torch.as_tensor(layout.codes_to_tokens(grown.codes[-3:])))
    dec = CausalDecoders(model, PrefixTree.from_semantic_ids(grown, layout), torch.from_numpy(grown.item_ids),
                         num_beams=8, trained_tree=PrefixTree.from_semantic_ids(ids, layout)).refresh()
    assert not all(bool(n.all()) for n in dec.paths.norm_edge), "the example must have edges outside a normaliser"
    h = torch.randn(6, CFG.d_model, generator=torch.Generator().manual_seed(2))
    want_s, want_r = exact_scores(model, h, dec.paths, dec.tables).topk(23, dim=1)
    for item_chunk in (1, 4, 23):
        s, r = exact_topk(model, h, dec.paths, dec.tables, 23, item_chunk=item_chunk, max_score_bytes=64)
        assert torch.equal(r, want_r)
        torch.testing.assert_close(s, want_s, atol=1e-5, rtol=0)


@pytest.mark.parametrize("item_chunk", CHUNKS)
def test_dense_topk_in_chunks_equals_the_whole_matrix(item_chunk: int) -> None:
    g = torch.Generator().manual_seed(4)
    q, v = torch.randn(7, 5, generator=g), torch.randn(40, 5, generator=g)
    want_s, want_r = (q @ v.T).topk(6, dim=1)
    s, r = dense_topk(q, v, 6, item_chunk=item_chunk, max_score_bytes=4)
    assert torch.equal(r, want_r)
    torch.testing.assert_close(s, want_s)


@pytest.mark.parametrize("name", ["exact", "dense"])
def test_a_small_budget_decodes_the_same_ranking(name: str) -> None:
    big = _decoders(60)
    small = CausalDecoders(big.model, big.tree, big.item_ids, num_beams=8, max_score_bytes=256).refresh()
    h = torch.randn(11, CFG.d_model, generator=torch.Generator().manual_seed(5))
    a, b = big.decode(name, h, k=10), small.decode(name, h, k=10)
    assert torch.equal(a.items, b.items) and torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_block_sizes_respect_the_budget() -> None:
    for B, N, held, budget in [(100, 10**6, 300, 2**20), (3, 10, 0, 4), (500, 10**7, 70000, 256 * 2**20)]:
        b, c = block_sizes(B, N, held, budget)
        assert 1 <= b <= B and 1 <= c <= N
        assert b == 1 or b * (2 * c + held) * 4 <= budget
    dec = _decoders()
    with pytest.raises(ValueError, match="`max_score_bytes` must be an int >= 4"):
        CausalDecoders(dec.model, dec.tree, dec.item_ids, max_score_bytes=0)
