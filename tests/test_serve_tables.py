"""Serving memory: the model's N-row tables freed once the decoders are built leave every ranking as it was, and
16-bit serving tables (edge tables, item vectors) agree with float32 within a stated tolerance; float32 stays the
default."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import generator.decoding.paths as paths_module
from generator.decoding.causal import CausalDecoders
from generator.decoding.paths import table_product
from generator.runs.folder import load_run
from generator.runs.recommender import Recommender
from semid_cli import main
from tests.test_causal import CFG, make
from tests.test_edge_tables import grown

DECODERS = ("beam", "exact", "dense", "hybrid")
# 16-bit tables: the largest difference of an exact log-likelihood or a dense inner product from float32's on the
# tiny models below (|vector entries| up to ~2): float16 keeps 11 significant bits, bfloat16 8
TOLERANCE = {"float16": 5e-3, "bfloat16": 4e-2}


def _decoders(model: object, tree: object, ids: object, trained_tree: object = None, *, release: bool = False,
              **options: object) -> CausalDecoders:
    refresh = {"input_from_vectors": options.pop("input_from_vectors")} if "input_from_vectors" in options else {}
    dec = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=6, alpha=0.4, trained_tree=trained_tree,
                         **options)
    return dec.refresh(release=release, **refresh)


def _worlds() -> list[tuple[str, tuple]]:
    plain = make(num_items=60, seed=3, sizes=(4, 6))
    tied = make(num_items=60, seed=4, sizes=(4, 6), cfg=replace(CFG, dense_dim=CFG.d_model, id_input=True))
    model, new, tree, trained = grown(80, 12, seed=5)  # items added after training: a trained tree
    return [("plain", (*plain, None)), ("id_input", (*tied, None)), ("added", (model, new, tree, trained))]


@pytest.mark.parametrize("budget", [256 * 2**20, 64])  # whole score matrices, and chunked exact / dense top-k
def test_released_tables_leave_every_ranking_identical(budget: int) -> None:
    for label, (model, ids, tree, trained) in _worlds():
        keep = _decoders(model, tree, ids, trained, max_score_bytes=budget)
        lean_model = copy.deepcopy(model)
        lean = _decoders(lean_model, tree, ids, trained, release=True, max_score_bytes=budget)
        h = torch.randn(5, model.config.d_model, generator=torch.Generator().manual_seed(0))
        for name in DECODERS:
            a, b = keep.decode(name, h, k=6), lean.decode(name, h, k=6)
            assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores), (label, name)
            assert torch.equal(a.codes, b.codes), (label, name)
        # what was freed: every level's node vectors; the item table (where the input reads it, once the inputs are
        # frozen in one table: a small catalogue's)
        L = model.layout.num_levels
        assert all(getattr(lean_model, f"node_vec_{lv}").numel() == 0 for lv in range(L)), label
        assert all(getattr(model, f"node_vec_{lv}").numel() > 0 for lv in range(L)), label  # the kept model is whole
        assert lean_model.dense_head.item_table.numel() == 0 and model.dense_head.item_table.numel() > 0, label
        assert lean_model.released == {f"node_vec_{lv}" for lv in range(L)} | {"item_table"}
        assert lean_model._input_table is not None, label  # (the inputs: frozen)


def test_a_released_model_refuses_what_would_read_its_tables() -> None:
    model, ids, tree = make(num_items=60, seed=3, sizes=(4, 6))
    dec = _decoders(model, tree, ids, release=True)
    with pytest.raises(ValueError, match="released for serving.*load the run again"):
        dec.refresh()
    with pytest.raises(ValueError, match="node_vec_1 was released for serving"):
        model.code_logits(1, torch.zeros(2, model.config.d_model), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="item_table was released"):
        model.item_vectors()
    tied, tied_ids, tied_tree = make(num_items=30, seed=4, cfg=replace(CFG, dense_dim=CFG.d_model, id_input=True))
    with pytest.raises(ValueError, match="input reads the dense item table"):
        tied.release_tables([], item_table=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_tables_agree_with_float32_within_the_tolerance(dtype: str) -> None:
    for label, (model, ids, tree, trained) in _worlds():
        full = _decoders(model, tree, ids, trained)
        half = _decoders(model, tree, ids, trained, table_dtype=dtype)
        assert all(v.dtype == getattr(torch, dtype) for v in [*half.tables.vectors, half._vectors]), label
        assert all(b.dtype == torch.float32 for b in half.tables.biases), label
        h = torch.randn(16, model.config.d_model, generator=torch.Generator().manual_seed(1))
        tol = TOLERANCE[dtype]
        p32, p16 = full.parts(h), half.parts(h)  # every item's exact log-likelihood and dense log-softmax
        assert p16.exact.dtype == torch.float32 and p16.dense.dtype == torch.float32
        assert float((p16.exact - p32.exact).abs().max()) <= tol, label
        assert float((p16.dense - p32.dense).abs().max()) <= tol, label
        assert float((p16.exact - p32.exact).abs().max()) > 0, label  # the tables really were rounded
        for name in ("beam", "exact", "dense"):  # a ranking's scores are what float32 gives for its items, within tol
            r32, r16 = full.decode(name, h, k=5), half.decode(name, h, k=5)
            ref = (p32.exact if name != "dense" else full.model.dense_queries(h) @ full._vectors.T)
            rows = torch.searchsorted(full.item_ids, r16.items)
            torch.testing.assert_close(r16.scores, ref.gather(1, rows), rtol=0, atol=tol)
            assert float((r16.items == r32.items).float().mean()) >= 0.8, (label, name)  # near ties may swap
        chunked = _decoders(model, tree, ids, trained, table_dtype=dtype, max_score_bytes=64)  # upcast chunk by chunk
        for name in ("exact", "dense"):
            a, b = half.decode(name, h, k=5), chunked.decode(name, h, k=5)
            assert torch.equal(a.items, b.items), (label, name)
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_float32_is_the_default_and_a_bad_dtype_is_named() -> None:
    model, ids, tree = make(num_items=60, seed=3, sizes=(4, 6))
    dec = _decoders(model, tree, ids)
    assert all(v.dtype == torch.float32 for v in [*dec.tables.vectors, dec._vectors])
    with pytest.raises(ValueError, match=r"`table_dtype` must be one of \['float32', 'float16', 'bfloat16'\], got 'half'"):
        CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), table_dtype="half")


def test_table_product_upcasts_chunk_by_chunk() -> None:
    g = torch.Generator().manual_seed(2)
    q, table, bias = torch.randn(3, 8, generator=g), torch.randn(50, 8, generator=g).half(), torch.randn(50, generator=g)
    got = table_product(q, table, bias, chunk=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, q @ table.float().T + bias, rtol=1e-6, atol=1e-6)
    assert torch.equal(table_product(q, table.float(), bias), q @ table.float().T + bias)  # float32: the one product


def test_recommender_releases_only_a_model_it_owns(serve_world: dict[str, Path]) -> None:
    path = serve_world["v1"]
    given = load_run(path)
    whole = Recommender(given)  # a run given in place is left whole
    assert not given.model.released and given.model.node_vec_1.numel() > 0
    owned = Recommender.from_run(path)
    assert {"node_vec_0", "node_vec_1"} <= owned.run.model.released
    assert owned.run.tree is not None  # a small catalogue keeps its tree (the faster step there)
    hist = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    for name in DECODERS:
        a, b = whole.recommend(hist, k=5, decoder=name), owned.recommend(hist, k=5, decoder=name)
        assert all(np.array_equal(x.items, y.items) and np.array_equal(x.scores, y.scores) for x, y in zip(a, b, strict=True))
    import generator.decoding.causal as causal

    with pytest.MonkeyPatch.context() as mp:  # a "large" catalogue: the owned run drops its tree, the beam walks the index
        mp.setattr(causal, "LEAN_SERVING_ITEMS", 3)
        lean = Recommender.from_run(path)
        assert lean.run.tree is None and lean._decoders["beam"].shared.tree is None
        assert Recommender(given).run.tree is not None and given.tree is not None  # a run given in place keeps its own
        grounded = Recommender.from_run(path, decoders=["codes-grounded", "beam"])  # its decoders keep the model whole
        assert grounded.run.tree is not None and not grounded.run.model.released
        for name in DECODERS:  # the beam on the index gives the tree's items (the input read from the vectors: equal up to rounding)
            a, b = whole.recommend(hist, k=5, decoder=name), lean.recommend(hist, k=5, decoder=name)
            assert all(np.array_equal(x.items, y.items) and np.allclose(x.scores, y.scores, atol=1e-4) for x, y in zip(a, b, strict=True))
    half = Recommender.from_run(path, table_dtype="bfloat16")
    assert half._decoders["beam"].shared.tables.vectors[1].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="`release_tables` must be a bool or None, got 'yes'"):
        Recommender(given, release_tables="yes")


def test_evaluate_cli_takes_the_table_dtype(serve_world: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    import generator.runs.evaluate as evaluate_module

    built, real = [], evaluate_module.decoders_for

    def spy(run: object, names: list[str], **options: object) -> dict:
        out = real(run, names, **options)
        built.append((options["table_dtype"], options["release_tables"], out[names[0]].shared.tables.vectors[1].dtype))
        return out

    monkeypatch.setattr(evaluate_module, "decoders_for", spy)
    run = tmp_path / "run"
    shutil.copytree(serve_world["v1"], run)
    assert main(["evaluate", "--run", str(run), "--decoder", "beam", "--max-users", "20", "--table-dtype", "float16",
                 "--no-progress"]) == 0
    assert built == [("float16", True, torch.float16)]  # the loaded run's decoders: 16-bit, its model released
    out = json.loads((run / "metrics_test_beam_float16_sample20.json").read_text())  # (not the protocol's tables)
    assert out["table_dtype"] == "float16" and out["users_evaluated"] == 20
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(run), "--table-dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def _tied(seed: int, members: int = 1):  # noqa: ANN202
    """A model (or an ensemble of ``members``) whose input reads its dense item table (``id_input``), the table drawn
    at random (a fresh one may start at zero, which would hide the input's table part)."""
    from generator.models.ensemble import EnsembleGenerator

    models, ids, tree = [], None, None
    for k in range(members):  # loop over members
        model, ids, tree = make(num_items=70, seed=seed, sizes=(4, 6), cfg=replace(CFG, dense_dim=CFG.d_model, id_input=True))
        with torch.no_grad():
            torch.manual_seed(seed + k)
            model.dense_head.item_table.normal_(0, 1.0)
            model.dense_head.code_proj.weight.normal_(0, 0.5)
        models.append(model)
    return (models[0] if members == 1 else EnsembleGenerator.of(models).eval()), ids, tree


@pytest.mark.parametrize("members", [1, 2])
def test_a_served_input_read_from_the_item_vectors_equals_the_tables(members: int) -> None:
    """``input_from_vectors``: the served model frees its item table and reads each history item's table row back as
    its item vector minus the projected codes; its states (and so every decoder's ranking) are the table's up to
    float rounding, and what is freed is freed."""
    model, ids, tree = _tied(seed=6, members=members)
    keep = copy.deepcopy(model)
    dec = _decoders(model, tree, ids, release=True, input_from_vectors=True)
    hist = torch.tensor([[3, 17, 70, 1, 0, 0], [5, 0, 0, 0, 0, 0], [44, 9, 12, 61, 2, 8]])  # rows + 1, 0 padded
    lengths = torch.tensor([4, 1, 6])
    for served, own in zip(dec.model.members if members > 1 else [dec.model], keep.members if members > 1 else [keep], strict=True):
        assert served.dense_head.item_table.numel() == 0 and "item_table" in served.released
        torch.testing.assert_close(served.item_inputs(hist), own.item_inputs(hist), rtol=0, atol=2e-6)
    with torch.no_grad():
        h, h_own = model.last_hidden(hist, lengths), keep.last_hidden(hist, lengths)
    torch.testing.assert_close(h, h_own, rtol=0, atol=2e-5)
    full = _decoders(keep, tree, ids)
    for name in DECODERS:
        a, b = full.decode(name, h_own, k=6), dec.decode(name, h, k=6)
        assert torch.equal(a.items, b.items), name
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("members", [1, 2])
def test_a_served_small_catalogue_reads_its_inputs_from_one_frozen_table(members: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A released build within INPUT_TABLE_MAX_BYTES computes every item's input once (an ensemble's members' in one
    (K, N + 1, D) table) and the backbone gathers from it: the states of the model's own inputs bit for bit, the table
    read (a row changed changes the state), and the item table it replaces freed (the decoders hold the item vectors);
    no table for a build that releases nothing, or over the budget; a model moved once served drops the table and
    says it was released (its item table is gone)."""
    import generator.decoding.inputs as inputs

    model, ids, tree = _tied(seed=9, members=members)
    keep = copy.deepcopy(model).eval()
    served = _decoders(model.eval(), tree, ids, release=True).model  # (served models are in eval mode)
    table = served._input_table
    assert table is not None and table.shape == (*(() if members == 1 else (members,)), 71, CFG.d_model)
    for m in served.members if members > 1 else [served]:  # (the item table: 24.8 MB at Beauty's four members)
        assert m.dense_head.item_table.numel() == 0 and "item_table" in m.released
    hist = torch.tensor([[3, 17, 70, 1, 0, 0], [5, 0, 0, 0, 0, 0], [44, 9, 12, 61, 2, 8]])  # rows + 1, 0 padded
    lengths = torch.tensor([4, 1, 6])
    with torch.no_grad():
        want = keep.last_hidden(hist, lengths)
        assert torch.equal(served.last_hidden(hist, lengths), want)
        bump = torch.linspace(-1.0, 1.0, CFG.d_model)  # (not constant: layer norm ignores a constant shift)
        table[..., 61, :] += bump  # an item of the third history only
        moved = served.last_hidden(hist, lengths)
        assert torch.equal(moved[:2], want[:2]) and not torch.allclose(moved[2], want[2])
        table[..., 61, :] -= bump
        served.to(torch.float32)  # a move or cast drops the table; the item table it was made from is freed
        assert served._input_table is None
        with pytest.raises(ValueError, match="item_table was released for serving"):
            served.last_hidden(hist, lengths)
    assert _decoders(copy.deepcopy(keep), tree, ids).model._input_table is None  # not released
    assert _decoders(copy.deepcopy(keep).train(), tree, ids, release=True).model._input_table is None  # (item dropout)
    again = _decoders(copy.deepcopy(keep), tree, ids, release=True).model
    again.load_state_dict(copy.deepcopy(again.state_dict()))  # weights loaded: the table goes with the old ones
    assert again._input_table is None
    monkeypatch.setattr(inputs, "INPUT_TABLE_MAX_BYTES", members * 71 * CFG.d_model * 4 - 1)
    assert _decoders(copy.deepcopy(keep), tree, ids, release=True).model._input_table is None


def test_the_input_reads_the_vectors_only_where_asked_or_the_catalogue_is_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: a small catalogue freezes its inputs from its item table (rankings bit-identical to the model's own;
    the table then freed), a large one reads its input from the vectors; asking for it where the vectors do not hold the table part is refused, and a model
    so served refuses added items."""
    import generator.decoding.causal as causal

    model, ids, tree = _tied(seed=8)
    small = _decoders(copy.deepcopy(model), tree, ids, release=True)
    assert small.model._input_table is not None and small.model._input_vectors is None
    assert _decoders(copy.deepcopy(model), tree, ids).model._input_vectors is None  # not released: nothing changes
    monkeypatch.setattr(causal, "LEAN_SERVING_ITEMS", 69)  # 70 items: "large"
    large = _decoders(copy.deepcopy(model), tree, ids, release=True)
    assert large.model.dense_head.item_table.numel() == 0 and large.model._input_vectors is not None
    assert _decoders(copy.deepcopy(model), tree, ids, release=True, input_from_vectors=False).model._input_vectors is None
    plain, plain_ids, plain_tree = make(num_items=60, seed=3, sizes=(4, 6))
    with pytest.raises(ValueError, match="input_from_vectors.*cannot be read from its item vectors"):
        _decoders(plain, plain_tree, plain_ids, release=True, input_from_vectors=True)
    with pytest.raises(TypeError, match="input_from_vectors"):
        _decoders(copy.deepcopy(model), tree, ids, release=True, input_from_vectors="yes")
    with pytest.raises(ValueError, match="`input_from_vectors` frees the model's item table: it needs `release`"):
        _decoders(copy.deepcopy(model), tree, ids, input_from_vectors=True)
    with pytest.raises(ValueError, match="released for serving: add items to the run loaded again"):
        large.model.add_items(torch.as_tensor(model.item_tokens[1:3]))


def test_a_lean_build_needs_no_tree_and_equals_one_given_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A released build over LEAN_SERVING_ITEMS items never reads the prefix tree (``from_run`` builds none at 10M
    items: 1.7 GB of start-up): given None it serves what it serves when given the tree; a build that reads the tree
    refuses None; the paths made without a tree equal those checked against it."""
    import generator.decoding.causal as causal
    from generator.decoding.paths import item_paths

    model, ids, tree = make(num_items=60, seed=3, sizes=(4, 6))
    nodes, tokens = item_paths(model, None).nodes, model.item_tokens[1:]  # made without the tree: its node numbers
    walked = [torch.zeros(len(tokens), dtype=torch.long)]
    for level in range(tokens.shape[1]):  # loop over levels: each item's path walked down the tree itself
        walked.append(tree.next_nodes(walked[-1], tokens[:, level]))
    assert torch.equal(nodes, torch.stack(walked, 1))
    with pytest.raises(ValueError, match="tree and model disagree"):
        item_paths(model, make(num_items=50, seed=3, sizes=(4, 6))[2])  # a tree of other items
    with pytest.raises(ValueError, match="no prefix tree was given to a build that needs one"):
        _decoders(copy.deepcopy(model), None, ids, release=True)  # 60 items: not lean
    walks = _decoders(copy.deepcopy(model), tree, ids, release=True)  # 60 items: the beam walks the tree's masks
    monkeypatch.setattr(causal, "LEAN_SERVING_ITEMS", 10)
    with pytest.raises(ValueError, match="no prefix tree was given to a build that needs one"):
        _decoders(copy.deepcopy(model), None, ids)  # not released: the model could build again, from the tree
    without = _decoders(copy.deepcopy(model), None, ids, release=True)
    assert walks.tree is not None and without.tree is None
    h = torch.randn(5, model.config.d_model, generator=torch.Generator().manual_seed(1))
    for name in DECODERS:
        x, y = walks.decode(name, h, k=6), without.decode(name, h, k=6)
        assert torch.equal(x.items, y.items), name
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=1e-5)


def test_from_run_builds_the_tree_only_where_it_is_read(serve_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import generator.decoding.causal as causal
    import semid.tree

    built = []
    real = semid.tree.PrefixTree.from_semantic_ids.__func__
    monkeypatch.setattr(semid.tree.PrefixTree, "from_semantic_ids", classmethod(lambda cls, *a, **k: built.append(1) or real(cls, *a, **k)))
    assert Recommender.from_run(serve_world["v1"]).run.tree is not None and len(built) == 1  # small: the tree's masks
    monkeypatch.setattr(causal, "LEAN_SERVING_ITEMS", 3)
    lean = Recommender.from_run(serve_world["v1"])
    assert lean.run.tree is None and len(built) == 1  # never built
    monkeypatch.setattr(causal, "LEAN_SERVING_ITEMS", 10**6)
    walks = Recommender.from_run(serve_world["v1"])  # the same run served on its tree
    hist = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    for name in DECODERS:  # (the lean input reads the item vectors: equal up to rounding)
        a, b = walks.recommend(hist, k=5, decoder=name), lean.recommend(hist, k=5, decoder=name)
        assert all(np.array_equal(x.items, y.items) and np.allclose(x.scores, y.scores, atol=1e-4) for x, y in zip(a, b, strict=True))
    monkeypatch.setattr(causal, "LEAN_SERVING_ITEMS", 3)
    grounded = Recommender.from_run(serve_world["v1"], decoders=["codes-grounded", "beam"])  # reads the model whole
    assert grounded.run.tree is not None and len(built) == 3  # (`walks` built the second)


@pytest.mark.parametrize("members, beams", [(1, 4), (1, 40), (2, 9)])  # 40 beams > a level's prefixes: dead beams
def test_the_index_constraint_walks_the_trees_beams(members: int, beams: int) -> None:
    """The beam on the paths' prefix index (``IndexConstraint``, what a served run walks once its tree is dropped)
    keeps the tree's beams: the same tokens, nodes, scores and items, dead beams included."""
    import generator.decoding.causal as causal
    from generator.decoding.beam import IndexConstraint, TreeConstraint, leaf_items, search
    from generator.decoding.causal import CausalLevels, EdgeLevels
    from tests.test_ensemble import two_members

    if members == 1:
        model, ids, tree = make(num_items=30, seed=2, sizes=(3, 4))
    else:
        _, model, ids, tree, _ = two_members()
    dec = _decoders(model, tree, ids)
    h = torch.randn(4, members * model.config.d_model, generator=torch.Generator().manual_seed(2))
    L = model.layout.num_levels
    on_tree = TreeConstraint(tree, 4, h.device)
    on_index = IndexConstraint(dec.paths.index, dec._lo, 4, h.device, dec.item_ids)
    a = search(EdgeLevels(dec, h, on_tree), on_tree, num_beams=beams, steps=L)
    b = search(EdgeLevels(dec, h, on_index), on_index, num_beams=beams, steps=L)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    with pytest.MonkeyPatch.context() as mp:  # every level read whole by (parent, code), as a full level of millions is
        mp.setattr(paths_module, "DENSE_LEVEL_FILL", 0.0)
        dec.dense = paths_module.dense_levels(dec.paths.index, dec.edge_slots, [hi - lo for lo, hi in map(
            model.layout.level_range, range(L))])
    assert all(t is not None for t in dec.dense[0]) and all(t is not None for t in dec.dense[1])
    on_dense = IndexConstraint(dec.paths.index, dec._lo, 4, h.device, dec.item_ids, dec.dense[0])
    c = search(EdgeLevels(dec, h, on_dense), on_dense, num_beams=beams, steps=L)
    for x, y in zip(a, c, strict=True):
        if x.is_floating_point():  # (the gathers' products in other chunks: float rounding)
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        else:
            assert torch.equal(x, y)
    # a backbone whose logits cover the whole window (the model's own code head): the constraint's mask decides
    on_tree, on_index = TreeConstraint(tree, 4, h.device), IndexConstraint(dec.paths.index, dec._lo, 4, h.device, dec.item_ids)
    with torch.no_grad():
        full = [search(CausalLevels(model, h), c, num_beams=beams, steps=L) for c in (on_tree, on_index)]
    for x, y in zip(*full, strict=True):
        assert torch.equal(x, y)
    assert bool((a.nodes < 0).any()) == (beams == 40)
    k = int(a.finished.sum(1).min())
    assert torch.equal(leaf_items(a, tree, k), leaf_items(b, on_index, k))
    kept = _decoders(copy.deepcopy(model), tree, ids, release=True)
    assert kept.tree is tree  # a small catalogue keeps its tree
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(causal, "LEAN_SERVING_ITEMS", 3)
        served = _decoders(copy.deepcopy(model), tree, ids, release=True)
    assert served.tree is None
    assert len(served.dense[0]) == L and kept.dense == ([], [])  # full-level tables only where the beam walks the index
    index = served.paths.index  # the serving copy: rows, codes, spans and child runs as int32, keys int64
    assert all(getattr(index, n).dtype == torch.int32 for n in ("order", "_start", "_stop", "node"))
    assert all(x.dtype == torch.int32 for n in ("parent", "code", "first_item", "child_start") for x in getattr(index, n))
    assert all(x.dtype == torch.int64 for x in index.keys)
    rows = IndexConstraint(index, dec._lo, 4, h.device).leaf_items(b.nodes[:, :k])  # no values: item rows, int64
    assert rows.dtype == torch.int64 and torch.equal(dec.item_ids[rows], leaf_items(a, tree, k))
    if beams > model.num_items:  # more beams than items: a search's case, a decoder's refusal
        return
    torch.testing.assert_close(served.decode("beam", h, k=k, num_beams=beams).scores, a.logp[:, :k])
    assert torch.equal(served.decode("beam", h, k=k, num_beams=beams).items, leaf_items(a, tree, k))
