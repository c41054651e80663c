import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semid.ids import SemanticIDs
from semid.tree import PrefixTree
from tests.reference import DictTrie

V = 12
END, PAD = 0, 1


@st.composite
def sequence_sets(draw, fixed_length: bool):
    """Unique token sequences over tokens 2..V-1 (0 and 1 are end/pad), with distinct values."""
    if fixed_length:
        length = draw(st.integers(1, 4))
        seq = st.lists(st.integers(2, V - 1), min_size=length, max_size=length)
    else:
        seq = st.lists(st.integers(2, V - 1), min_size=1, max_size=5)
    seqs = draw(st.lists(seq, min_size=1, max_size=30, unique_by=tuple))
    return seqs, list(range(100, 100 + len(seqs)))


def all_prefixes(seqs, end_token):
    out = {()}
    for s in seqs:
        full = list(s) + ([end_token] if end_token is not None else [])
        out.update(tuple(full[:i]) for i in range(1, len(full) + 1))
    return sorted(out)


@settings(max_examples=80, deadline=None)
@given(data=sequence_sets(fixed_length=False), dense_budget=st.sampled_from([0, 40, 1 << 20]))
def test_tree_matches_dict_trie(data, dense_budget):
    seqs, values = data
    tree = PrefixTree.from_sequences(seqs, values, V, end_token=END, pad_token=PAD, dense_budget=dense_budget)
    ref = DictTrie(seqs, values, end_token=END)
    prefixes = all_prefixes(seqs, END)
    T = max(len(p) for p in prefixes)
    padded = torch.tensor([list(p) + [PAD] * (T - len(p)) for p in prefixes])
    lengths = [len(p) for p in prefixes]
    # walk each prefix to its node (only its own length: pads after it are only valid after a finished sequence)
    nodes = torch.stack([tree.walk(padded[i : i + 1, : lengths[i]])[0] for i in range(len(prefixes))])
    assert (nodes >= 0).all()
    mask = tree.allowed_mask(nodes)
    for i, p in enumerate(prefixes):
        expected = ref.allowed(p)
        if p and p[-1] == END:
            expected = {PAD}  # a finished sequence may only be padded
        assert set(torch.nonzero(mask[i]).squeeze(1).tolist()) == expected, p
        for tok in range(V):
            child = tree.next_nodes(nodes[i : i + 1], torch.tensor([tok]))[0].item()
            assert (child >= 0) == (tok in expected)
    # every sequence maps back to its value, with or without end token and trailing pads
    for s, v in zip(seqs, values, strict=True):
        assert tree.lookup(torch.tensor([s])).item() == v
        assert tree.lookup(torch.tensor([list(s) + [END, PAD, PAD]])).item() == v
    # a sequence that is not in the set maps to -1
    missing = [t for t in range(2, V) if (t,) not in {tuple(s) for s in seqs}]
    if missing:
        assert tree.lookup(torch.tensor([[missing[0], END]])).item() == -1


@settings(max_examples=60, deadline=None)
@given(data=sequence_sets(fixed_length=True), dense_budget=st.sampled_from([0, 1 << 20]))
def test_without_end_token_every_sequence_looks_up_its_value(data, dense_budget):
    """Fixed-length sequences and no end token: the row scan's window past the last edge (clamped onto it) must not
    count that edge again (it once summed to an edge that does not exist)."""
    seqs, values = data
    tree = PrefixTree.from_sequences(seqs, values, V, dense_budget=dense_budget)
    assert tree.lookup(torch.tensor(seqs)).tolist() == values
    known = {tuple(s) for s in seqs}
    other = [[t] * len(seqs[0]) for t in range(2, V) if (t,) * len(seqs[0]) not in known]
    if other:
        assert tree.lookup(torch.tensor(other)).tolist() == [-1] * len(other)


@settings(max_examples=40, deadline=None)
@given(data=sequence_sets(fixed_length=True))
def test_token_range_slices_the_mask(data):
    seqs, values = data
    tree = PrefixTree.from_sequences(seqs, values, V, end_token=END)
    nodes = torch.arange(tree.num_nodes)
    full = tree.allowed_mask(nodes)
    assert torch.equal(tree.allowed_mask(nodes, token_range=(3, 9)), full[:, 3:9])


