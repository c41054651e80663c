"""The Python API's int arguments take numpy's ints (``np.int64`` read from an array) as Python's, and refuse a bool
(``True`` is no count) like any other bad value: one case per checked argument (``semid.safe_read.is_int``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from generator.decoding.chunked import check_budget
from generator.decoding.cold import ColdStartBeam
from generator.decoding.mips import MIPSIndex, dense_index
from generator.decoding.titles import title_beam_search
from generator.models.dense_loss import sample_candidates
from generator.serving.batcher import MicroBatcher
from generator.t5.beam import beam_search
from generator.t5.data import training_examples
from generator.training.causal_data import eval_batches, training_windows
from generator.training.datamodules import ShardedDataModule
from generator.training.resume import ResumePoints, SignalGuard
from generator.training.sampling import BucketBatchSampler
from semid.data import Catalogue
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.prepare import prepare_csv
from semid.processor import PrefixTreeLogitsProcessor
from semid.titles import TitleIndex, TitleTokenizer
from semid.tree import PrefixTree
from tests.test_beam import make_batch, make_ids, make_model
from tests.test_cold_beam import COLD, WARM, FixedBeam
from tests.test_generator_helpers import random_ids
from tests.test_titles import WordTokenizer, tiny_title_model


# ---- tiny objects, built once --------------------------------------------------------------------------------------
@cache
def _ids() -> SemanticIDs:
    return random_ids(8)


@cache
def _one_token_tree() -> PrefixTree:
    return PrefixTree.from_sequences([[0]], [5], 2)


@cache
def _cold_ids() -> SemanticIDs:
    warm = SemanticIDs.from_codes(np.array(list(WARM.values())), (4, 4, 4), extra_level_size=2)
    return warm.add_items(np.array(list(COLD.values())), np.array(list(COLD)))


@cache
def _t5() -> tuple[Any, ...]:
    ids = make_ids(3, num_items=10, seed=0)
    layout = ids.layout(num_user_tokens=3)
    input_ids, mask = make_batch(layout, B=3, S=4, seed=0)
    return make_model(layout, "tied"), input_ids, mask, PrefixTree.from_semantic_ids(ids, layout), layout


@cache
def _title_model() -> tuple[Any, ...]:
    model, index, _ = tiny_title_model()
    return model, index, torch.randn(3, 16, generator=torch.Generator().manual_seed(0))


@cache
def _vecs() -> torch.Tensor:
    return torch.randn(40, 4, generator=torch.Generator().manual_seed(0))


def _sequences() -> list[np.ndarray]:
    return [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 1])]


def _prepare(n: object, tmp: Path) -> dict[str, Any]:
    inter = tmp / "inter.csv"
    inter.write_text("user,item,timestamp\nu1,a,1\nu1,b,2\nu2,a,3\nu2,b,4\nu3,c,5\n")
    out = tmp / f"out{len(list(tmp.iterdir()))}"
    report = prepare_csv(inter, None, out, kcore=n)
    return {k: v for k, v in dataclasses.asdict(report).items() if k != "out"}


def _title_beam(**kw: object) -> Any:
    model, index, h = _title_model()
    with torch.no_grad():
        return title_beam_search(model, h, **kw)


def _mips(kind: str, **kw: object) -> Any:
    b = MIPSIndex.build(_vecs(), kind=kind, **kw)._backend
    if kind == "faiss-hnsw":  # (the graph is built by several threads: its searches are not compared)
        return b.hnsw.efSearch, b.hnsw.nb_neighbors(1)
    return b.nlist, b.nprobe, b.search(_vecs()[:3].numpy(), 3)


def _datamodule(**kw: int) -> tuple[int, int]:
    dm = ShardedDataModule(None, None, max_history=5, val_users=None, seed=0, bucket_batches=2, **kw)  # type: ignore[arg-type]
    return dm.batch_size, dm.eval_batch_size


def _cold(**kw: object) -> Any:
    cb = ColdStartBeam(FixedBeam(), _cold_ids(), np.array(list(COLD)), **kw)
    return cb.prefix_levels, cb.max_per_prefix, cb.cold_items, cb.cold_codes


# (argument, good value, call(value, tmp_path) -> what the value decides)
CASES: dict[str, tuple[str, int, Callable[[object, Path], Any]]] = {
    "SemanticIDs.from_codes": ("extra_level_size", 3, lambda n, _: (lambda i: (i.codebook_sizes, i.codes))(
        SemanticIDs.from_codes(np.array([[0, 0], [0, 1], [1, 0]]), (2, 2), extra_level_size=n))),
    "SemanticIDs.head": ("num_items", 2, lambda n, _: (lambda i: (i.codes, i.item_ids))(_ids().head(n))),
    "PrefixTree.from_sequences": ("vocab_size", 2, lambda n, _: (lambda t: (t.vocab_size, t.num_nodes, t.node_value))(
        PrefixTree.from_sequences([[0]], [5], n))),
    "PrefixTreeLogitsProcessor": ("prefix_start", 1, lambda n, _: (lambda p: (p.prefix_start, p(
        torch.tensor([[2, 0]]), torch.zeros(1, 2))))(PrefixTreeLogitsProcessor(_one_token_tree(), n))),
    "Catalogue.title_of": ("item_id", 2, lambda n, _: Catalogue(
        np.arange(1, 4), ["a", "b", "c"], ["A", "B", "C"], [[], [], []]).title_of(n)),
    "TokenLayout.codebook_sizes": ("codebook_sizes[0]", 3, lambda n, _: dataclasses.astuple(TokenLayout((n, 4)))),
    "TokenLayout.num_user_tokens": ("num_user_tokens", 1, lambda n, _: dataclasses.astuple(TokenLayout((3, 4), n))),
    "TitleTokenizer.train": ("vocab_size", 270, lambda n, _: (lambda t: (t.vocab_size, t.encode(["soap bar"])))(
        TitleTokenizer.train(["soap bar", "shampoo bar", "soap"], vocab_size=n))),
    "TitleIndex.build": ("max_tokens", 2, lambda n, _: (lambda x: (x.sequences, x.lengths, x.num_dup))(
        TitleIndex.build(WordTokenizer(), ["2 3 4", "2 3 5", "6"], [1, 2, 3], max_tokens=n))),
    "prepare_csv": ("kcore", 1, _prepare),
    "BucketBatchSampler.batch_size": ("batch_size", 2, lambda n, _: (lambda s: (s.batch_size, s.batches()))(
        BucketBatchSampler(np.arange(7), n, bucket_batches=2))),
    "BucketBatchSampler.bucket_batches": ("bucket_batches", 2, lambda n, _: (lambda s: (s.bucket_batches, s.batches()))(
        BucketBatchSampler(np.arange(7), 2, bucket_batches=n))),
    "ShardedDataModule.batch_size": ("batch_size", 2, lambda n, _: _datamodule(batch_size=n, eval_batch_size=4)),
    "ShardedDataModule.eval_batch_size": ("eval_batch_size", 2, lambda n, _: _datamodule(batch_size=4, eval_batch_size=n)),
    "training_windows": ("max_history", 2, lambda n, _: training_windows(_sequences(), _ids(), n)),
    "eval_batches": ("batch_size", 2, lambda n, _: eval_batches(_sequences(), np.array([1, 2, 3]), _ids(), 3, n)),
    "ResumePoints": ("every_steps", 1, lambda n, tmp: ResumePoints(tmp, SignalGuard(tmp), every_steps=n).every_steps),
    "t5.training_examples": ("max_history", 2, lambda n, _: dataclasses.astuple(training_examples(
        _sequences(), np.arange(3), _ids(), _ids().layout(3), max_history=n))),
    "t5.beam_search": ("batch_size", 2, lambda n, _: beam_search(*_t5(), k=2, num_beams=3, batch_size=n)),
    "ColdStartBeam.prefix_levels": ("prefix_levels", 2, lambda n, _: _cold(prefix_levels=n)),
    "ColdStartBeam.max_per_prefix": ("max_per_prefix", 2, lambda n, _: _cold(max_per_prefix=n)),
    "title_beam_search.num_beams": ("num_beams", 2, lambda n, _: _title_beam(num_beams=n, tree=_title_model()[1].tree)),
    "title_beam_search.max_steps": ("max_steps", 2, lambda n, _: _title_beam(num_beams=2, tree=None, max_steps=n)),
    "check_budget": ("max_score_bytes", 8, lambda n, _: check_budget(n)),
    "MIPSIndex.build.nprobe": ("nprobe", 2, lambda n, _: _mips("faiss-ivf", nlist=4, nprobe=n)),
    "MIPSIndex.build.nlist": ("nlist", 2, lambda n, _: _mips("faiss-ivf", nlist=n)),
    "MIPSIndex.build.hnsw_m": ("hnsw_m", 4, lambda n, _: _mips("faiss-hnsw", hnsw_m=n)),
    "MIPSIndex.build.ef_search": ("ef_search", 4, lambda n, _: _mips("faiss-hnsw", ef_search=n)),
    "MIPSIndex.search": ("k", 2, lambda n, _: MIPSIndex.build(_vecs()).search(_vecs()[:3], n)),
    "dense_index": ("exact_max_items", 50, lambda n, _: dense_index(_vecs(), exact_max_items=n)),
    "sample_candidates": ("num_random", 2, lambda n, _: sample_candidates(
        torch.tensor([0, 3]), n, 10, generator=torch.Generator().manual_seed(0))),
    "MicroBatcher.max_batch": ("max_batch", 8, lambda n, _: (lambda b: (b.max_batch, b.slice))(MicroBatcher(max_batch=n))),
    "MicroBatcher.threads": ("threads", 2, lambda n, _: MicroBatcher(threads=n).threads),
}


def plain(x: Any) -> Any:
    """``x`` as comparable plain values, each scalar with its type: a numpy int kept where a Python int was differs."""
    if isinstance(x, torch.Tensor):
        return "tensor", str(x.dtype), x.tolist()
    if isinstance(x, np.ndarray):
        return "array", str(x.dtype), x.tolist()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x).__name__, [plain(v) for v in x]
    return type(x).__name__, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_numpy_int_works_as_the_python_int(case: str, tmp_path: Path) -> None:
    _, good, call = CASES[case]
    assert plain(call(np.int64(good), tmp_path)) == plain(call(good, tmp_path))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bool_is_refused_as_other_bad_values_are(case: str, tmp_path: Path) -> None:
    name, _, call = CASES[case]
    for bad in (True, np.bool_(True), 2.0, "2"):
        with pytest.raises(ValueError, match=re.escape(f"{name}`")):
            call(bad, tmp_path)


@pytest.mark.parametrize("config", ["optim", "dense"])
def test_a_saved_configs_counts_take_python_ints_only(config: str) -> None:
    """Configs written with the run (YAML, checkpoint meta) keep Python ints: a numpy int or a bool is refused there."""
    from generator.models.dense import DenseHeadConfig
    from generator.training.optim import OptimConfig

    make = ((lambda v: OptimConfig(warmup_steps=v)) if config == "optim"
            else (lambda v: DenseHeadConfig(input_dim=8, num_random_negatives=v)))
    assert make(3) is not None
    for bad in (True, np.int64(3), 3.0):
        with pytest.raises(ValueError, match="warmup_steps|num_random_negatives"):
            make(bad)


def test_an_unsigned_numpy_int_history_length_windows_as_the_python_int() -> None:
    """np.uint64 passes the check; kept as a numpy int it would turn int64 arithmetic into float64."""
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8])]
    want, got = training_windows(seqs, _ids(), 3), training_windows(seqs, _ids(), np.uint64(3))
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
