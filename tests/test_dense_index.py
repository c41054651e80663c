"""The causal dense decoder's index: exact up to a catalogue size, faiss IVF beyond, the same ranking where the
approximate index searches every list."""

from __future__ import annotations

import pytest
import torch

from generator.decoding.causal import CausalDecoders
from tests.test_causal import CFG, make


def _pair(**options) -> tuple[CausalDecoders, CausalDecoders]:
    model, ids, tree = make(200, seed=2, sizes=(8, 8))
    exact = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=8).refresh()
    return exact, CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=8, **options).refresh()


@pytest.mark.parametrize("options", [
    {"dense_index": "faiss-flat"},
    {"dense_index": "auto", "exact_max_items": 50, "nprobe": 1000},  # IVF beyond 50 items, every list searched
])
def test_faiss_indexes_rank_as_exact(options: dict) -> None:
    exact, other = _pair(**options)
    assert exact.index is None and other.index is not None
    assert other.index.kind == ("faiss-flat" if options["dense_index"] == "faiss-flat" else "faiss-ivf")
    h = torch.randn(16, CFG.d_model, generator=torch.Generator().manual_seed(0))
    a, b = exact.decode("dense", h, k=10), other.decode("dense", h, k=10)
    assert torch.equal(a.items, b.items) and torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)


def test_auto_is_exact_up_to_the_threshold_and_approximate_beyond() -> None:
    assert _pair(dense_index="auto", exact_max_items=200)[1].index is None
    approx = _pair(dense_index="auto", exact_max_items=199, nprobe=1)[1]
    assert approx.index.kind == "faiss-ivf" and approx.index._backend.nprobe == 1
    ranking = approx.decode("dense", torch.randn(4, CFG.d_model), k=5)
    assert ((ranking.items >= 1) | (ranking.items == -1)).all()  # real items, or -1 where one list ran short


def test_dense_index_errors() -> None:
    model, ids, tree = make(20)
    with pytest.raises(ValueError, match="`dense_index` must be one of"):
        CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), dense_index="hnsw")
    with pytest.raises(ValueError, match="`exact_max_items` must be a positive int"):
        CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), exact_max_items=0).refresh()


def test_the_default_lists_probed_grow_with_the_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    import generator.decoding.mips as mips

    assert [mips.default_nprobe(n) for n in (1, 110, 800, 801, 3162)] == [32, 32, 32, 33, 127]
    monkeypatch.setattr(mips, "DEFAULT_NPROBE", 1)  # the floor out of the way: the share decides
    model, ids, tree = make(2000, seed=2, sizes=(16, 16, 8))
    dec = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=8, exact_max_items=50).refresh()
    nlist = dec.index._backend.nlist
    assert nlist == 44 and dec.index._backend.nprobe == -(-nlist // mips.PROBE_SHARE) == 2
    given = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=8, exact_max_items=50, nprobe=5).refresh()
    assert given.index._backend.nprobe == 5
