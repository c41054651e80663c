"""The one beam loop (``generator.decoding.beam.search``) against a plain Python beam search on a toy backbone, over a
prefix tree of fixed-length IDs, a title-like tree with eos, and no tree; and the one masked log-softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from generator.decoding.beam import Free, TreeConstraint, leaf_items, premasked_log_softmax, search
from semid.processor import masked_log_softmax
from semid.tree import PrefixTree
from tests.reference import DictTrie

PAD, EOS, P = 0, 1, 101  # P buckets of prefixes, each with its own logits


def bucket(prefix: list[int]) -> int:
    return sum(t * 7**i for i, t in enumerate(prefix)) % P


class TableBackbone:
    """Logits of a beam = a random table's row for (its history, its prefix's bucket): every prefix has its own."""

    def __init__(self, B: int, V: int, windows: list[tuple[int, int]], seed: int) -> None:
        self.B, self.device, self.windows = B, torch.device("cpu"), windows
        self.table = torch.randn(B, P, V, generator=torch.Generator().manual_seed(seed)) * 2

    def window(self, step: int) -> tuple[int, int]:
        return self.windows[min(step, len(self.windows) - 1)]

    def logits(self, step: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        powers = 7 ** torch.arange(prefix.shape[1])
        keys = (prefix * powers).sum(1) % P
        lo, hi = self.window(step)
        return self.table[torch.arange(self.B).repeat_interleave(m), keys, lo:hi]

    def reorder(self, step: int, rows: torch.Tensor) -> None:
        pass


def reference(bb: TableBackbone, b: int, M: int, steps: int, allowed, eos: int | None, lp: float) -> list[tuple]:
    """Plain beam search for history b: (tokens, logp, length, finished) of at most M live beams, best first."""
    beams = [((), 0.0, 0, False)]
    for step in range(steps):
        if eos is not None and all(f for *_, f in beams):
            break
        lo, hi = bb.window(step)
        cands = []
        for toks, s, n, fin in beams:  # the obvious loop over beams
            if fin:
                cands.append(((*toks, PAD), s, n, True))
                continue
            ok = sorted(t for t in allowed(list(toks)) if lo <= t < hi)
            logits = bb.table[b, bucket(list(toks)), ok].double()
            for t, lp_t in zip(ok, (logits - logits.logsumexp(0)).tolist(), strict=True):
                cands.append(((*toks, t), s + lp_t, n + 1, t == eos))
        cands.sort(key=lambda c: -(c[1] / c[2] ** lp if lp else c[1]))
        beams = cands[:M]
    return beams


def check(beams, bb, M, steps, allowed, eos, lp) -> None:
    for b in range(bb.B):
        ref = reference(bb, b, M, steps, allowed, eos, lp)
        for i, (toks, s, n, fin) in enumerate(ref):
            got = beams.tokens[b, i].tolist()  # the loop runs until every history's beams have finished: pads after
            assert got[: len(toks)] == list(toks) and set(got[len(toks):]) <= {PAD}, (b, i)
            assert float(beams.logp[b, i]) == pytest.approx(s, abs=1e-4)
            assert int(beams.lengths[b, i]) == n and bool(beams.finished[b, i]) == (fin or eos is None)
            assert float(beams.scores[b, i]) == pytest.approx(s / n**lp if lp else s, abs=1e-4)
        assert torch.isinf(beams.scores[b, len(ref):]).all()  # dead beams: fewer candidates than M
        assert (beams.scores[b, 1:] <= beams.scores[b, :-1]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("M", [1, 3, 7, 40])
def test_fixed_length_ids_on_a_tree_match_a_plain_beam_search(seed: int, M: int) -> None:
    rng = np.random.default_rng(seed)
    windows = [(2, 5), (5, 8), (8, 12)]  # one block of tokens per level, as semantic IDs
    codes = np.unique(np.stack([rng.integers(lo, hi, 30) for lo, hi in windows], 1), axis=0)
    tree = PrefixTree.from_sequences(codes, np.arange(len(codes)), 12, end_token=EOS, pad_token=PAD)
    trie = DictTrie(codes.tolist(), list(range(len(codes))), end_token=EOS)
    bb = TableBackbone(4, 12, windows, seed)
    on_tree = TreeConstraint(tree, bb.B, bb.device)
    beams = search(bb, on_tree, num_beams=M, steps=3)
    check(beams, bb, M, 3, trie.allowed, None, 0.0)
    k = min(M, len(codes))
    items = leaf_items(beams, tree, k)
    assert [[trie.value([*t, EOS]) for t in beams.tokens[b, :k].tolist()] for b in range(4)] == items.tolist()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("M", [1, 4, 12])
@pytest.mark.parametrize("lp", [0.0, 0.7])
def test_titles_with_eos_match_a_plain_beam_search(seed: int, M: int, lp: float) -> None:
    rng = np.random.default_rng(seed)
    seqs = sorted({tuple(rng.integers(2, 7, rng.integers(1, 4)).tolist()) for _ in range(14)})  # prefixes of others too
    tree = PrefixTree.from_sequences([list(s) for s in seqs], np.arange(len(seqs)), 7, end_token=EOS, pad_token=PAD)
    trie = DictTrie(seqs, list(range(len(seqs))), end_token=EOS)
    bb = TableBackbone(3, 7, [(0, 7)], seed)
    beams = search(bb, TreeConstraint(tree, bb.B, bb.device), num_beams=M, steps=tree.max_depth, eos=EOS, pad=PAD,
                   length_penalty=lp)
    check(beams, bb, M, tree.max_depth, trie.allowed, EOS, lp)
    free = search(bb, Free(PAD), num_beams=M, steps=3, eos=EOS, pad=PAD, length_penalty=lp)
    check(free, bb, M, 3, lambda prefix: set(range(1, 7)), EOS, lp)  # anything but pad; some cut unfinished at 3


def test_masked_log_softmax_normalises_over_the_allowed_or_the_norm_set() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, generator=g) * 3
    allowed = torch.rand(5, 6, generator=g) < 0.5
    allowed[0], allowed[1] = False, True  # a row that allows nothing, and one that allows all
    before = logits.clone()
    out = masked_log_softmax(logits, allowed)
    assert torch.equal(logits, before)  # a new tensor
    assert torch.isneginf(out[~allowed]).all() and not out.isnan().any()
    for r in range(5):
        a = allowed[r]
        if a.any():
            torch.testing.assert_close(out[r, a], logits[r, a].log_softmax(0))
    norm = allowed & (torch.arange(6) % 2 == 0)  # normalised over a subset: its entries sum to 1, the others above
    out = masked_log_softmax(logits, allowed, norm)
    for r in range(5):
        if norm[r].any():
            torch.testing.assert_close(out[r, allowed[r]], logits[r, allowed[r]] - logits[r, norm[r]].logsumexp(0))
            assert math.isclose(float(out[r, norm[r]].logsumexp(0)), 0.0, abs_tol=1e-5)
    assert torch.isneginf(out[~allowed]).all()


@pytest.mark.parametrize("experts", [0, 3])
def test_a_masked_backbones_log_softmax_is_the_masked_one_bit_for_bit(experts: int) -> None:
    """``premasked_log_softmax`` (a ``masked`` backbone's logits: -inf already wherever nothing is allowed) gives
    ``masked_log_softmax``'s numbers exactly, a dead beam's row (node -1, nothing allowed) all -inf, not NaN; an
    ensemble's experts each normalised, then summed."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*((experts,) if experts else ()), 9, 12, generator=g) * 3
    allowed = torch.rand(9, 12, generator=g) < 0.4
    allowed[2], allowed[5], allowed[7] = False, True, False  # dead beams (2, 7), a node allowing every code (5)
    allowed[7, 3] = False
    nodes = torch.arange(9)
    nodes[[2, 7]] = -1
    want = masked_log_softmax(logits, allowed)
    got = premasked_log_softmax(logits.masked_fill(~allowed, float("-inf")), nodes)
    assert torch.equal(got, want.sum(0) if experts else want)
    assert bool(torch.isneginf(got[[2, 7]]).all()) and bool(torch.isfinite(got[5]).all())
    masked = premasked_log_softmax(logits.masked_fill(~allowed, float("-inf")), nodes, listed=False)  # a GPU's form
    assert torch.equal(masked, got)
    meta = premasked_log_softmax(logits.to("meta"), nodes.to("meta"))  # off the CPU: no value is read back
    assert meta.shape == got.shape
