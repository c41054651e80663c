"""semid.prefix_index: the prefix key and every table of PrefixIndex against a brute-force reference (plain loops
over items and prefixes, Python ints), on hypothesis-drawn code sets including one item, one level and one code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semid.ids import SemanticIDs
from semid.prefix_index import PrefixIndex, find, prefix_key
from semid.tree import PrefixTree


def horner(prefix: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    key = 0
    for c, k in zip(prefix, sizes, strict=False):
        key = key * k + c
    return key


def reference(codes: np.ndarray, sizes: tuple[int, ...]) -> dict:
    """Every table by loops: nodes are the distinct prefixes of each length, in lexicographic order."""
    tuples = [tuple(int(c) for c in row) for row in codes]
    L = codes.shape[1]
    nodes = [sorted({t[:d] for t in tuples}) for d in range(L + 1)]
    row = [{p: r for r, p in enumerate(ps)} for ps in nodes]
    ref = {"keys": [[horner(p, sizes) for p in ps] for ps in nodes],
           "node": [[row[d][t[:d]] for d in range(L + 1)] for t in tuples],
           "first_item": [[min(i for i, t in enumerate(tuples) if t[:d] == p) for p in ps] for d, ps in enumerate(nodes)],
           "parent": [[row[lv][p[:lv]] for p in nodes[lv + 1]] for lv in range(L)],
           "code": [[p[lv] for p in nodes[lv + 1]] for lv in range(L)],
           "child_codes": [], "child_index": [],
           "order": sorted(range(len(tuples)), key=lambda i: (tuples[i], i)),
           "members": [[sorted(i for i, t in enumerate(tuples) if t[:d] == p) for p in ps] for d, ps in enumerate(nodes)]}
    for lv in range(L):
        kids = [[c for c in nodes[lv + 1] if c[:lv] == p] for p in nodes[lv]]
        W = max(len(k) for k in kids)
        ref["child_codes"].append([[c[lv] for c in k] + [-1] * (W - len(k)) for k in kids])
        ref["child_index"].append([[row[lv + 1][c] for c in k] + [-1] * (W - len(k)) for k in kids])
    return ref


code_sets = st.integers(1, 4).flatmap(lambda L: st.tuples(
    st.lists(st.integers(1, 5), min_size=L, max_size=L).map(tuple),
    st.integers(1, 40), st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(code_sets)
def test_every_table_matches_the_brute_force_reference(case: tuple) -> None:
    sizes, n, seed = case
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, sizes, size=(n, len(sizes)))
    if n > 3:
        codes[1::3] = codes[0]  # repeated tuples and long shared prefixes
    index, ref = PrefixIndex(codes, sizes + (7,)), reference(codes, sizes)
    L = len(sizes)
    assert len(index.keys) == L + 1 and index.order.numel() == n
    assert index.order.tolist() == ref["order"]
    assert index.node.tolist() == ref["node"]
    for name in ("keys", "first_item"):
        assert [t.tolist() for t in getattr(index, name)] == ref[name], name
    for name in ("parent", "code", "child_codes", "child_index"):
        assert [t.tolist() for t in getattr(index, name)] == ref[name], name
    for d in range(L + 1):
        rows = torch.arange(len(ref["keys"][d]))
        start, stop = index.span(d, rows)
        assert [sorted(index.order[a:b].tolist()) for a, b in zip(start.tolist(), stop.tolist(), strict=True)] == ref["members"][d]
        # find: every node's prefix, and prefixes no tuple has (or out of range) give -1
        probes = rng.integers(-1, max(sizes) + 1, size=(30, d))
        want = [ref["keys"][d].index(horner(tuple(p), sizes)) if tuple(p) in {t[:d] for t in map(tuple, codes.tolist())}
                else -1 for p in probes.tolist()]
        assert index.find(torch.from_numpy(probes)).tolist() == want
        assert index.find(torch.from_numpy(codes[:, :d])).tolist() == [r[d] for r in ref["node"]]


@settings(max_examples=30, deadline=None)
@given(code_sets)
def test_tree_nodes_are_the_prefix_trees_own_numbering(case: tuple) -> None:
    sizes, n, seed = case
    codes = np.random.default_rng(seed).integers(0, sizes, size=(n, len(sizes)))
    ids = SemanticIDs.from_codes(codes, sizes, extra_level_size=n)
    layout = ids.layout(0)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    tokens = torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes)))
    walked = torch.stack([tree.walk(tokens[:, :d]) for d in range(ids.num_levels + 1)], 1)
    index = PrefixIndex(ids.codes, ids.codebook_sizes)
    assert torch.equal(index.tree_nodes(), walked)
    assert int(index.offsets[-1]) + ids.num_items == tree.num_nodes  # the eos leaves come after the code nodes


def test_prefix_key_numpy_and_torch_alike_out_of_range_and_overflow() -> None:
    sizes = (4, 3, 5)
    codes = np.array([[1, 2, 4], [3, 0, 0], [0, 0, 0], [-1, 0, 0], [1, 3, 0], [4, 0, 0]])
    want = [horner(tuple(r), sizes) for r in codes[:3].tolist()] + [-1, -1, -1]
    assert prefix_key(codes, sizes).tolist() == want
    assert prefix_key(torch.from_numpy(codes), sizes).tolist() == want
    assert prefix_key(codes[:, :2], sizes).tolist() == [1 * 3 + 2, 9, 0, -1, -1, -1]
    assert prefix_key(codes[:, :0], sizes).tolist() == [0] * 6  # the empty prefix: the root
    assert prefix_key(torch.from_numpy(codes.reshape(2, 3, 3)), sizes).shape == (2, 3)
    with pytest.raises(ValueError, match="more than an int64 key can hold"):
        prefix_key(np.zeros((1, 3), dtype=np.int64), (2**21, 2**21, 2**21))
    with pytest.raises(ValueError, match="only 2 codebook sizes"):
        prefix_key(codes, (4, 3))
    assert find(np.array([2, 5, 9]), np.array([5, 3, -1, 9])).tolist() == [1, -1, -1, 2]
    assert find(torch.zeros(0, dtype=torch.long), torch.tensor([0, 1])).tolist() == [-1, -1]


def test_bad_codes_are_refused_naming_the_entry() -> None:
    with pytest.raises(ValueError, match=r"`codes\[1, 0\]` is 4; level 0 takes codes in \[0, 4\)"):
        PrefixIndex(np.array([[0, 1], [4, 0]]), (4, 2))
    with pytest.raises(ValueError, match="non-empty"):
        PrefixIndex(np.zeros((0, 2), dtype=np.int64), (4, 2))
    with pytest.raises(TypeError, match="integers"):
        PrefixIndex(np.zeros((2, 2)), (4, 2))
