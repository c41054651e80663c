"""The hybrid's fusions: the fast, batched decoder against a per-user loop over a brute-force reference, the choice
made on validation users only, and the paired bootstrap."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

import generator.decoding.fusion as fusion
import generator.runs.fusion_store as fusion_store
from generator.decoding.causal import CausalDecoders
from generator.decoding.fusion import (
    FEATURES,
    FUSIONS,
    LEVEL_GRID,
    Parts,
    check_fusion,
    choose_fusion,
    dense_levels,
    fit_params,
    fuse,
)
from semid.metrics import ndcg_at_k, paired_bootstrap
from tests.test_causal import make, reference_logprob

C, K = 6, 5


def slow_dense_levels(d: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(L, N) one user's dense log-softmax d (N,) level by level: log of the mass of the items sharing the item's
    first l + 1 codes over the mass of those sharing its first l, by plain Python."""
    p = np.exp(d)
    mass = lambda i, n: sum(p[j] for j in range(len(p)) if list(tokens[j, :n]) == list(tokens[i, :n]))  # noqa: E731
    return np.array([[math.log(mass(i, lv + 1)) - math.log(mass(i, lv)) for i in range(len(p))] for lv in range(tokens.shape[1])])


def slow_hybrid(kind: str, params: dict, exact: np.ndarray, dense: np.ndarray, cold: list[int], k: int,
                code_levels: np.ndarray | None = None, tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per user, by plain Python: the two top-C lists, the pool, each candidate's score; (rows, scores) of the top k.
    ``levels`` reads each user's per-level code terms ``code_levels`` (B, L, N) and the items' tokens (N, L)."""
    out, out_scores = [], []
    slow_hybrid.scores = []  # per user, every pool candidate's score (for ties)
    for u, (e, d) in enumerate(zip(exact, dense, strict=True)):  # loop over users
        gen = sorted(range(len(e)), key=lambda i: -e[i])[:C]
        den = sorted(range(len(d)), key=lambda i: -d[i])[:C]
        if kind == "full":
            scores = {i: params["alpha"] * e[i] + (1 - params["alpha"]) * d[i] for i in range(len(e))}
        elif kind == "levels":
            dl = slow_dense_levels(d, tokens)
            scores = {i: sum(a * code_levels[u, lv, i] + (1 - a) * dl[lv, i] for lv, a in enumerate(params["weights"]))
                      for i in range(len(e))}
        elif kind == "liger":
            scores = {i: d[i] for i in gen + cold}
        else:
            scores = {}
            for i in gen + [i for i in den if i not in gen]:
                ig, idn = i in gen, i in den
                rg, rd = (gen.index(i) if ig else C), (den.index(i) if idn else C)
                if kind == "blend":
                    scores[i] = params["alpha"] * e[i] + (1 - params["alpha"]) * d[i]
                elif kind == "rrf":
                    scores[i] = (1 / (params["k0"] + 1 + rg) if ig else 0) + (1 / (params["k0"] + 1 + rd) if idn else 0)
                else:
                    f = [e[i], d[i], float(ig and idn), float(ig and not idn), math.log1p(rg) if ig else 0.0,
                         math.log1p(rd) if idn else 0.0, e[i] if ig and not idn else 0.0, d[i] if idn and not ig else 0.0]
                    scores[i] = sum(w * x for w, x in zip(params["weights"], f, strict=True))
        slow_hybrid.scores.append(scores)
        top = sorted(scores, key=lambda i: -scores[i])[:k]
        out.append(top)
        out_scores.append([scores[i] for i in top])
    return np.array(out), np.array(out_scores)


@pytest.fixture(scope="module")
def world():
    model, ids, tree = make(num_items=30, seed=3)
    with torch.no_grad():
        model.dense_head.item_table.normal_(0, 1.0)
    dec = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_candidates=C).refresh()
    h = torch.randn(40, model.config.d_model, generator=torch.Generator().manual_seed(1))
    return model, ids, dec, h


PARAMS = {"blend": {"alpha": 0.3}, "full": {"alpha": 0.7}, "levels": {"weights": [0.2, 0.9, 0.5]}, "liger": {}, "rrf": {"k0": 5.0},
          "learned": {"weights": [0.4, 0.9, 0.5, -0.3, -0.2, -0.1, 0.2, 0.3]}}


@pytest.mark.parametrize("kind", FUSIONS)
def test_the_batched_hybrid_equals_a_per_user_loop_over_the_reference_scores(world, kind: str) -> None:
    model, ids, dec, h = world
    parts = dec.parts(h, levels=kind == "levels")
    code_levels = reference_logprob(model, ids, h, per_level=True).detach().numpy()  # from a dict trie, item by item
    exact = code_levels.sum(1)
    dense = torch.stack([torch.stack([model.dense_queries(h[b]) @ v for v in dec._vectors]) for b in range(h.shape[0])])
    dense = (dense - dense.logsumexp(1, keepdim=True)).detach().numpy()
    np.testing.assert_allclose(parts.exact.numpy(), exact, atol=1e-5)
    np.testing.assert_allclose(parts.dense.numpy(), dense, atol=1e-5)
    cold = [27, 28, 29] if kind == "liger" else []
    parts = parts._replace(cold_rows=torch.tensor(cold, dtype=torch.long))
    rows, scores = fuse(kind, PARAMS[kind], parts, K)
    want, want_scores = slow_hybrid(kind, PARAMS[kind], exact, dense, cold, K, code_levels,
                                    np.asarray(model.layout.codes_to_tokens(ids.codes)))
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    # ties (reciprocal ranks tie often) keep the pool's order, generative list first, as Python's stable sort does
    assert rows.tolist() == want.tolist()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    dec.fusion = (kind, PARAMS[kind])
    res = dec.decode("hybrid", h, k=K)  # the decoder serves exactly what fuse ranks (its own cold rows: none)
    assert res.items.tolist() == ids.item_ids[fuse(kind, PARAMS[kind], dec.parts(h, levels=True), K)[0].numpy()].tolist()


def test_the_ends_of_the_full_blend_are_the_two_heads(world) -> None:
    _, _, dec, h = world
    parts = dec.parts(h)
    assert torch.equal(fuse("full", {"alpha": 1.0}, parts, K)[0], dec.decode("exact", h, k=K).items - 1)
    assert torch.equal(fuse("full", {"alpha": 0.0}, parts, K)[0], parts.dense.topk(K, dim=1).indices)


def test_liger_reaches_cold_items_the_generative_list_does_not_hold(world) -> None:
    _, _, dec, h = world
    parts = dec.parts(h)
    cold = torch.tensor([0, 1, 2])
    rows, _ = fuse("liger", {}, parts._replace(cold_rows=cold), C + 3)
    for b in range(h.shape[0]):  # every cold item joins the pool; a pool narrower than k is padded with -1
        want = set(parts.gen_rows[b].tolist()) | {0, 1, 2}
        assert set(rows[b].tolist()) - {-1} == want and (rows[b] == -1).sum() == C + 3 - len(want)
    dec.fusion = ("liger", {})
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 6\] \(the hybrid's candidates per list for fusion 'liger'.*got 7"):
        dec.decode("hybrid", h, k=C + 1)


def _parts_with_targets(world, rows: slice) -> tuple[Parts, torch.Tensor]:
    _, _, dec, h = world
    p = dec.parts(h[rows], levels=True)
    # targets: the dense head's favourite for even users, the generative head's for odd ones
    dense_top, gen_top = p.dense.argmax(1), p.exact.argmax(1)
    t = torch.where(torch.arange(p.exact.shape[0]) % 2 == 0, dense_top, gen_top)
    return p, t


def test_the_choice_is_made_on_the_selection_users_and_fit_on_the_others(world) -> None:
    p, t = _parts_with_targets(world, slice(0, 40))
    gen_top, dense_top = p.exact.argmax(1), p.dense.argmax(1)
    # fitted on users whose targets are the generative head's favourites, chosen on users who want the dense ones
    choice = choose_fusion(p, gen_top, p, dense_top)
    assert choice.table["full"]["params"] == {"alpha": 1.0} and choice.table["full"]["fit_ndcg@10"] == pytest.approx(1.0)
    select = {kind: row["select_ndcg@10"] for kind, row in choice.table.items()}
    assert choice.kind == max(select, key=select.get) and select[choice.kind] < 1.0
    assert choose_fusion(p, gen_top, p, gen_top).kind == "blend"  # other selection users, another choice (a tie: first)
    assert choice.kind != "blend"
    # every fusion's parameters maximise NDCG@10 on the fitting users (grid ends included)
    assert fit_params("full", p, dense_top) == {"alpha": 0.0}
    learned = fit_params("learned", p, t)["weights"]
    assert len(learned) == len(FEATURES) and all(math.isfinite(w) for w in learned)


def test_choose_causal_fusion_reads_validation_users_only(world, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids, dec, _ = world
    rng = np.random.default_rng(5)

    class ValidationOnlySplit:  # any look at the test split fails the test
        num_users = 40
        valid_targets = rng.integers(1, 31, size=40)
        _hist = [rng.integers(1, 31, size=int(rng.integers(1, 6))) for _ in range(40)]

        def valid_history(self, i: int) -> np.ndarray:
            return self._hist[i]

        def test_history(self, i: int) -> np.ndarray:
            raise AssertionError("the fusion was chosen with a test history")

        @property
        def test_targets(self) -> np.ndarray:
            raise AssertionError("the fusion was chosen with test targets")

    class Run:
        path, max_history, design = tmp_path, 12, "causal"

    Run.model, Run.ids = model, ids
    monkeypatch.setattr(fusion_store, "choice_key", lambda run: {"checkpoint": "c"})
    choice = fusion_store.choose_fusion(Run(), functools.partial(dec.history_parts, levels=True), ValidationOnlySplit(), num_candidates=dec.num_candidates,
                                        max_users=10, batch_size=8, seed=0)
    stored = json.loads((tmp_path / "hybrid.json").read_text())
    assert stored["fusion"] == choice.kind and stored["validation_users"] == {"fit": 10, "select": 10}
    assert fusion_store.stored_fusion(Run(), dec.num_candidates) == (choice.kind, choice.params)
    # a blend weight stored by an earlier semid (no "fusion") is not an error: the fusion is chosen again
    (tmp_path / "hybrid.json").write_text(json.dumps({"alpha": 0.3, "checkpoint": "c", "num_candidates": dec.num_candidates}))
    assert fusion_store.stored_fusion(Run(), dec.num_candidates) is None
    with pytest.raises(ValueError, match="has 1 validation user"):
        fusion_store.choose_fusion(Run(), dec.history_parts, type("One", (), {"num_users": 1})(), num_candidates=C,
                                   max_users=10, batch_size=8, seed=0)


def test_the_per_level_terms_sum_to_each_heads_score_and_each_level_is_a_distribution(world) -> None:
    model, ids, dec, h = world
    p = dec.parts(h, levels=True)
    torch.testing.assert_close(p.code_levels.sum(1), dec.parts(h).exact)  # the exact score, term by term
    dl = dense_levels(p.dense, p.item_nodes)  # (B, L, N)
    torch.testing.assert_close(dl.sum(1), p.dense, atol=1e-5, rtol=0)  # telescopes back to the dense log-softmax
    tokens = np.asarray(model.layout.codes_to_tokens(ids.codes))
    for b in range(3):  # loop over users: by plain Python
        np.testing.assert_allclose(dl[b].numpy(), slow_dense_levels(p.dense[b].numpy(), tokens), atol=1e-5)
    # each level's terms are a distribution over a node's children: siblings' probabilities sum to 1 per parent
    nodes = p.item_nodes
    for lv in range(dl.shape[1]):
        child = {int(c): int(par) for c, par in zip(nodes[:, lv + 1], nodes[:, lv], strict=True)}
        first = {int(c): i for i, c in enumerate(nodes[:, lv + 1].tolist())}  # one item per child node
        for par in set(child.values()):
            kids = [first[c] for c, q in child.items() if q == par]
            assert dl[0, lv, kids].exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_the_levels_fusion_is_the_full_blend_at_equal_weights_and_its_fit_never_loses_to_it(world) -> None:
    p, t = _parts_with_targets(world, slice(0, 40))
    L = p.code_levels.shape[1]
    for a in (0.0, 0.3, 1.0):
        rows, scores = fuse("levels", {"weights": [a] * L}, p, K)
        want_rows, want_scores = fuse("full", {"alpha": a}, p, K)
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=0)
        assert rows.tolist() == want_rows.tolist()
    full = fit_params("full", p, t)
    w = fit_params("levels", p, t)["weights"]
    assert len(w) == L and all(x in LEVEL_GRID for x in w)
    ndcg = lambda kind, params, t=t: float(ndcg_at_k(fuse(kind, params, p, 10)[0], t, 10).mean())  # noqa: E731
    assert ndcg("levels", {"weights": w}) >= ndcg("full", full)
    # where the targets are what the coarse levels of one head and the last level of the other agree on, the level-wise
    # fusion finds weights no single blend has
    dl = dense_levels(p.dense, p.item_nodes)
    mixed = (dl[:, :1].sum(1) + p.code_levels[:, 1:].sum(1)).argmax(1)  # dense for level 0, the code head after
    w = fit_params("levels", p, mixed)["weights"]
    assert ndcg("levels", {"weights": w}, mixed) == pytest.approx(1.0) and w[0] < w[1]
    assert ndcg("full", fit_params("full", p, mixed), mixed) < 0.9


def test_the_levels_fusion_scores_chunk_by_chunk_as_in_one_piece(world, monkeypatch: pytest.MonkeyPatch) -> None:
    p, t = _parts_with_targets(world, slice(0, 40))
    weights = {"weights": [0.2, 0.9, 0.5]}
    whole, whole_fit = fuse("levels", weights, p, K), fit_params("levels", p, t)
    monkeypatch.setattr(fusion, "USER_CHUNK", 7)  # 40 histories: five full chunks and one of 5
    rows, scores = fuse("levels", weights, p, K)
    assert rows.tolist() == whole[0].tolist() and torch.equal(scores, whole[1])
    assert fit_params("levels", p, t) == whole_fit
    empty = fuse("levels", weights, Parts(*(x[:0] for x in p[:3]), p.cold_rows, None, p.code_levels[:0], p.item_nodes), K)
    assert empty[0].shape == (0, K) and empty[1].shape == (0, K)


def test_the_levels_fusion_refuses_parts_without_levels_and_weights_of_another_model(world) -> None:
    _, _, dec, h = world
    with pytest.raises(ValueError, match="fusion 'levels' needs each code level's log-probabilities"):
        fuse("levels", {"weights": [0.5, 0.5, 0.5]}, dec.parts(h), K)
    with pytest.raises(ValueError, match="has 2 weights for a model of 3 code levels: choose it again"):
        fuse("levels", {"weights": [0.5, 0.5]}, dec.parts(h, levels=True), K)
    with pytest.raises(ValueError, match=r"needs `weights`: one number in \[0, 1\] per code level, got \[1.5\]"):
        check_fusion("levels", {"weights": [1.5]})


def test_check_fusion_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="`fusion` must be one of"):
        check_fusion("mean", {})
    with pytest.raises(ValueError, match=r"needs `alpha` in \[0, 1\], got 1.5"):
        check_fusion("blend", {"alpha": 1.5})
    with pytest.raises(ValueError, match="needs a finite `k0` > 0"):
        check_fusion("rrf", {"k0": 0})
    with pytest.raises(ValueError, match="needs a finite `k0` > 0"):
        check_fusion("rrf", {"k0": float("inf")})
    with pytest.raises(ValueError, match="needs `weights`: 8 finite numbers"):
        check_fusion("learned", {"weights": [1.0, float("nan")] + [0.0] * 6})


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(500)
    assert paired_bootstrap(b + 0.25, b) == pytest.approx((0.25, 0.25, 0.25))  # a constant difference: no spread
    a = b + rng.normal(0.1, 1.0, 500)
    mean, lo, hi = paired_bootstrap(a, b, seed=3)
    assert lo < mean < hi and mean == pytest.approx(float((a - b).mean()))
    assert abs((hi - lo) / 2 - 1.96 / math.sqrt(500)) < 0.03  # about the normal interval's half-width
    assert paired_bootstrap(a, b, seed=3) == (mean, lo, hi)  # seeded
    with pytest.raises(ValueError, match="non-empty per-user arrays of one shape"):
        paired_bootstrap(a, b[:10])


def test_fit_levels_keeps_start_when_nothing_improves(world):  # (a mutation audit: the tie-break was dropped unseen)
    from generator.decoding.fusion import fit_levels
    p, _ = _parts_with_targets(world, slice(0, 20))
    w = fit_levels(p, torch.full((20,), -1), start=0.5)  # no target is ever ranked: every weight ties at NDCG 0
    assert w == [0.5] * len(w)
