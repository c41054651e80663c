"""The decoders' edge tables at scale: built in chunks they equal the one-pass build bit for bit; each edge's
node-vector row, found by key, is the one a loop over the model's padded children tables finds; the beam step reads
each beam's children as a CSR run and gives the padded step's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import generator.decoding.causal as causal_decoding
import generator.decoding.paths as paths_module
from generator.decoding.beam import TreeConstraint
from generator.decoding.causal import CausalDecoders, EdgeLevels, edge_tables, item_paths
from generator.decoding.chunked import item_vectors
from generator.models.causal import CausalGenerator
from semid.ids import SemanticIDs
from semid.prefix_index import prefix_key
from semid.tree import PrefixTree
from tests.test_causal import make


def grown(num_items: int, added: int, seed: int) -> tuple[CausalGenerator, SemanticIDs, PrefixTree, PrefixTree]:
    """A model with node vectors over ``num_items`` items and ``added`` items added after training (prefixes it has
    no node vectors for): (model, IDs, their tree, the trained items' tree)."""
    model, ids, trained_tree = make(num_items=num_items, seed=seed, sizes=(4, 6))
    rng = np.random.default_rng(seed)
    new = ids.add_items(rng.integers(0, (4, 6), size=(added, 2)), np.arange(10_000, 10_000 + added))
    model.add_items(torch.as_tensor(model.layout.codes_to_tokens(new.codes[-added:])))
    return model, new, PrefixTree.from_semantic_ids(new, model.layout), trained_tree


@pytest.fixture
def one_thread():
    """One torch thread: one BLAS path per product shape (several threads may split a product, and round, otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_edge_tables_built_in_chunks_are_bit_identical_to_one_pass(chunk: int, one_thread: None) -> None:
    model, _, tree = make(num_items=150, seed=2, sizes=(4, 6))
    paths = item_paths(model, tree)
    assert max(int(a.numel()) for a in paths.active) > 2 * chunk  # several chunks, the last one overlapping
    whole, parts = edge_tables(model, paths, chunk=10**9), edge_tables(model, paths, chunk=chunk)
    for level in range(model.layout.num_levels):
        assert torch.equal(parts.vectors[level], whole.vectors[level]), level
        assert torch.equal(parts.biases[level], whole.biases[level]), level
    torch.set_num_threads(2)  # with more threads: the same tables up to rounding
    parts = edge_tables(model, paths, chunk=chunk)
    for level in range(model.layout.num_levels):
        torch.testing.assert_close(parts.vectors[level], whole.vectors[level], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(parts.biases[level], whole.biases[level], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_item_vectors_built_in_chunks_are_bit_identical_to_one_pass(chunk: int, one_thread: None) -> None:
    model, _, _ = make(num_items=150, seed=2, sizes=(4, 6))
    with torch.no_grad():
        whole = model.item_vectors()
    assert torch.equal(item_vectors(model, chunk=chunk), whole)


def test_edge_tables_refuse_a_bad_chunk() -> None:
    model, _, tree = make(num_items=10)
    with pytest.raises(ValueError, match="`chunk` must be a positive int, got 0"):
        edge_tables(model, item_paths(model, tree), chunk=0)


def test_each_edges_node_vector_row_is_the_padded_tables_match() -> None:
    model, ids, _, _ = grown(num_items=40, added=6, seed=5)
    layout, sizes = model.layout, model.layout.codebook_sizes
    rng = np.random.default_rng(0)
    codes = ids.codes  # every item's path, and probes: random prefixes and codes, some unknown, some out of range
    probes = np.concatenate([codes, rng.integers(0, np.array(sizes) + 1, size=(200, len(sizes)))])
    for level in range(layout.num_levels):
        parents = [tuple(p) for p in probes[:, :level].tolist()]
        keys = getattr(model, f"parent_keys_{level}").tolist()
        table_codes, table_index = getattr(model, f"child_codes_{level}").tolist(), getattr(model, f"child_index_{level}").tolist()
        want = []
        for parent, code in zip(parents, probes[:, level].tolist(), strict=True):  # the padded tables, by a loop
            key = int(prefix_key(np.array(parent, dtype=np.int64).reshape(1, level), sizes)[0])
            r = keys.index(key) if key >= 0 and key in keys else -1
            want.append(table_index[r][table_codes[r].index(code)] if r >= 0 and code in table_codes[r] else -1)
        offsets = torch.tensor(layout.level_offsets[:level])
        tokens = torch.as_tensor(probes[:, :level]) + offsets
        got = model.edge_node_rows(level, tokens, torch.as_tensor(probes[:, level]))
        assert got.tolist() == want, level
        assert (got < 0).any() and (got >= 0).any()


@pytest.mark.parametrize("dense_factor, pair_chunk, fused", [(0, None, False), (0, 5, False), (10**9, None, False),
                                                            (0, None, True)])
def test_the_csr_beam_step_gives_the_padded_steps_logits(dense_factor: int, pair_chunk: int | None, fused: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the padded form (each node's children padded to the level's largest degree) written out here as the reference;
    # dense_factor 0: every level gathers its pairs' vectors (pair_chunk: a few at a time; fused: with the compiled
    # kernel, as decoders over a large catalogue do); 10**9: every level is one product over its edges
    if pair_chunk:
        monkeypatch.setattr(causal_decoding, "PAIR_CHUNK", pair_chunk)
    calls: list[bool] = []
    if fused:
        if causal_decoding.fused_pairs() is None:
            pytest.skip("torch.compile cannot build the fused kernel on this machine")
        torch._dynamo.reset()  # (at most 8 compiled forms per function in a process: the tests compile more)
        monkeypatch.setattr(paths_module, "FALLBACKS", [0])
        monkeypatch.setattr(causal_decoding, "FUSED_MIN_ITEMS", 0)
        monkeypatch.setattr(causal_decoding, "FUSED_MIN_PAIRS", 0)
        real = causal_decoding.pair_dots
        monkeypatch.setattr(causal_decoding, "pair_dots", lambda *a, **kw: calls.append(kw["fused"]) or real(*a, **kw))
    model, ids, tree, trained_tree = grown(num_items=60, added=4, seed=7)
    dec = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), trained_tree=trained_tree).refresh()
    assert dec.fused_pairs == fused
    h = torch.randn(3, model.config.d_model, generator=torch.Generator().manual_seed(1))
    index, m = dec.paths.index, 4
    for level in range(model.layout.num_levels):
        depth_nodes = torch.arange(int(index.offsets[level]), int(index.offsets[level + 1]))
        nodes = depth_nodes[torch.randint(0, depth_nodes.numel(), (3 * m,), generator=torch.Generator().manual_seed(level))]
        nodes[1] = -1  # a dead beam
        constraint = TreeConstraint(tree, 3 * m, h.device)
        constraint.nodes = nodes
        with torch.inference_mode():  # (as decoding runs)
            got = EdgeLevels(dec, h, constraint, dense_factor=dense_factor).logits(level, None, m, None)
        lo, hi = model.layout.level_range(level)
        want = torch.full((3 * m, hi - lo), float("-inf"))
        node = (nodes - index.offsets[level]).clamp_min(0)
        child, codes = index.child_index[level][node], index.child_codes[level][node]  # (R, W) padded
        vectors, A = dec.tables.vectors[level], dec.tables.vectors[level].shape[0]
        slot = torch.where(child >= 0, dec.edge_slots[level][child.clamp_min(0)], A)
        hq = model.level_queries(h)[:, level]
        edge = torch.zeros(child.shape)
        if A:
            row = slot.clamp_max(A - 1)
            if dense_factor:  # exact scoring's product, read per (beam, child)
                logit = (hq @ vectors.T + dec.tables.biases[level])[torch.arange(3 * m)[:, None] // m, row]
            else:
                logit = (vectors[row] @ hq.repeat_interleave(m, 0)[:, :, None]).squeeze(-1) + dec.tables.biases[level][row]
            edge = torch.where(slot < A, logit, 0.0)
        for r in range(3 * m):
            for j in range(child.shape[1]):
                if nodes[r] >= 0 and codes[r, j] >= 0:
                    want[r, codes[r, j]] = edge[r, j]
        if dense_factor:  # the product's numbers, read as they are
            assert torch.equal(got, want), level
        else:  # the gathers' products (pair_dots: one product per chunk where its histories have many pairs)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        other = EdgeLevels(dec, h, constraint, dense_factor=10**9 - dense_factor).logits(level, None, m, None)
        torch.testing.assert_close(other, got, atol=1e-5, rtol=0)  # the two forms agree up to float rounding
    assert (calls and all(calls)) if fused else not any(calls)  # the gathers went through the kernel
    if fused:  # and through forms the build compiled: for several users and for one, nothing compiled again
        monkeypatch.setattr(causal_decoding, "FUSED_STEP_FACTOR", 0)  # (every level gathers, none takes the product)
        calls.clear()
        with torch.compiler.set_stance("fail_on_recompile"):
            many, one = dec.decode("beam", torch.randn(7, h.shape[1]), k=5), dec.decode("beam", h[:1], k=5)
        assert calls and all(calls) and paths_module.FALLBACKS[0] == 0
        monkeypatch.setattr(causal_decoding, "FUSED_MIN_PAIRS", 1 << 30)  # the chunks: the same items
        assert torch.equal(dec.decode("beam", h[:1], k=5).items, one.items) and many.items.shape == (7, 5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("members", [1, 2])
def test_the_decoders_tables_are_stored_for_their_product(dtype: str, members: int) -> None:
    """Every table a decoder multiplies by (edge tables, item vectors, one model's or an ensemble's) keeps its
    storage (..., D, A) contiguous: ``q @ table.mT`` then reads a contiguous operand, the layout BLAS runs 2-4x faster
    for a few queries (``experiments/results/latency_layout.md``). Rows still read as rows."""
    from generator.decoding.paths import product_layout, table_product
    from tests.test_ensemble import two_members

    if members == 1:
        model, ids, tree = make(num_items=150, seed=2, sizes=(4, 6))
    else:
        _, model, ids, tree, _ = two_members()
    dec = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids), table_dtype=dtype).refresh()
    tables = [v for v in dec.tables.vectors if v.shape[-2]] + [dec._vectors]
    for table in tables:
        assert table.mT.is_contiguous() and not table.is_contiguous(), table.shape
        assert table.dtype == getattr(torch, dtype)
    for chunk in (7, 10**6):  # built in chunks or in one pass
        assert item_vectors(model if members == 1 else model.members[0], chunk, dtype=dtype).mT.is_contiguous()
    q = torch.randn(*tables[0].shape[:-2], 3, tables[0].shape[-1])
    for table in tables[:1]:
        want = q @ table.float().contiguous().mT
        torch.testing.assert_close(table_product(q, table), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(table_product(q, table, chunk=3), want, rtol=1e-5, atol=1e-5)
    rowmajor = torch.randn(5, 4)
    stored = product_layout(rowmajor)
    assert torch.equal(stored, rowmajor) and stored.mT.is_contiguous() and product_layout(stored) is stored


def test_tables_over_the_row_limit_stay_row_major_and_rank_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of more than ``PRODUCT_MAX_ROWS`` rows is read by rows (the beam's children, chunked exact's items):
    it stays row-major, and every decoder ranks as with the product layout."""
    import generator.decoding.paths as paths_mod
    from tests.test_ensemble import two_members

    _, model, ids, tree, _ = two_members()
    h = torch.randn(3, model.members[0].config.d_model * 2)
    want = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids)).refresh()
    monkeypatch.setattr(paths_mod, "PRODUCT_MAX_ROWS", 5)
    got = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids)).refresh()
    for table in [v for v in got.tables.vectors if v.shape[-2] > 5] + [got._vectors]:
        assert table.is_contiguous(), table.shape
    small = [v for v in got.tables.vectors if 0 < v.shape[-2] <= 5]
    assert small and all(v.mT.is_contiguous() for v in small)  # the root's few edges: still for the product
    for name in ("beam", "exact", "dense"):
        a, b = want.decode(name, h, k=10), got.decode(name, h, k=10)
        assert torch.equal(a.items, b.items), name
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_an_ensembles_exact_counts_its_members_rows_against_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact scoring holds K x B x A_l floats for an ensemble of K: a batch whose (B, N) scores fit the budget but
    whose K x B rows do not goes through the chunked path, with the same ranking."""
    import generator.decoding.causal as causal
    from generator.decoding.chunked import FLOAT_BYTES
    from tests.test_ensemble import two_members

    _, model, ids, tree, _ = two_members()
    N, B = len(ids.item_ids), 4
    h = torch.randn(B, model.members[0].config.d_model * 2)
    whole = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids)).refresh().decode("exact", h, k=10)
    chunked = []
    real = causal.exact_topk
    monkeypatch.setattr(causal, "exact_topk", lambda *a, **kw: chunked.append(1) or real(*a, **kw))
    budget = 2 * B * N * FLOAT_BYTES  # B rows fit, 2 x B do not
    got = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids), max_score_bytes=budget).refresh().decode("exact", h, k=10)
    assert chunked == [1]
    assert torch.equal(got.items, whole.items)


@pytest.fixture
def fresh_kernel():
    """The fused kernel with no compiled forms yet (torch keeps at most 8 per function in a process: the tests
    here compile more), and the fallback count at 0."""
    import generator.decoding.paths as paths

    if paths.fused_pairs() is None:
        pytest.skip("torch.compile cannot build the fused kernel on this machine (the chunked form is tested)")
    torch._dynamo.reset()
    paths.FALLBACKS[0] = 0
    yield paths
    torch._dynamo.reset()


@pytest.mark.parametrize("members", [0, 2])
def test_pair_dots_is_each_pairs_own_product_in_either_form(members: int) -> None:
    """``pair_dots``: each (beam, child) pair's table row times its history's query (plus its row's bias), against a
    float64 reference, with chunks whose histories have many pairs each (one product per chunk) and few (a product
    per pair), from a 16-bit table too; an ensemble's members apart."""
    from generator.decoding.paths import pair_dots

    hq, t32, bias, rows, hist = pairs_case(members)
    for t in (t32, t32.to(torch.bfloat16)):
        for chunk in (7, 16, 41, 1000):  # 7: one to two histories a chunk; 1000: all 14 at once (a product per pair)
            got = pair_dots(hq, t, rows, hist, chunk=chunk)
            assert got.dtype == torch.float32 and got.shape == (*t.shape[:-2], hist.numel())
            torch.testing.assert_close(got.double(), pairs_reference(hq, t, None, rows, hist), atol=1e-5, rtol=0)
        got = pair_dots(hq, t, rows, hist, chunk=16, bias=bias)
        torch.testing.assert_close(got.double(), pairs_reference(hq, t, bias, rows, hist), atol=1e-5, rtol=0)


@pytest.mark.parametrize("members", [0, 2])
def test_pair_dots_of_one_history_is_each_pairs_own_product(members: int) -> None:
    """A single user's call (one history: its pairs in one product, no pick per pair) gives what the chunks give."""
    from generator.decoding.paths import pair_dots

    hq, t32, bias, rows, _ = pairs_case(members)
    one, hist = hq[..., 4:5, :], torch.zeros_like(rows)
    for t in (t32, t32.to(torch.bfloat16)):
        for chunk in (7, 1000):  # 7: chunked; 1000: all pairs at once (the single history's one product)
            for b in (None, bias):
                got = pair_dots(one, t, rows, hist, chunk=chunk, bias=b)
                assert got.dtype == torch.float32 and got.shape == (*t.shape[:-2], hist.numel())
                torch.testing.assert_close(got.double(), pairs_reference(one, t, b, rows, hist), atol=1e-5, rtol=0)

def pairs_reference(hq: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                    hist: torch.Tensor) -> torch.Tensor:
    """The pairs' logits in float64, one by one in effect: -inf for a row < 0 (no child), 0 for a row past the table
    (an only child), else the row's vector times its history's query, plus its bias."""
    A, row = table.shape[-2], rows.clamp(0, table.shape[-2] - 1)
    dot = (table.double()[..., row, :] * hq.double()[..., hist, :]).sum(-1)
    dot = dot if bias is None else dot + bias.double()[..., row]
    return torch.where(rows < 0, float("-inf"), torch.where(rows >= A, 0.0, dot))


def pairs_case(members: int) -> tuple[torch.Tensor, ...]:
    """hq (14, 16), a table (500, 16) and biases, an ensemble's with a leading (members,); rows and their histories:
    wide and narrow runs of pairs per history, one history with none."""
    g = torch.Generator().manual_seed(3)
    lead = (members,) if members else ()
    hq, table = torch.randn(*lead, 14, 16, generator=g), torch.randn(*lead, 500, 16, generator=g)
    bias = torch.randn(*lead, 500, generator=g)
    per = torch.tensor([40, 1, 0, 3, 60, 2, 1, 1, 1, 1, 1, 1, 1, 2])
    hist = torch.repeat_interleave(torch.arange(14), per)
    rows = torch.randint(0, 500, (hist.numel(),), generator=g)
    rows[[5, 41, 50]], rows[[6, 60]] = -1, 500  # no child (-inf), an only child (no table row: 0)
    return hq, table, bias, rows, hist


@pytest.mark.parametrize("members", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernel_runs_the_forms_warm_fused_compiled_and_no_other(members: int, dtype: torch.dtype,
                                                                           fresh_kernel) -> None:
    """After ``warm_fused`` on a table, ``pair_dots(fused=True)`` runs the compiled kernel (no fallback, nothing
    compiled again) for many histories and for one, with the float64 reference's numbers; a form it did not compile
    (another table dtype) takes the chunks, counted, with the same numbers."""
    paths = fresh_kernel
    hq, t, bias, rows, hist = pairs_case(members)
    t = t.to(dtype)
    assert paths.warm_fused(t, bias)
    want = pairs_reference(hq, t, bias, rows, hist)
    with torch.inference_mode():  # as a beam step calls it: its queries (a strided view) and indices made in the mode
        strided, rows, hist = torch.stack([hq, -hq], -2)[..., 0, :], rows.clone(), hist.clone()
        got = paths.pair_dots(strided, t, rows, hist, chunk=16, bias=bias, fused=True)
        one = paths.pair_dots(hq[..., 3:4, :].clone(), t, rows[:5], torch.zeros(5, dtype=torch.long), chunk=16,
                              bias=bias, fused=True)
        assert paths.FALLBACKS[0] == 0
        other = paths.pair_dots(hq.clone(), t.to(torch.float16), rows, hist, chunk=16, bias=bias, fused=True)
        assert paths.FALLBACKS[0] == 1  # a table dtype not warmed: the chunks
        with paths._KERNEL_LOCK:  # another thread in the kernel, or a build compiling it: the chunks, no waiting
            busy = paths.pair_dots(strided, t, rows, hist, chunk=16, bias=bias, fused=True)
        assert paths.FALLBACKS[0] == 2
    torch.testing.assert_close(busy.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.double(), pairs_reference(hq[..., 3:4, :], t, bias, rows[:5], torch.zeros(5, dtype=torch.long)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(other.double(), want, atol=2e-2, rtol=0)


def test_fused_pairs_is_off_by_the_environment_or_where_it_cannot_compile(monkeypatch, caplog) -> None:
    """``SEMID_FUSED_GATHERS=0`` turns the kernel off without trying; a failing ``torch.compile`` (no compiler) gives
    one warning and no kernel, and ``pair_dots(fused=True)`` then takes the chunks: the same numbers."""
    import generator.decoding.paths as paths

    g = torch.Generator().manual_seed(0)
    hq, table = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    rows, hist = torch.tensor([4, 0, 19, 7]), torch.tensor([0, 0, 1, 2])
    want = paths.pair_dots(hq, table, rows, hist, chunk=2)
    monkeypatch.setattr(paths, "_FUSED", [])
    monkeypatch.setenv("SEMID_FUSED_GATHERS", "0")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled although turned off"))
    assert paths.fused_pairs() is None
    monkeypatch.setattr(paths, "_FUSED", [])
    monkeypatch.delenv("SEMID_FUSED_GATHERS")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level("WARNING", logger="generator.decoding.paths"):
        assert paths.fused_pairs() is None and paths.fused_pairs() is None  # tried once
        assert torch.equal(paths.pair_dots(hq, table, rows, hist, chunk=2, fused=True), want)
    assert len(caplog.records) == 1 and "No working C++ compiler found" in caplog.text and "more" not in caplog.text


def test_a_compile_failing_after_the_probe_leaves_the_decoders_on_the_chunks(monkeypatch, caplog) -> None:
    """A kernel whose compile fails for the decoders' tables (after the probe passed: another dtype, a device without
    a compiler) makes ``warm_fused`` warn and answer False (the build goes on without it), and a call that fails
    inside the kernel takes the chunks: the same numbers, counted."""
    import generator.decoding.paths as paths

    def failing(*args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: inductor cannot build this\ndetails")

    monkeypatch.setattr(paths, "_FUSED", [failing])
    monkeypatch.setattr(paths, "FALLBACKS", [0])
    hq, table, bias, rows, hist = pairs_case(0)
    with caplog.at_level("WARNING", logger="generator.decoding.paths"):
        assert not paths.warm_fused(table, bias)
        got = paths.pair_dots(hq, table, rows, hist, chunk=16, bias=bias, fused=True)
    assert "inductor cannot build this" in caplog.text and "details" not in caplog.text and paths.FALLBACKS == [1]
    torch.testing.assert_close(got, paths.pair_dots(hq, table, rows, hist, chunk=16, bias=bias))


def test_a_lean_build_runs_every_step_through_the_kernel_for_one_user_and_many(fresh_kernel,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A lean served build (prefix index, every level read whole by parent and code) over a catalogue that takes the
    fused kernel: one user's beam (a single row at the first step: its histories a view of one value) and a batch's
    run the compiled forms, none falls back to the chunks; the same items as the build without the kernel."""
    paths = fresh_kernel
    monkeypatch.setattr(causal_decoding, "LEAN_SERVING_ITEMS", 3)
    monkeypatch.setattr(causal_decoding, "FUSED_MIN_ITEMS", 3)
    monkeypatch.setattr(causal_decoding, "FUSED_MIN_PAIRS", 0)
    monkeypatch.setattr(causal_decoding, "FUSED_STEP_FACTOR", 0)  # every step gathers (none takes the product)
    monkeypatch.setattr(paths, "DENSE_LEVEL_FILL", 0.0)
    model, ids, tree = make(num_items=60, seed=3, sizes=(4, 6))
    import copy

    built = {fused: CausalDecoders(copy.deepcopy(model), tree, torch.from_numpy(ids.item_ids), num_beams=6)
             for fused in (True, False)}
    for fused, dec in built.items():
        dec.refresh(release=True)
        dec.fused_pairs = dec.fused_pairs and fused
    assert built[True].tree is None and built[True].fused_pairs and all(t is not None for t in built[True].dense[0])
    for B in (1, 5):
        h = torch.randn(B, model.config.d_model, generator=torch.Generator().manual_seed(B))
        got, want = (built[f].decode("beam", h, k=4) for f in (True, False))
        assert torch.equal(got.items, want.items)
    assert paths.FALLBACKS[0] == 0
