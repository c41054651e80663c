"""Crafted or careless small files (issue 22, items 5, 9 and 10): each is refused with one line naming the file,
line, array or option, before the work or the memory it would take. No model is trained here (crafted run folders:
tests/test_crafted_runs.py)."""

from __future__ import annotations

import gzip
import io
import json
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from generator.runs.folder import read_config, write_config
from semid.data import load_dataset, load_embeddings
from semid.ids import SemanticIDs
from semid_cli import main
from tests.conftest import write_canonical
from tests.test_generator_helpers import random_ids
from tests.test_run_folder_safety import _config


def _npy_bytes(header: dict) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, header)
    return f.getvalue()


# ---- item 5: resource exhaustion -----------------------------------------------------------------------------------
def test_a_config_yaml_with_anchors_is_refused_at_the_first_anchor(tmp_path: Path) -> None:
    write_config(tmp_path, _config())
    text = (tmp_path / "config.yaml").read_text()
    laughs = "lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 4))  # 9^4 strings; a real one has 9^9
    (tmp_path / "config.yaml").write_text(text + laughs)
    with pytest.raises(ValueError, match=r"config\.yaml:\d+: not valid YAML \(anchors and aliases .* are not allowed"):
        read_config(tmp_path)


def test_a_config_yaml_larger_than_the_cap_is_refused_unread(tmp_path: Path) -> None:
    write_config(tmp_path, _config())
    with open(tmp_path / "config.yaml", "a") as f:
        f.write("# padding\n" * 200_000)  # 2 MB of comments: valid YAML, and too large
    with pytest.raises(ValueError, match=r"config\.yaml: [\d,]+ bytes, more than the 1,048,576"):
        read_config(tmp_path)


def test_a_zip_bombed_semantic_ids_file_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    path = tmp_path / "semantic_ids.npz"
    meta = json.dumps({"format": "semid.semantic_ids", "version": 1, "codebook_sizes": [4, 4, 8]})
    np.savez_compressed(path, codes=np.zeros((2_000_000, 3), dtype=np.int64), item_ids=np.zeros(2_000_000, dtype=np.int64),
                        meta=np.array(meta))
    assert path.stat().st_size < 1_000_000  # 48 MB of codes in well under 1 MB
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"semantic_ids\.npz: .*array `codes` inflates from .* refused as a zip bomb"):
            SemanticIDs.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak:,} bytes allocated before the refusal"


def test_an_npz_member_whose_header_claims_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "semantic_ids.npz"
    random_ids(8).save(path)
    with zipfile.ZipFile(path, "a") as z:  # a second `codes.npy` would clash: rewrite the file with a lying header
        members = {n: z.read(n) for n in z.namelist()}
    members["codes.npy"] = _npy_bytes({"descr": "<i8", "fortran_order": False, "shape": (10**10, 4)})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(ValueError, match=r"semantic_ids\.npz: .*array `codes`: its header claims an array of shape \(10000000000, 4\)"):
        SemanticIDs.load(path)


def test_an_npy_header_claiming_a_huge_shape_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "item_emb_x.npy"
    path.write_bytes(_npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (10**12, 384)}))
    with pytest.raises(ValueError, match=r"item_emb_x\.npy: not a readable \.npy array: truncated or damaged \(its header "
                                         r"claims an array of shape \(1000000000000, 384\) float32"):
        load_embeddings(path, 6)


