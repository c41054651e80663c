"""The canonical dataset folder: loading, validation errors, embeddings, leave-one-out, summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from semid.data import Catalogue, format_summary, load_dataset, load_embeddings, summary
from semid.split import leave_one_out
from tests.conftest import TINY_EMBEDDINGS, TINY_ITEMS, TINY_SEQUENCES, write_canonical


# ---- real data ---------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_beauty_counts_split_and_embeddings(beauty_dir: Path) -> None:
    ds = load_dataset(beauty_dir)
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (22_363, 12_101, 198_502)
    assert ds.user_ids.dtype == np.int64 and np.array_equal(ds.catalogue.item_ids, np.arange(1, 12_102))
    assert ds.catalogue.original_ids[0] == "B004756YJA"
    assert (
        ds.catalogue.text(1)
        == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce. OPI, Makeup, Nails, Nail Polish"
    )

    split = leave_one_out(ds)
    assert split.num_users == 22_363 and split.num_skipped == 0
    assert sum(len(t) for t in split.train) == 198_502 - 2 * 22_363
    assert split.valid_targets.shape == split.test_targets.shape == (22_363,)
    assert split.test_targets[0] == ds.sequences[0][-1] and split.valid_targets[0] == ds.sequences[0][-2]

    s = summary(ds)
    assert (s["sequence_length_min"], s["sequence_length_max"]) == (5, 204)
    assert round(s["sequence_length_mean"], 1) == 8.9
    assert (s["items_empty_title"], s["items_never_interacted"], s["embeddings"]) == (7, 0, ["minilm"])

    emb = ds.embeddings("minilm")
    assert emb.shape == (12_101, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


# ---- tiny folder: contents -----------------------------------------------------------------------------------------
def test_tiny_dataset_loads_exactly(tiny_dataset_dir: Path) -> None:
    ds = load_dataset(tiny_dataset_dir)
    assert ds.path == tiny_dataset_dir
    assert ds.catalogue.titles == [t for t, _ in TINY_ITEMS]
    assert ds.catalogue.attributes == [a for _, a in TINY_ITEMS]
    assert ds.catalogue.original_ids == [f"A{i:04d}" for i in range(1, 7)]
    assert ds.user_ids.tolist() == list(TINY_SEQUENCES)
    assert [s.tolist() for s in ds.sequences] == list(TINY_SEQUENCES.values())
    assert all(s.dtype == np.int64 for s in ds.sequences)
    assert ds.num_interactions == 20
    assert ds.embedding_names() == ["tiny"]
    np.testing.assert_array_equal(ds.embeddings("tiny"), TINY_EMBEDDINGS)


def test_catalogue_text_follows_the_beauty_recipe(tiny_dataset_dir: Path) -> None:
    cat = load_dataset(tiny_dataset_dir).catalogue
    assert cat.text(1) == "Red Lipstick. Acme, Makeup, Lips"
    assert cat.text(3) == "Face Cream. Skin Care, Face"  # "Unknown" brand left out
    assert cat.text(5) == ". Tools"  # empty title: the recipe to the letter, as Beauty's untitled items were embedded
    bare = dataclasses.replace(cat, attributes=[["Unknown"]] * cat.num_items)  # no attributes: as before, no dangling ". "
    assert bare.text(1) == "Red Lipstick" and bare.text(5) == ""
    assert cat.text(2, fields=("title",)) == "Blue Eyeliner"
    assert cat.texts()[3] == cat.text(4) == "Hair Spray. Hairco, Hair Care"
    assert cat.title_of(np.int64(6)) == "Nail Polish"
    with pytest.raises(ValueError, match=r"`item_id` must be an int in \[1, 6\], got 7"):
        cat.title_of(7)
    with pytest.raises(ValueError, match="`fields` entries must be 'title' or 'attributes', got 'brand'"):
        cat.text(1, fields=("brand",))


def test_catalogue_rejects_ids_that_are_not_1_to_n() -> None:
    with pytest.raises(ValueError, match=r"`item_ids` must be arange\(1, 3\)"):
        Catalogue(np.array([1, 3]), ["a", "b"], ["x", "y"], [[], []])
    with pytest.raises(ValueError, match="one entry per item"):
        Catalogue(np.array([1, 2]), ["a"], ["x", "y"], [[], []])


# ---- loader errors ------------------------------------------------------------------------------------------------
def _items_lines(n: int) -> list[str]:
    return [
        json.dumps({"item_id": i, "asin": f"A{i}", "title": f"t{i}", "attributes": []})
        for i in range(1, n + 1)
    ]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (_items_lines(1) + ["{not json"], r"items.jsonl:2: invalid JSON"),
        (_items_lines(1) + [""], r"items.jsonl:2: empty line"),
        (
            _items_lines(2) + [json.dumps({"item_id": 2, "title": "x"})],
            r"items.jsonl:3: duplicate item id 2 \(first on line 2\)",
        ),
        (
            [json.dumps({"item_id": 2, "title": "x"})],
            r"items.jsonl:1: item ids must be 1..N in order .* expected 1, got 2",
        ),
        (
            _items_lines(1) + [json.dumps({"item_id": "2", "title": "x"})],
            r"items.jsonl:2: `item_id` must be an int, got '2'",
        ),
        (_items_lines(1) + [json.dumps({"item_id": 2})], r"items.jsonl:2: missing field `title`"),
        (
            _items_lines(1) + [json.dumps({"item_id": 2, "title": "x", "attributes": "a"})],
            r"items.jsonl:2: `attributes` must be a list",
        ),
        (_items_lines(1) + ["[1, 2]"], r"items.jsonl:2: expected a JSON object, got list"),
        (_items_lines(1) + ['{"item_id": 2, "title": "t\\ud800"}'], r"items.jsonl:2: `title` holds '\\ud800', not a character"),
        (_items_lines(1) + ['{"item_id": 2, "title": "t", "attributes": ["\\udfff"]}'], r"items.jsonl:2: `attributes` holds"),
    ],
)
def test_items_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    folder = write_canonical(tmp_path / "d", [("a", []), ("b", [])], {1: [1]})
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(folder)) + ".*" + message):
        load_dataset(folder)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 1 2\n2 1 x\n", r"sequences.txt:2: 'x' is not an integer id"),
        ("1 1 2\n\n2 1\n", r"sequences.txt:2: empty line"),
        ("1 1 2\n2 2\n1 2 1\n", r"sequences.txt:3: duplicate user 1 \(first on line 1\)"),
        (
            "1 1 2\n7 2 9 1\n",
            r"sequences.txt:2: user 7 has unknown item id 9 \(items.jsonl holds items 1..2\)",
        ),
        ("1 1 2\n2 0\n", r"sequences.txt:2: user 2 has unknown item id 0"),
        ("1 1 2\n2\n", r"sequences.txt:2: user 2 has no items"),
        ("0 1 2\n", r"sequences.txt:1: user id must be >= 1, got 0"),
        # two users on one line, parted by a character str.split() parts at (they were merged into one user)
        ("1 1 2\n2 2\x1e3 1\n", r"sequences.txt:2: '2\\x1e3' is not an integer id"),
        ("1 1 2\n2 2\u20283 1\n", r"sequences.txt:2: '2\\u20283' is not an integer id"),
        ("1 1 2\n2 " + "1" * 5000 + "\n", r"sequences.txt:2: id 1111.* \(5,000 digits\) is beyond the ids semid holds"),
    ],
)
def test_sequence_errors_name_file_line_and_problem(tmp_path: Path, text: str, message: str) -> None:
    folder = write_canonical(tmp_path / "d", [("a", []), ("b", [])], {1: [1]})
    (folder / "sequences.txt").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_dataset(folder)


@pytest.mark.parametrize("token", ["1_0", "+3", "\u0663", "1.0", "-"])
def test_sequence_ids_are_plain_digits(tmp_path: Path, token: str) -> None:
    folder = write_canonical(tmp_path / "d", [(f"t{i}", []) for i in range(1, 11)], {1: [1]})
    (folder / "sequences.txt").write_text(f"1 1 2\n2 3 {token} 4\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"sequences.txt:2: {token!r} is not an integer id (write ids as")):
        load_dataset(folder)


@pytest.mark.parametrize(("name", "text", "line"), [
    ("items.jsonl", '{"item_id": 1, "title": "Caf\u00e9"}\n{"item_id": 2, "title": "Caf\udce9"}\n', 2),
    ("sequences.txt", "1 1 2\n2 2 1\n3 1 \udce92\n", 3),
])  # fmt: skip
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    folder = write_canonical(tmp_path / "d", [("a", []), ("b", [])], {1: [1, 2]})
    # "\udce9" is written as the lone byte 0xe9 (latin-1 "é"); line 1 of items.jsonl holds a real UTF-8 "é"
    (folder / name).write_bytes(text.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ValueError, match=re.escape(f"{folder / name}:{line}: not UTF-8 text (byte 0xe9 at column")):
        load_dataset(folder)


def test_missing_files_say_which_and_how_to_make_one(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no dataset folder here .*semid prepare"):
        load_dataset(tmp_path / "nowhere")
    (tiny_dataset_dir / "sequences.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"sequences.txt: missing .*`semid prepare` makes one"):
        load_dataset(tiny_dataset_dir)
    (tiny_dataset_dir / "sequences.txt").mkdir()  # (it was said to be missing)
    with pytest.raises(ValueError, match=r"sequences.txt: not a regular file \(a folder, device or pipe\)"):
        load_dataset(tiny_dataset_dir)


# ---- embeddings ---------------------------------------------------------------------------------------------------
def test_embeddings_errors(tmp_path: Path) -> None:
    good = np.ones((4, 3), dtype=np.float32)
    np.save(tmp_path / "rows.npy", good[:3])
    with pytest.raises(ValueError, match=r"rows.npy: 3 rows but the dataset has 4 items"):
        load_embeddings(tmp_path / "rows.npy", 4)
    nan = good.copy()
    nan[2, 1] = np.nan
    nan[3, 0] = np.inf
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(ValueError, match=r"nan.npy: row 2 \(item 3\) has NaN or inf values \(2 bad rows\)"):
        load_embeddings(tmp_path / "nan.npy", 4)
    np.save(tmp_path / "flat.npy", np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"flat.npy: embeddings must be 2-D \(N, D\), got shape \(4,\)"):
        load_embeddings(tmp_path / "flat.npy", 4)
    np.save(tmp_path / "text.npy", np.array([["a"]] * 4))
    with pytest.raises(ValueError, match="text.npy: embeddings must be numeric"):
        load_embeddings(tmp_path / "text.npy", 4)
    (tmp_path / "junk.npy").write_text("not an array")
    with pytest.raises(ValueError, match="junk.npy: not a readable .npy array"):
        load_embeddings(tmp_path / "junk.npy", 4)
    with pytest.raises(FileNotFoundError, match="absent.npy: no embeddings file here"):
        load_embeddings(tmp_path / "absent.npy", 4)


def test_empty_truncated_or_foreign_embeddings_files_are_value_errors(tiny_dataset_dir: Path, tmp_path: Path) -> None:
    path = tiny_dataset_dir / "item_emb_tiny.npy"
    whole = path.read_bytes()
    cases = [
        (b"", "the file is empty (0 bytes)"),
        (whole[:40], "truncated or damaged (EOF: reading array header"),
        (whole[:-10], "truncated or damaged (its header claims an array of shape (6, 8) float32 (192 bytes), but the file holds 182"),
        (b"not an array at all", "it starts with b'not an', not b'\\x93NUMPY'"),
    ]
    for content, message in cases:
        path.write_bytes(content)
        expected = re.escape(f"{path}: not a readable .npy array: {message}") + ".*write it again"
        with pytest.raises(ValueError, match=expected):
            load_dataset(tiny_dataset_dir).embeddings("tiny")
    np.savez(tmp_path / "two.npz", a=TINY_EMBEDDINGS, b=TINY_EMBEDDINGS)  # an .npz, renamed
    (tmp_path / "two.npz").rename(path)
    with pytest.raises(ValueError, match=r"it starts with b'PK"):
        load_embeddings(path, 6)


def test_embeddings_other_dtypes_are_converted_to_float32(tmp_path: Path) -> None:
    np.save(tmp_path / "f64.npy", np.arange(8, dtype=np.float64).reshape(4, 2))
    emb = load_embeddings(tmp_path / "f64.npy", 4)
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, np.arange(8).reshape(4, 2))


# ---- leave-one-out ------------------------------------------------------------------------------------------------
def test_leave_one_out_on_tiny(tiny_dataset_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = load_dataset(tiny_dataset_dir)
    with caplog.at_level(logging.WARNING):
        split = leave_one_out(ds)
    assert not caplog.records  # everyone has >= 3 items
    seqs = list(TINY_SEQUENCES.values())
    assert split.user_ids.tolist() == [1, 2, 3, 4, 5] and split.skipped_users.size == 0
    assert [t.tolist() for t in split.train] == [s[:-2] for s in seqs]
    assert split.valid_targets.tolist() == [s[-2] for s in seqs]
    assert split.test_targets.tolist() == [s[-1] for s in seqs]
    assert split.valid_targets.dtype == split.test_targets.dtype == np.int64
    assert split.test_history(2).tolist() == [4, 1, 6, 2]
    assert split.valid_history(2).tolist() == [4, 1, 6]
    # histories are views into the stored sequences, not copies
    assert np.shares_memory(split.test_history(0), ds.sequences[0])


def test_leave_one_out_reports_short_users(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_canonical(
        tmp_path / "d", TINY_ITEMS, {10: [1, 2, 3], 11: [1], 12: [4, 5], 13: [6, 5, 4, 3]}
    )
    with caplog.at_level(logging.WARNING, logger="semid.data"):
        split = leave_one_out(load_dataset(folder))
    assert split.user_ids.tolist() == [10, 13]
    assert split.skipped_users.tolist() == [11, 12] and split.num_skipped == 2
    assert split.test_targets.tolist() == [3, 3] and split.valid_targets.tolist() == [2, 4]
    assert [t.tolist() for t in split.train] == [[1], [6, 5]]
    assert "2 of 4 users have fewer than 3 items" in caplog.text


# ---- summary ------------------------------------------------------------------------------------------------------
def test_summary_and_its_text(tmp_path: Path) -> None:
    folder = write_canonical(tmp_path / "d", TINY_ITEMS, {1: [1, 2, 1], 2: [3, 1, 2, 3, 4, 1]})
    s = summary(load_dataset(folder))
    assert {k: s[k] for k in ("users", "items", "interactions")} == {
        "users": 2,
        "items": 6,
        "interactions": 9,
    }
    assert (s["sequence_length_min"], s["sequence_length_mean"], s["sequence_length_max"]) == (3, 4.5, 6)
    assert s["items_never_interacted"] == 2  # items 5 and 6
    assert s["items_empty_title"] == 1 and s["embeddings"] == []
    text = format_summary(s)
    assert (
        "interactions            9" in text
        and "min 3, mean 4.5, max 6" in text
        and "embeddings              none" in text
    )
