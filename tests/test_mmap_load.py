"""Loading a checkpoint memory-mapped (``load_checkpoint(mmap=True)``, ``Recommender.from_run``): the same model, its
N-row tables the file's pages (never allocated, never a second copy), writes never reaching the file, and a served
run that reads the file no more once built."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import generator.models.checkpoint as checkpoint
import generator.runs.recommender as recommender_module
from generator.designs.registry import load_checkpoint
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.checkpoint import check_finite, content_digest, safe_load, with_integrity
from generator.models.dense import deferred_tables
from generator.runs.folder import best_checkpoint, load_run, read_config
from generator.runs.recommender import Recommender
from semid.layout import TokenLayout
from tests.serve_helpers import HISTORIES


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """This process's mappings of ``path`` (Linux: /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def in_file(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(lo <= ptr < hi for lo, hi in ranges)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(serve_world: dict[str, Path]) -> Path:
    run = serve_world["v1"]
    return best_checkpoint(run, read_config(run))


def test_a_mapped_load_is_the_same_model_with_its_tables_left_in_the_file(ckpt: Path) -> None:
    read = load_checkpoint(ckpt).model
    mapped = load_checkpoint(ckpt, mmap=True).model
    assert read.state_dict().keys() == mapped.state_dict().keys()
    for name, t in read.state_dict().items():
        assert torch.equal(t, mapped.state_dict()[name]), name
    ranges = mapped_ranges(ckpt)
    assert ranges, "the checkpoint is not mapped"
    tables = {n: p for n, p in mapped.named_parameters() if n.startswith("node_vec_") or n.endswith("item_table")}
    assert tables and all(in_file(p, ranges) for p in tables.values())  # assigned, not copied into a model of its own
    assert not any(in_file(b, ranges) for b in mapped.buffers())  # buffers copied (the decoders take views of them)
    assert not any(in_file(p, mapped_ranges(ckpt) or [(0, 0)]) for p in read.parameters())
    before = sha(ckpt)
    with torch.no_grad():
        mapped.dense_head.item_table.add_(1.0)  # copy-on-write: the file keeps its bytes
    del mapped
    assert sha(ckpt) == before
    assert torch.equal(load_checkpoint(ckpt, mmap=True).model.dense_head.item_table, read.dense_head.item_table)


def test_inside_deferred_tables_a_model_allocates_no_n_row_table() -> None:
    layout = TokenLayout(codebook_sizes=(4, 4))
    tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(np.array([[0, 1], [0, 2], [3, 1]]))))
    config = CausalConfig(d_model=8, num_heads=2, d_ff=16, dense_dim=8, id_input=True)
    with deferred_tables():
        model = CausalGenerator(config, layout, tokens)
    deferred = {n for n, p in model.named_parameters() if p.is_meta}
    assert deferred == {"node_vec_0", "node_vec_1", "dense_head.item_table"}
    assert model.node_vec_1.shape == (3, 8) and model.dense_head.item_table.shape == (3, 8)
    assert not any(b.is_meta for b in model.buffers())
    assert not any(p.is_meta for p in CausalGenerator(config, layout, tokens).parameters())  # outside: made as ever


def test_a_served_run_reads_the_file_no_more_and_ranks_as_one_read_whole(serve_world: dict[str, Path], ckpt: Path) -> None:
    mapped = Recommender.from_run(serve_world["v1"])
    assert mapped_ranges(ckpt) == []  # its model copied what it keeps: the file may be replaced, even in place
    read = Recommender(load_run(serve_world["v1"]), release_tables=True)
    for name in mapped.decoders:
        a, b = mapped.recommend(HISTORIES, 5, name), read.recommend(HISTORIES, 5, name)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.items, y.items, err_msg=name)
            np.testing.assert_array_equal(x.scores, y.scores, err_msg=name)


