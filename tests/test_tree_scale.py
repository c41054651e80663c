"""PrefixTree's step paths (dense depth tables, fixed-width row scans, wide sparse rows) against a dict trie.

The small trees of tests/test_tree.py have few children per node; these have nodes with more children than
``ROW_SCAN_WIDTH`` so that every path of ``allowed_mask`` / ``next_nodes`` runs, alone and mixed in one batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import semid.tree as tree_module
from semid.ids import SemanticIDs
from semid.tree import PrefixTree
from tests.reference import DictTrie


def semantic_tree_data(seed: int = 0, num_items: int = 800, codebook: int = 40):
    """Semantic-ID token sequences: level 0 has ~40 children per node (> ROW_SCAN_WIDTH), deeper levels few."""
    rng = np.random.default_rng(seed)
    ids = SemanticIDs.from_codes(rng.integers(0, codebook, size=(num_items, 2)), (codebook, codebook), extra_level_size=8)
    layout = ids.layout(num_user_tokens=4)
    return np.asarray(layout.codes_to_tokens(ids.codes)), ids.item_ids, layout


def check_against_dict_trie(tree: PrefixTree, tokens: np.ndarray, values: np.ndarray, layout) -> None:
    eos, pad = layout.eos_token_id, layout.pad_token_id
    ref = DictTrie(tokens.tolist(), values.tolist(), end_token=eos)
    L = tokens.shape[1]
    prefixes = sorted({tuple(s[:i]) for s in tokens.tolist() for i in range(L + 1)} | {(*s, eos) for s in tokens.tolist()})
    rng = np.random.default_rng(1)
    order = rng.permutation(len(prefixes))  # mixed depths in one batch
    prefixes = [prefixes[i] for i in order]
    T = L + 1
    padded = torch.tensor([list(p) + [pad] * (T - len(p)) for p in prefixes])
    lengths = torch.tensor([len(p) for p in prefixes])
    nodes = torch.zeros(len(prefixes), dtype=torch.long)
    for t in range(T):  # walk each prefix to its own length
        nodes = torch.where(t < lengths, tree.next_nodes(nodes, padded[:, t]), nodes)
    assert (nodes >= 0).all()
    nodes = torch.cat([nodes, torch.tensor([-1, -1])])  # dead beams allow nothing
    expected = torch.zeros(nodes.shape[0], tree.vocab_size, dtype=torch.bool)
    for i, p in enumerate(prefixes):
        allowed = {pad} if p and p[-1] == eos else ref.allowed(p)
        expected[i, sorted(allowed)] = True
    assert torch.equal(tree.allowed_mask(nodes), expected)
    for lo, hi in [layout.level_range(0), layout.level_range(1), (layout.level_range(0)[0] + 5, layout.level_range(1)[0] + 7), (0, 2)]:
        assert torch.equal(tree.allowed_mask(nodes, token_range=(lo, hi)), expected[:, lo:hi]), (lo, hi)
    # next_nodes for every (node, token): a child exactly where allowed, and it is the child the walk reaches
    B, V = nodes.shape[0], tree.vocab_size
    child = tree.next_nodes(nodes.repeat_interleave(V + 2), torch.arange(-1, V + 1).repeat(B)).view(B, V + 2)
    assert torch.equal(child[:, 1:-1] >= 0, expected) and (child[:, [0, -1]] == -1).all()
    assert torch.equal(tree.lookup(torch.from_numpy(tokens)), torch.from_numpy(values))
    assert torch.equal(tree.lookup(torch.from_numpy(np.concatenate([tokens, np.full((len(tokens), 2), eos)], 1))[:, :-1]), torch.from_numpy(values))


@pytest.mark.parametrize("dense_budget", [0, 2_000, 1 << 30])
@pytest.mark.parametrize("scan_width", [0, 8, 32])
def test_every_path_matches_dict_trie(dense_budget, scan_width, monkeypatch):
    monkeypatch.setattr(tree_module, "ROW_SCAN_WIDTH", scan_width)
    tokens, values, layout = semantic_tree_data()
    tree = PrefixTree.from_semantic_ids(SemanticIDs(layout.tokens_to_codes(tokens), values, layout.codebook_sizes), layout, dense_budget=dense_budget)
    dense = [spec[3] for spec in tree.dense_spec.tolist()]
    if dense_budget == 0:
        assert not any(dense) and tree.num_dense == 0
    if dense_budget == 1 << 30:
        assert all(d for d, deg in zip(dense, tree._max_degree, strict=True) if deg > 0)
    if dense_budget == 2_000:  # the budget goes to the depths with most children per node first
        assert dense[0] and not dense[2]
    check_against_dict_trie(tree, tokens, values, layout)


def test_budget_bounds_the_tables_and_the_dtype_is_compact():
    tokens, values, layout = semantic_tree_data(num_items=400)
    big = PrefixTree.from_sequences(tokens, values, layout.vocab_size, end_token=1, pad_token=0, dense_budget=1 << 30)
    assert big.dense_next.dtype == torch.int32
    small = PrefixTree.from_sequences(tokens, values, layout.vocab_size, end_token=1, pad_token=0, dense_budget=500)
    assert small.dense_next.numel() <= 500 < big.dense_next.numel()
    assert small.nbytes < big.nbytes