def test_one_item_and_one_code_per_level():
    ids = SemanticIDs.from_codes(np.zeros((1, 3), dtype=int), [1, 1, 1], extra_level_size=1)
    layout = ids.layout(num_user_tokens=0)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    tokens = torch.as_tensor(layout.codes_to_tokens(ids.codes))
    assert tree.lookup(tokens).tolist() == [1]
    node = torch.zeros(1, dtype=torch.long)
    for t in range(4):
        assert tree.allowed_mask(node).nonzero()[:, 1].tolist() == [int(tokens[0, t])]
        node = tree.next_nodes(node, tokens[:, t])
    assert tree.allowed_mask(node).nonzero()[:, 1].tolist() == [layout.eos_token_id]


def test_dead_nodes_allow_nothing():
    tree = PrefixTree.from_sequences([[2, 3]], [0], 5)
    assert not tree.allowed_mask(torch.tensor([-1])).any()
    assert tree.next_nodes(torch.tensor([-1, 0]), torch.tensor([2, 4])).tolist() == [-1, -1]


@pytest.mark.parametrize(
    "seqs, values, kwargs, match",
    [
        ([[2, 3], [2, 3]], [0, 1], {}, "duplicate sequence: values 0 and 1"),
        ([[2], [2, 3]], [0, 1], {}, "is a prefix of"),
        ([[2, 9]], [0], {}, "token 9 at position 1, outside"),
        ([[2, 3]], [-1], {}, "`values` must be >= 0"),
        ([[2, 0]], [0], {"end_token": 0}, "contains `end_token` 0"),
        (np.array([[2, -1, 3]]), [0], {}, "after its -1 padding"),
        ([[2]], [0], {"vocab_size": 0}, "`vocab_size` must be a positive int"),
    ],
)
def test_precondition_errors(seqs, values, kwargs, match):
    vocab = kwargs.pop("vocab_size", 5)
    with pytest.raises(ValueError, match=match):
        PrefixTree.from_sequences(seqs, values, vocab, **kwargs)


def test_prefix_is_fine_with_end_token_and_to_device():
    tree = PrefixTree.from_sequences([[2], [2, 3]], [7, 8], 5, end_token=0).to("cpu")
    assert tree.lookup(torch.tensor([[2, 0], [2, 3]])).tolist() == [7, 8]


def test_to_its_own_device_is_the_tree_itself_and_another_device_a_copy():
    tree = PrefixTree.from_sequences([[2], [2, 3]], [7, 8], 5, end_token=0)
    assert tree.to("cpu") is tree and tree.to(torch.device("cpu")) is tree  # no copy per decoding call
    moved = tree.to("meta")  # another device: a copy, every tensor moved, the original untouched
    assert moved is not tree and moved.row_ptr.device.type == "meta" and tree.row_ptr.device.type == "cpu"


def test_next_nodes_with_a_known_depth_equals_the_search_over_depths() -> None:
    """A fixed-length beam's step names its depth: the same children, dead rows (-1) and refused tokens as without."""
    g = torch.Generator().manual_seed(3)
    seqs = torch.unique(torch.randint(0, 5, (60, 3), generator=g), dim=0) + torch.tensor([0, 5, 10])  # a block per level
    tree = PrefixTree.from_sequences(seqs.tolist(), list(range(len(seqs))), 16, end_token=15)
    for d in range(3):  # loop over depths
        pick = torch.randint(0, len(seqs), (9,), generator=g)
        nodes = tree.walk(seqs[pick, :d])  # nodes at depth d
        nodes[2] = -1  # a dead beam
        tokens = seqs[torch.randint(0, len(seqs), (9,), generator=g), d]  # allowed under some nodes, not under others
        tokens[0], tokens[1], tokens[8] = 15, -3, seqs[0, (d + 1) % 3]  # never allowed here (another level's block)
        want = tree.next_nodes(nodes, tokens)
        assert (want[3:8] >= 0).any() and (want[[0, 1, 2, 8]] < 0).all()
        assert torch.equal(tree.next_nodes(nodes, tokens, depth=d), want)
    with pytest.raises(ValueError, match="depth"):
        tree.next_nodes(nodes, tokens, depth=9)
