"""The hybrid's fusions: the fast, batched decoder against a per-user loop over a brute-force reference, the choice
made on validation users only, and the paired bootstrap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import generator.runs.fusion_store as fusion_store
from generator.decoding.causal import CausalDecoders
from generator.decoding.fusion import FEATURES, FUSIONS, Parts, check_fusion, choose_fusion, fit_params, fuse
from semid.metrics import paired_bootstrap
from tests.test_causal import make, reference_logprob

C, K = 6, 5


def slow_hybrid(kind: str, params: dict, exact: np.ndarray, dense: np.ndarray, cold: list[int], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per user, by plain Python: the two top-C lists, the pool, each candidate's score; (rows, scores) of the top k."""
    out, out_scores = [], []
    slow_hybrid.scores = []  # per user, every pool candidate's score (for ties)
    for e, d in zip(exact, dense, strict=True):  # loop over users
        gen = sorted(range(len(e)), key=lambda i: -e[i])[:C]
        den = sorted(range(len(d)), key=lambda i: -d[i])[:C]
        if kind == "full":
            scores = {i: params["alpha"] * e[i] + (1 - params["alpha"]) * d[i] for i in range(len(e))}
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


PARAMS = {"blend": {"alpha": 0.3}, "full": {"alpha": 0.7}, "liger": {}, "rrf": {"k0": 5.0},
          "learned": {"weights": [0.4, 0.9, 0.5, -0.3, -0.2, -0.1, 0.2, 0.3]}}


@pytest.mark.parametrize("kind", FUSIONS)
def test_the_batched_hybrid_equals_a_per_user_loop_over_the_reference_scores(world, kind: str) -> None:
    model, ids, dec, h = world
    parts = dec.parts(h)
    exact = reference_logprob(model, ids, h).detach().numpy()  # every item's log-likelihood from a dict trie, item by item
    dense = torch.stack([torch.stack([model.dense_queries(h[b]) @ v for v in dec._vectors]) for b in range(h.shape[0])])
    dense = (dense - dense.logsumexp(1, keepdim=True)).detach().numpy()
    np.testing.assert_allclose(parts.exact.numpy(), exact, atol=1e-5)
    np.testing.assert_allclose(parts.dense.numpy(), dense, atol=1e-5)
    cold = [27, 28, 29] if kind == "liger" else []
    parts = parts._replace(cold_rows=torch.tensor(cold, dtype=torch.long))
    rows, scores = fuse(kind, PARAMS[kind], parts, K)
    want, want_scores = slow_hybrid(kind, PARAMS[kind], exact, dense, cold, K)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    # ties (reciprocal ranks tie often) keep the pool's order, generative list first, as Python's stable sort does
    assert rows.tolist() == want.tolist()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    dec.fusion = (kind, PARAMS[kind])
    res = dec.decode("hybrid", h, k=K)  # the decoder serves exactly what fuse ranks (its own cold rows: none)
    assert res.items.tolist() == ids.item_ids[fuse(kind, PARAMS[kind], dec.parts(h), K)[0].numpy()].tolist()


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
    p = dec.parts(h[rows])
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
    choice = fusion_store.choose_fusion(Run(), dec.history_parts, ValidationOnlySplit(), num_candidates=dec.num_candidates,
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
