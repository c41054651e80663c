"""MIPS: chunked exact torch search against brute force, and parity with faiss's flat index."""

from __future__ import annotations

import sys

import pytest
import torch

from generator.decoding.mips import KINDS, MIPSIndex, exact_topk, import_faiss


def _data(B: int = 9, N: int = 300, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, d, generator=g)
    vecs = torch.randn(N, d, generator=g)  # continuous random scores: no ties
    ids = torch.randperm(N, generator=g) * 3 + 7  # ids unrelated to rows
    return queries, vecs, ids


def _brute(queries: torch.Tensor, vecs: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (queries.double() @ vecs.double().T).float()
    order = torch.argsort(scores, dim=1, descending=True)[:, :k]
    return ids[order], scores.gather(1, order)


@pytest.mark.parametrize(("query_chunk", "item_chunk"), [(1024, 65536), (4, 7), (1, 1)])
def test_exact_topk_chunked_matches_brute_force(query_chunk: int, item_chunk: int) -> None:
    queries, vecs, _ = _data(N=40)
    res = exact_topk(queries, vecs, 5, query_chunk=query_chunk, item_chunk=item_chunk)
    rows, scores = _brute(queries, vecs, torch.arange(40), 5)
    assert torch.equal(res.item_ids, rows)
    torch.testing.assert_close(res.scores, scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 10, 300])
def test_exact_and_faiss_flat_give_identical_topk(k: int) -> None:
    pytest.importorskip("faiss")
    queries, vecs, ids = _data()
    exact = MIPSIndex.build(vecs, ids, kind="exact").search(queries, k)
    flat = MIPSIndex.build(vecs, ids, kind="faiss-flat").search(queries, k)
    want_ids, want_scores = _brute(queries, vecs, ids, k)
    assert torch.equal(exact.item_ids, want_ids)
    assert torch.equal(flat.item_ids, exact.item_ids)
    torch.testing.assert_close(flat.scores, exact.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact.scores, want_scores, atol=1e-5, rtol=0)


def test_exclusion_exact_and_faiss_agree() -> None:
    pytest.importorskip("faiss")
    queries, vecs, ids = _data(N=50)
    top = MIPSIndex.build(vecs, ids).search(queries, 3).item_ids
    exclude = torch.cat([top[:, :2], torch.full((queries.shape[0], 1), -1), torch.full((queries.shape[0], 1), 10**6)], 1)
    for kind in ("exact", "faiss-flat"):
        res = MIPSIndex.build(vecs, ids, kind=kind).search(queries, 5, exclude=exclude)
        assert torch.equal(res.item_ids[:, 0], top[:, 2]), kind  # the two best are gone, the third is first
        assert not (res.item_ids.unsqueeze(2) == exclude.unsqueeze(1)).any(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_add_then_search_finds_new_items(kind: str) -> None:
    if kind != "exact":
        pytest.importorskip("faiss")
    queries, vecs, ids = _data(N=200, d=8)
    index = MIPSIndex.build(vecs, ids, kind=kind, nlist=4, nprobe=4)
    new = queries[:2] * 100  # a new item far along each of the first two queries
    index.add(new, torch.tensor([5000, 5001]))
    res = index.search(queries[:2], 3)
    assert res.item_ids[:, 0].tolist() == [5000, 5001]
    assert index.num_items == 202


@pytest.mark.parametrize("kind", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_indexes_have_high_recall(kind: str) -> None:
    pytest.importorskip("faiss")
    queries, vecs, ids = _data(B=20, N=500, d=8)
    exact = MIPSIndex.build(vecs, ids).search(queries, 10).item_ids
    approx = MIPSIndex.build(vecs, ids, kind=kind, nlist=8, nprobe=8).search(queries, 10).item_ids
    recall = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean()
    assert recall >= 0.95, (kind, recall)


def test_ties_come_in_ascending_id_order() -> None:
    vecs = torch.tensor([[1.0], [1.0], [1.0], [0.5]])
    res = MIPSIndex.build(vecs, torch.tensor([30, 10, 20, 40])).search(torch.tensor([[1.0]]), 4)
    assert res.item_ids.tolist() == [[10, 20, 30, 40]]


def test_errors() -> None:
    queries, vecs, ids = _data(N=10)
    index = MIPSIndex.build(vecs, ids)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        MIPSIndex.build(vecs, kind="annoy")
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 10\]"):
        index.search(queries, 11)
    with pytest.raises(ValueError, match="d=16 columns"):
        index.search(queries[:, :3], 2)
    with pytest.raises(ValueError, match="got item id .* twice"):
        index.add(vecs[:1], ids[:1])


def test_missing_faiss_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install faiss-cpu"):
        import_faiss()
    with pytest.raises(ImportError, match=r"pip install faiss-cpu"):
        MIPSIndex.build(torch.randn(3, 2), kind="faiss-flat")