def test_a_file_in_the_old_format_is_read_whole_when_it_cannot_be_mapped(tmp_path: Path) -> None:
    obj = with_integrity({"state_dict": {"w": torch.arange(6.0).view(2, 3)}})
    path = tmp_path / "old.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="zipfile"):
        torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(safe_load(path, mmap=True)["state_dict"]["w"], obj["state_dict"]["w"])


def test_nan_in_a_later_chunk_of_a_table_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 8)  # rows of 4: two rows a chunk
    table = torch.zeros(7, 4)
    check_finite({"t": table}, "f.ckpt")
    table[6, 3] = float("nan")
    with pytest.raises(ValueError, match=r"f.ckpt: tensor `t` holds 1 NaN or inf"):
        check_finite({"t": table}, "f.ckpt")
    with pytest.raises(ValueError, match=r"tensor `v` holds 1 NaN"):
        check_finite({"v": torch.tensor([0.0, float("inf")])}, "f.ckpt")


def test_the_digest_hashes_a_tensors_bytes_in_place() -> None:
    t = torch.arange(12, dtype=torch.float32).view(3, 4).T  # not contiguous: its values in row order
    h = hashlib.sha256()
    h.update(f"D1s1:wT{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().numpy().tobytes())
    assert content_digest({"w": t}) == h.hexdigest()


def test_a_mapped_file_of_other_dtypes_loads_as_the_model_s(ckpt: Path, tmp_path: Path) -> None:
    """Kept as they are, a file's float16 tensors would be float16 parameters: they are converted, as a read
    whole converts them."""
    raw = torch.load(ckpt, weights_only=True)
    raw.pop(checkpoint.INTEGRITY_KEY)
    names = [k for k, v in raw["state_dict"].items() if v.is_floating_point()][:3] + ["model.dense_head.item_table"]
    for name in names:
        raw["state_dict"][name] = raw["state_dict"][name].half()
    path = tmp_path / "half.ckpt"
    torch.save(with_integrity(raw), path)
    read, mapped = load_checkpoint(path).model, load_checkpoint(path, mmap=True).model
    for name, t in read.state_dict().items():
        assert mapped.state_dict()[name].dtype == t.dtype and torch.equal(mapped.state_dict()[name], t), name
    h = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(mapped.last_hidden(h, torch.tensor([3])), read.last_hidden(h, torch.tensor([3])))


def test_a_file_that_cannot_be_mapped_is_read_whole(ckpt: Path, tmp_path: Path) -> None:
    """A valid checkpoint whose records are compressed (a zip rewritten with deflate): torch reads it, but mapped it
    would be its compressed bytes (wrong values, no error); asked to map, it is read whole."""
    path = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    a = safe_load(ckpt)["state_dict"]
    raw = torch.load(path, weights_only=True, mmap=True)["state_dict"]  # torch's own mapping of it: wrong values
    assert not all(torch.equal(a[k], raw[k]) for k in a)
    b = safe_load(path, mmap=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_served_run_keeps_one_copy_of_the_item_tokens(serve_world: dict[str, Path]) -> None:
    """The buffers are copied once, at the load: the decoders' paths and the model share the item tokens, as they do
    for a run read whole."""
    rec = Recommender.from_run(serve_world["v1"])
    shared = next(d.shared for d in rec._decoders.values() if hasattr(d, "shared"))
    model_tokens = rec.run.model.item_tokens
    assert shared.paths.tokens.untyped_storage().data_ptr() == model_tokens.untyped_storage().data_ptr()


def test_a_checkpoint_that_changed_while_it_was_loaded_is_refused(serve_world: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter([(1, 2, 3), (1, 2, 4)])  # the second look sees another mtime: a rewrite in place
    monkeypatch.setattr(recommender_module, "_file_state", lambda path: next(states))
    with pytest.raises(ValueError, match=r"best.*ckpt: the file changed while the run was loaded from it"):
        Recommender.from_run(serve_world["v1"])