# ---- item 9: tracebacks where one line is due -----------------------------------------------------------------------
@pytest.mark.parametrize("meta, message", [
    ("[1, 2]", r"array `meta` must hold a JSON object, got list"),
    (json.dumps({"format": "semid.semantic_ids", "version": 1}), r"`meta\.codebook_sizes` must be a list of positive ints, got None"),
    (json.dumps({"format": "semid.semantic_ids", "version": 1, "codebook_sizes": "4,4"}), r"`meta\.codebook_sizes` must be"),
])
def test_semantic_ids_whose_meta_is_wrong_are_an_error_naming_the_file(tmp_path: Path, meta: str, message: str) -> None:
    path = tmp_path / "semantic_ids.npz"
    np.savez(path, codes=np.zeros((2, 2), dtype=np.int64), item_ids=np.arange(1, 3), meta=np.array(meta))
    with pytest.raises(ValueError, match=rf"semantic_ids\.npz: {message}"):
        SemanticIDs.load(path)


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b'{"asin": "A1"}\n' * 500)[:15]])
def test_prepare_refuses_a_gz_that_is_not_gzip_or_is_truncated(tmp_path: Path, content: bytes,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "reviews.json.gz").write_bytes(content)
    (tmp_path / "meta.json.gz").write_bytes(content)
    argv = ["prepare", "--format", "amazon2014", "--reviews", str(tmp_path / "reviews.json.gz"),
            "--meta", str(tmp_path / "meta.json.gz"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "json.gz: not a readable gzip file" in capsys.readouterr().err


def test_a_user_id_above_int64_is_an_error_naming_the_line(tmp_path: Path) -> None:
    folder = write_canonical(tmp_path / "d", [("a", []), ("b", [])], {1: [1, 2], 2**64: [2, 1]})
    with pytest.raises(ValueError, match=rf"sequences\.txt:2: id {2**64} is beyond the ids semid holds"):
        load_dataset(folder)
    (folder / "sequences.txt").write_text(f"1 1 2\n2 {-(10**23)} 1\n")  # (below: an OverflowError traceback)
    with pytest.raises(ValueError, match=rf"sequences\.txt:2: id {-(10**23)} is beyond the ids semid holds"):
        load_dataset(folder)


def test_items_jsonl_says_what_it_does_not_read_and_refuses_what_is_ambiguous(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    folder = write_canonical(tmp_path / "d", [("a", []), ("b", [])], {1: [1, 2], 2: [2, 1]})
    items = folder / "items.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("\ufeff" + lines[0] + "\n" + lines[1][:-1] + ', "brand": "OPI"}\n')  # a BOM, an unread field
    with caplog.at_level("WARNING"):
        assert load_dataset(folder).catalogue.num_items == 2  # (the BOM: "invalid JSON ... utf-8-sig")
    assert "fields ['brand'] are not read (first on line 2)" in caplog.text  # (it was dropped in silence)
    for line, message in ((lines[1][:-1] + ', "title": "again"}', "items.jsonl:2: the key `title` is given twice"),
                          (lines[1].replace('"A0002"', '"A0001"'), "items.jsonl:2: asin 'A0001' is item 1's too"),
                          ('{"item_id": 2, "title": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
                          ('{"item_id": ' + "9" * 5000 + "}", "items.jsonl:2: a number of more than 4,300 digits")):
        items.write_text(lines[0] + "\n" + line + "\n")
        with pytest.raises(ValueError, match=message):
            load_dataset(folder)


def test_a_python_tag_in_a_model_option_is_a_usage_error_and_runs_nothing(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    argv = ["train", "--data", "d", "--ids", "i", "--out", "o", "--model-option",
            f'd_model=!!python/object/apply:os.system ["touch {marker}"]']
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and not marker.exists()
    assert "--model-option d_model: " in capsys.readouterr().err


# ---- item 10: errors that name the file or the option ---------------------------------------------------------------
def test_codes_out_of_range_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "semantic_ids.npz"
    ids = random_ids(8)
    codes = ids.codes.copy()
    codes[0, 0] = 9999
    meta = json.dumps({"format": "semid.semantic_ids", "version": 1, "codebook_sizes": list(ids.codebook_sizes)})
    np.savez(path, codes=codes, item_ids=ids.item_ids, meta=np.array(meta))
    with pytest.raises(ValueError, match=r"semantic_ids\.npz: `codes\[0, 0\]` is 9999; level 0 takes codes in \[0, 4\)"):
        SemanticIDs.load(path)


def test_fit_codebooks_names_the_embeddings_file_with_a_nan_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    emb[7, 3] = np.nan
    np.save(tmp_path / "item_emb_bad.npy", emb)
    assert main(["fit-codebooks", "--embeddings", str(tmp_path / "item_emb_bad.npy"), "--out", str(tmp_path / "cb"),
                 "--method", "rqkmeans", "--levels", "2", "--codebook-size", "4"]) == 2
    assert "item_emb_bad.npy: row 7 (item 8) has NaN or inf values" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_max_users_names_the_option_and_what_it_takes(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", "r", "--max-users", value])
    err = capsys.readouterr().err
    assert "argument --max-users: must be a positive int (users sampled) or 'all'" in err and "_users" not in err


def test_embedding_values_name_the_file_and_what_is_wrong() -> None:
    from semid.data import check_embedding_values

    with pytest.raises(ValueError, match=r"f\.npy: embeddings must be a 2-D array .* got shape \(3, 0\)"):  # (no file)
        check_embedding_values(np.zeros((3, 0)), "f.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (numpy's overflow RuntimeWarning came first)
        with pytest.raises(ValueError, match=r"f\.npy: row 1 \(item 2\) has values beyond float32 range"):  # ("NaN or
            check_embedding_values(np.array([[1.0, 2.0], [1e300, 1.0]]), "f.npy")  # inf" for finite values)
    with pytest.raises(ValueError, match=r"row 0 \(item 1\) has NaN or inf values"):
        check_embedding_values(np.array([[np.nan, 1.0]]), "f.npy")
