"""`semid prepare`: each raw format -> the canonical folder, numbering, k-core, counted drops, errors, the CLI."""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semid.data import Catalogue, check_embedding_values, load_dataset, read_npy
from semid.prepare import prepare_amazon2014, prepare_csv, prepare_recbole, write_dataset
from semid_cli import main

# reviewer, asin, time, in file order. Sorted by (time, file order): C-W, B-Y, B-Z (tie: file order), A-Y, A-X,
# A-Z, C-X; so items W=1 Y=2 Z=3 X=4, users C=1 B=2 A=3. Line 6 repeats line 2 and is dropped.
REVIEWS = [("A", "X", 300), ("B", "Y", 100), ("A", "Y", 200), ("B", "Z", 100), ("A", "Z", 400), ("B", "Y", 100),
           ("C", "W", 50), ("C", "X", 500)]  # fmt: skip
META = [
    "{'asin': 'X', 'title': 'Lipstick X', 'brand': 'Acme', 'categories': [['Beauty', 'Makeup', 'Lips'], "
    "['Beauty', 'Makeup', 'Lips', 'Lipstick']]}",
    "{'asin': 'Y', 'title': \"Cream's Y\", 'categories': [['Beauty', 'Skin Care']], 'price': 9.99}",
    "{'asin': 'Q', 'title': 'never reviewed'}",
    "{'asin': 'X', 'title': 'a second row for X'}",
    "{'asin': 'W', 'title': ' Brush W ', 'brand': '', 'categories': [['Beauty']]}",
]  # Z has no metadata


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def _reviews(rows: list[tuple[str, str, object]]) -> list[str]:
    return [json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) for u, i, t in rows]


@pytest.fixture
def amazon(tmp_path: Path) -> tuple[Path, Path]:
    return (
        _write_gz(tmp_path / "reviews_Beauty_5.json.gz", _reviews(REVIEWS)),
        _write_gz(tmp_path / "meta_Beauty.json.gz", META),
    )


def _users_tsv(folder: Path) -> list[str]:
    return (folder / "users.tsv").read_text().splitlines()


# ---- amazon2014 ---------------------------------------------------------------------------------------------------
def test_amazon2014_orders_by_time_numbers_by_first_appearance_and_counts(amazon, tmp_path: Path) -> None:
    out = tmp_path / "data"
    report = prepare_amazon2014(*amazon, out)
    ds = load_dataset(out)
    assert ds.catalogue.original_ids == ["W", "Y", "Z", "X"]
    assert _users_tsv(out) == ["user_id\toriginal_user_id", "1\tC", "2\tB", "3\tA"]
    assert ds.user_ids.tolist() == [1, 2, 3]
    assert [s.tolist() for s in ds.sequences] == [[1, 4], [2, 3], [2, 4, 3]]
    assert ds.catalogue.titles == [" Brush W ", "Cream's Y", "", "Lipstick X"]  # verbatim, as the Beauty folder's
    # (four of its titles end in a space: stripped, a prepared Beauty's item text and embeddings differed)
    # brand first, then category names without each path's root ("Beauty"), deduplicated in order
    assert ds.catalogue.attributes == [[], ["Skin Care"], [], ["Acme", "Makeup", "Lips", "Lipstick"]]
    assert (report.rows_read, report.duplicates_dropped, report.interactions) == (8, 1, 7)
    assert (report.users, report.items, report.kcore, report.kcore_interactions_dropped) == (3, 4, 0, 0)
    assert (report.metadata_rows, report.items_without_metadata) == (5, 1)  # Z
    assert (report.metadata_unused, report.metadata_duplicates) == (1, 1)  # Q; X's second row


def test_amazon2014_kcore_is_iterative(amazon, tmp_path: Path) -> None:
    # 2-core: W has 1 interaction -> C keeps only X -> C goes -> X has only A -> A loses X; A and B keep Y, Z.
    report = prepare_amazon2014(*amazon, tmp_path / "data", kcore=2)
    ds = load_dataset(tmp_path / "data")
    assert ds.catalogue.original_ids == ["Y", "Z"]
    assert _users_tsv(tmp_path / "data")[1:] == ["1\tB", "2\tA"]
    assert [s.tolist() for s in ds.sequences] == [[1, 2], [1, 2]]
    assert (report.kcore, report.kcore_interactions_dropped, report.kcore_users_dropped) == (2, 3, 1)
    assert (report.kcore_items_dropped, report.interactions, report.metadata_unused) == (2, 4, 3)
    with pytest.raises(ValueError, match="no interactions left after 3-core filtering"):
        prepare_amazon2014(*amazon, tmp_path / "other", kcore=3)
    with pytest.raises(ValueError, match="`kcore` must be a non-negative int"):
        prepare_amazon2014(*amazon, tmp_path / "other", kcore=-1)


def test_an_id_that_is_not_a_character_is_refused_and_a_failed_overwrite_changes_no_file(amazon, tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare_amazon2014(*amazon, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    surrogate = _write_gz(tmp_path / "reviews_s.json.gz", ['{"reviewerID": "U\\ud800", "asin": "A", "unixReviewTime": 1}'])
    with pytest.raises(ValueError, match=r"reviews_s.json.gz:1: the user id 'U\\ud800' holds '\\ud800', which is not a character"):
        prepare_amazon2014(surrogate, amazon[1], out, overwrite=True)
    catalogue = Catalogue(np.arange(1, 3), ["A", "B"], ["a", "b"], [[], [{1, 2}]])  # (a set: JSON cannot write it, mid-file)
    with pytest.raises(TypeError, match="set"):
        write_dataset(out, catalogue, [np.array([1, 2])], overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old dataset whole: no new sequences beside it


def test_existing_dataset_is_refused_unless_overwrite(amazon, tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare_amazon2014(*amazon, out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    np.save(out / "item_emb_old.npy", np.zeros((4, 2), dtype=np.float32))
    with pytest.raises(FileExistsError, match="already holds items.jsonl, sequences.txt, users.tsv, item_emb_old.npy, "
                       "which a dataset folder holds; pass --overwrite"):
        prepare_amazon2014(*amazon, out)
    theirs = tmp_path / "theirs"  # no items.jsonl, but someone's own sequences.txt: not replaced without --overwrite
    theirs.mkdir()
    (theirs / "sequences.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"theirs: already holds sequences.txt, which a dataset folder holds"):
        prepare_amazon2014(*amazon, theirs)
    assert (theirs / "sequences.txt").read_text() == "mine\n"
    for name, marker in (("a_run", "config.yaml"), ("codebooks", "semantic_ids.npz")):  # another semid folder:
        folder = tmp_path / name  # refused, with --overwrite too (its own commands would refuse it afterwards)
        folder.mkdir()
        (folder / marker).write_text("x")
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=rf"{name}: holds {marker}: a run or codebooks folder, not a dataset"):
                prepare_amazon2014(*amazon, folder, overwrite=overwrite)
        assert sorted(p.name for p in folder.iterdir()) == [marker]
    raw = tmp_path / "raw"  # a folder of one's own files (a placeholder, the raw download): written into as before
    raw.mkdir()
    (raw / ".gitkeep").write_text("")
    prepare_amazon2014(*amazon, raw)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="dangling: a symbolic link to nothing"):
        prepare_amazon2014(*amazon, tmp_path / "dangling")
    report = prepare_amazon2014(*amazon, out, overwrite=True)
    assert report.stale_files_removed == ("item_emb_old.npy",)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # deterministic, stale embeddings gone
    assert not list(out.glob(".*"))  # no temporary files left behind


# ---- recbole ------------------------------------------------------------------------------------------------------
def test_recbole_with_item_file(tmp_path: Path) -> None:
    inter = tmp_path / "toy.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     "u1\ti1\t5\t30\nu2\ti2\t3\t10\nu1\ti2\t4\t20\nu2\ti3\t1\t10\n")  # fmt: skip
    item = tmp_path / "toy.item"
    item.write_text("item_id:token\tmovie_title:token_seq\tgenre:token_seq\tbrand:token\tprice:float\n"
                    "i1\tToy Story\tAnimation Comedy\tPixar\t9.5\ni2\tHeat\tAction Crime Action\t\t3\n"
                    "i9\tUnused\tDrama\tX\t1\n")  # fmt: skip
    report = prepare_recbole(inter, item, tmp_path / "data")
    ds = load_dataset(tmp_path / "data")
    assert ds.catalogue.original_ids == ["i2", "i3", "i1"]
    assert [s.tolist() for s in ds.sequences] == [[1, 2], [1, 3]]  # u2 (t=10, 10), u1 (t=20, 30)
    assert _users_tsv(tmp_path / "data")[1:] == ["1\tu2", "2\tu1"]
    assert ds.catalogue.titles == ["Heat", "", "Toy Story"]
    assert ds.catalogue.attributes == [["Action", "Crime"], [], ["Animation", "Comedy", "Pixar"]]
    assert (report.items_without_metadata, report.metadata_unused, report.interactions) == (1, 1, 4)


# ---- csv ----------------------------------------------------------------------------------------------------------
def test_csv_with_custom_columns(tmp_path: Path) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text("uid,iid,ts,rating\nann,p2,5,1\nbob,p1,1.5,1\nann,p1,2,1\nann,p1,2,1\nbob,p3,7,1\n")
    items = tmp_path / "items.csv"
    items.write_text(
        'iid,name,brand,category\np1,"Shampoo, 2-pack",Lush,Hair\np2,Soap,,Bath\np3,Comb,Lush,Lush\n'
    )
    cols = {"user_column": "uid", "item_column": "iid", "time_column": "ts", "title_column": "name"}
    report = prepare_csv(inter, items, tmp_path / "data", **cols)
    ds = load_dataset(tmp_path / "data")
    assert ds.catalogue.original_ids == ["p1", "p2", "p3"]
    assert [s.tolist() for s in ds.sequences] == [[1, 3], [1, 2]]  # bob (1.5, 7), ann (2, 5)
    assert _users_tsv(tmp_path / "data")[1:] == ["1\tbob", "2\tann"]
    assert ds.catalogue.titles == ["Shampoo, 2-pack", "Soap", "Comb"]
    assert ds.catalogue.attributes == [["Lush", "Hair"], ["Bath"], ["Lush"]]
    assert (report.rows_read, report.duplicates_dropped, report.interactions) == (5, 1, 4)


def test_csv_quoting_mistakes_are_errors_and_a_byte_order_mark_is_not_a_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text('user,item,timestamp\nu1,"x,1\nu2,y",5\nu3,z,6\n')  # a quote left open: rows would merge
    with pytest.raises(ValueError, match=r"inter.csv:3: the user or item id holds a line break .*quote opened"):
        prepare_csv(inter, None, tmp_path / "a")
    items = tmp_path / "items.csv"
    items.write_text('item,title\nx,"Best" Shampoo\n')  # a quote inside a field: was read as `Best Shampoo`
    inter.write_text("user,item,timestamp\nu1,x,5\n")
    with pytest.raises(ValueError, match=r"items.csv:2: malformed CSV"):
        prepare_csv(inter, items, tmp_path / "b")
    inter.write_text("user,item,timestamp\nu1, x,5\nu2,x,6\n")  # ", " separators: ' x' is not 'x'; said
    with caplog.at_level("WARNING", logger="semid.prepare"):
        assert prepare_csv(inter, None, tmp_path / "d").items == 2
    assert "1 user or item ids have spaces around them (e.g. ' x')" in caplog.text
    inter.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\nu1,x,5\nu1,y,6\n")  # saved by a spreadsheet
    assert prepare_csv(inter, None, tmp_path / "c").interactions == 2
    assert load_dataset(tmp_path / "c").catalogue.original_ids == ["x", "y"]


def test_a_column_named_twice_or_serving_two_roles_is_refused(tmp_path: Path) -> None:
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp,timestamp\nu1,x,5,6\n")
    with pytest.raises(ValueError, match=r"inter.csv:1: the header names 'timestamp' 2 times"):
        prepare_csv(inter, None, tmp_path / "a")
    inter.write_text("user,item,timestamp\nu1,x,5\n")
    with pytest.raises(ValueError, match=r"inter.csv:1: one column serves two roles"):
        prepare_csv(inter, None, tmp_path / "b", item_column="user")


def test_an_array_of_python_objects_is_refused_as_such_not_as_damage(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj.npy: holds Python objects \(dtype object\), which semid never reads "
                       r"\(they would be unpickled\); save the vectors as a float array"):
        read_npy(tmp_path / "obj.npy")
    for shape in ((5,), (2, 3, 4)):  # named with the file, not as an anonymous `embeddings`
        with pytest.raises(ValueError, match=rf"bad.npy: embeddings must be a 2-D array .*got shape {re.escape(str(shape))}"):
            check_embedding_values(np.zeros(shape, dtype=np.float32), tmp_path / "bad.npy")


def _reference(rows: list[tuple[int, int, int]], k: int) -> tuple[list[int], list[int], list[list[int]]]:
    """Obvious dict-and-loop version of prepare's rules: dedupe, k-core, sort by (time, row), number."""
    kept, seen = [], set()
    for row, (u, i, t) in enumerate(rows):
        if (u, i, t) not in seen:
            seen.add((u, i, t))
            kept.append((t, row, u, i))
    while k:
        users, items = Counter(r[2] for r in kept), Counter(r[3] for r in kept)
        smaller = [r for r in kept if users[r[2]] >= k and items[r[3]] >= k]
        if len(smaller) == len(kept):
            break
        kept = smaller
    item_ids: dict[int, int] = {}
    user_ids: dict[int, int] = {}
    seqs: dict[int, list[int]] = {}
    for _, _, u, i in sorted(kept):
        item_ids.setdefault(i, len(item_ids) + 1)
        seqs.setdefault(user_ids.setdefault(u, len(user_ids) + 1), []).append(item_ids[i])
    return list(item_ids), list(user_ids), list(seqs.values())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=25
    ),
    k=st.integers(0, 3),
)
def test_numbering_dedupe_and_kcore_match_a_reference(rows: list[tuple[int, int, int]], k: int) -> None:
    items, users, seqs = _reference(rows, k)
    with tempfile.TemporaryDirectory() as tmp:
        inter = Path(tmp) / "inter.csv"
        inter.write_text("user,item,timestamp\n" + "".join(f"u{u},i{i},{t}\n" for u, i, t in rows))
        if not seqs:
            with pytest.raises(ValueError, match="no interactions left"):
                prepare_csv(inter, None, Path(tmp) / "data", kcore=k)
            return
        report = prepare_csv(inter, None, Path(tmp) / "data", kcore=k)
        ds = load_dataset(Path(tmp) / "data")
        assert ds.catalogue.original_ids == [f"i{i}" for i in items]
        assert [line.split("\t")[1] for line in _users_tsv(Path(tmp) / "data")[1:]] == [
            f"u{u}" for u in users
        ]
    assert [s.tolist() for s in ds.sequences] == seqs
    assert report.items_without_metadata == len(items)
    assert report.rows_read - report.duplicates_dropped - report.kcore_interactions_dropped == sum(
        map(len, seqs)
    )


# ---- bad input: file, line number, problem ------------------------------------------------------------------------
BAD_AMAZON = [
    ({"reviews": _reviews(REVIEWS[:1]) + ['{"reviewerID": "A"']}, r"reviews.json.gz:2: invalid JSON"),
    ({"reviews": ['{"reviewerID": "A", "asin": "X"}']}, r"reviews.json.gz:1: missing field `unixReviewTime`"),
    ({"reviews": _reviews([("A", "X", 1), ("A", "Y", "yesterday")])}, r"reviews.json.gz:2: timestamp 'yesterday' is not"),
    ({"reviews": _reviews(REVIEWS[:1]) + [""]}, r"reviews.json.gz:2: empty line"),
    ({"reviews": _reviews([("A", None, 1)])}, r"reviews.json.gz:1: user and item ids must be non-empty strings"),
    ({"meta": ["{'asin': 'X'}", "{'asin': 'Y', 'title': oops}"]}, r"meta.json.gz:2: not a Python dict literal as Amazon's 2014 metadata files hold"),
    ({"meta": ["{'title': 'no asin'}"]}, r"meta.json.gz:1: missing field `asin`"),
    ({"meta": ["{'asin': 'X', 'categories': ['Beauty']}"]}, r"meta.json.gz:1: `categories` must be a list of lists"),
    ({"meta": ["{'asin': None, 'title': 'x'}"]}, r"meta.json.gz:1: `asin` must be a non-empty string, got None"),  # (was item "None")
    ({"meta": ["{'asin': 5}"]}, r"meta.json.gz:1: `asin` must be a non-empty string, got 5"),
    ({"reviews": _reviews([("A", "X", 2**60 + 1), ("A", "Y", 1.5)])}, r"reviews.json.gz:1: timestamp 1152921504606846977 is an "
     r"integer above 2\^53 and .*reviews.json.gz:2: timestamp 1.5 has a fraction"),
    # a title that is not text (items.jsonl held it, and a later command failed naming no file)
    ({"meta": ["{'asin': 'X', 'title': 'Bad \\ud800 title'}"]}, r"meta.json.gz:1: item 'X'\'s title 'Bad \\ud800 title' holds "),
    # one line of gigabytes from a small .gz was read whole (here: one line past the limit, the limit lowered)
    ({"reviews": _reviews(REVIEWS[:1]) + ['{"reviewerID": "' + "A" * 300 + '"}']}, r"reviews.json.gz:2: a line longer than 256"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "message"), BAD_AMAZON)
def test_amazon2014_errors_name_file_and_line(
    tmp_path: Path, files: dict[str, list[str]], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("semid._readers.MAX_LINE", 256)
    reviews = _write_gz(tmp_path / "reviews.json.gz", files.get("reviews", _reviews(REVIEWS)))
    meta = _write_gz(tmp_path / "meta.json.gz", files.get("meta", META))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*" + message):
        prepare_amazon2014(reviews, meta, tmp_path / "data")
    assert not (tmp_path / "data" / "items.jsonl").exists()


INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"
BAD_TABULAR = [
    ("recbole", INTER_HEADER + "u\ti\t1\nu\ti\n", None, r"x.inter:3: expected 3 tab-separated columns .*got 2"),
    ("recbole", "user_id:str\titem_id:token\n", None, r"x.inter:1: header column 1 is 'user_id:str'"),
    ("recbole", "user_id:token\titem_id:token\n", None, r"x.inter:1: no time column 'timestamp' in the header"),
    ("recbole", INTER_HEADER + "u\ti\tnoon\n", None, r"x.inter:2: timestamp 'noon' is not a finite number"),
    ("recbole", INTER_HEADER + "u\ti\t1\n", "item:token\ttitle:token\n", r"x.item:1: no item column 'item_id'"),
    ("csv", "usr,item,timestamp\n", None, r"x.csv:1: no user column 'user' in the header; columns are"),
    ("csv", "user,item,timestamp\na,b,1\na,b\n", None, r"x.csv:3: expected 3 columns .*got 2"),
    ("csv", "user,item,timestamp\na,b,1\n\na,c,2\n", None, r"x.csv:3: empty line"),
    ("csv", "user,item,timestamp\na,b,nan\n", None, r"x.csv:2: timestamp 'nan' is not a finite number"),
    ("csv", "user,item,timestamp\na,b,2020_01_15\n", None,  # (Python's float read it as 20200115)
     r"x.csv:2: timestamp '2020_01_15' is not a finite number"),
    ("csv", "user,item,timestamp\na,b,\u0661\u0662\n", None, r"x.csv:2: timestamp '\u0661\u0662' is not a finite number"),
    ("csv", "user,item,timestamp\na,b,1\n", "item,name\nb,x\n", r"items.csv:1: no title column 'title'"),
    ("csv", "user,item,timestamp\n", None, r"x.csv: no interactions \(an empty file, or a header alone\)"),
    ("csv", "user,item,timestamp\na,b,1" + "0" * 25 + "\n", None, r"x.csv:2: timestamp '10*' is beyond a 64-bit integer"),
    ("csv", "user,item,timestamp\nu1,a,9007199254740993\nu1,b,1e300\n", None,  # (a float beside int64 times overflowed)
     r"x.csv:3: timestamp '1e300' is beyond a 64-bit integer"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "inter", "items", "message"), BAD_TABULAR)
def test_tabular_errors_name_file_and_line(
    tmp_path: Path, fmt: str, inter: str, items: str | None, message: str
) -> None:
    inter_path = tmp_path / ("x.inter" if fmt == "recbole" else "x.csv")
    inter_path.write_text(inter)
    items_path = None
    if items is not None:
        items_path = tmp_path / ("x.item" if fmt == "recbole" else "items.csv")
        items_path.write_text(items)
    prepare = prepare_recbole if fmt == "recbole" else prepare_csv
    with pytest.raises(ValueError, match=message):
        prepare(inter_path, items_path, tmp_path / "data")


NOT_UTF8 = b"\xe9"  # latin-1 "e acute": not UTF-8 on its own


@pytest.mark.parametrize("where", ["interactions", "items", "recbole", "reviews.gz"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path, where: str) -> None:
    rows = [f"u{r % 7},i{r % 11},{r}".encode() for r in range(3000)]  # far past the first decoded block
    rows[2500] = b"u1,caf" + NOT_UTF8 + b",2500"
    inter, items = tmp_path / "x.csv", None
    inter.write_bytes(b"user,item,timestamp\n" + b"\n".join(rows if where == "interactions" else rows[:10]) + b"\n")
    if where == "items":
        items = tmp_path / "items.csv"
        items.write_bytes(b'item,title\ni1,"a\r\ntwo-line title"\ni2,Caf\xc3\xa9\ni3,Caf' + NOT_UTF8 + b"\n")
        bad, line = items, 5  # the quoted title spans lines 2-3; line 4's UTF-8 "\u00e9" is fine
        prepare = partial(prepare_csv, inter, items)
    elif where == "recbole":
        bad, line = tmp_path / "x.inter", 3
        bad.write_bytes(INTER_HEADER.encode() + b"u\ti\t1\nu\t" + NOT_UTF8 + b"\t2\n")
        prepare = partial(prepare_recbole, bad, None)
    elif where == "reviews.gz":
        bad, line = tmp_path / "reviews.json.gz", 2
        with gzip.open(bad, "wb") as f:
            f.write("\n".join(_reviews(REVIEWS[:2])).encode().replace(b'"Y"', b'"' + NOT_UTF8 + b'"') + b"\n")
        prepare = partial(prepare_amazon2014, bad, _write_gz(tmp_path / "meta.json.gz", META))
    else:
        bad, line = inter, 2502  # the header, then rows 0..2500
        prepare = partial(prepare_csv, inter, None)
    with pytest.raises(ValueError, match=re.escape(f"{bad}:{line}: not UTF-8 text (byte 0xe9 at column")):
        prepare(tmp_path / "data")
    assert not (tmp_path / "data" / "items.jsonl").exists()


def test_cli_prepare_names_the_line_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    inter = tmp_path / "x.csv"
    inter.write_bytes(b"user,item,timestamp\na,b,1\na,c" + NOT_UTF8 + b",2\n")
    assert main(["prepare", "--format", "csv", "--interactions", str(inter), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert f"{inter}:3: not UTF-8 text (byte 0xe9 at column 4); save the file as UTF-8" in err


def test_missing_input_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent.csv: no such file"):
        prepare_csv(tmp_path / "absent.csv", None, tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"folder: a folder, not a file: give the file itself"):  # ("no such
        prepare_csv(Path(tmp_path / "folder").mkdir() or tmp_path / "folder", None, tmp_path / "data")  # file")


def test_write_dataset_validates_its_inputs(tmp_path: Path) -> None:
    cat = Catalogue(np.arange(1, 3), ["a", "b"], ["A", "B"], [[], ["x"]])
    with pytest.raises(ValueError, match=r"`sequences\[1\]` has item ids outside \[1, 2\]"):
        write_dataset(tmp_path / "d", cat, [np.array([1]), np.array([2, 3])])
    with pytest.raises(ValueError, match=r"`sequences\[0\]` must be a non-empty 1-D int array"):
        write_dataset(tmp_path / "d", cat, [np.array([], dtype=np.int64)])
    with pytest.raises(ValueError, match="`original_user_ids` must have 1 entries"):
        write_dataset(tmp_path / "d", cat, [np.array([1])], original_user_ids=["a", "b"])
    assert not (tmp_path / "d").exists()
    write_dataset(tmp_path / "d", cat, [np.array([2, 1])], original_user_ids=["x y"])
    ds = load_dataset(tmp_path / "d")
    assert ds.catalogue == cat and ds.catalogue != Catalogue(np.arange(1, 2), ["a"], ["A"], [[]])
    assert [s.tolist() for s in ds.sequences] == [[2, 1]] and _users_tsv(tmp_path / "d")[1] == "1\tx y"


# ---- command line -------------------------------------------------------------------------------------------------
def test_cli_prepare_writes_the_folder_and_prints_report_and_summary(amazon, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    argv = ["prepare", "--format", "amazon2014", "--reviews", str(amazon[0]), "--meta", str(amazon[1])]
    assert main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "duplicate rows dropped  1" in stdout and "items without metadata  1" in stdout
    assert "interactions            7" in stdout  # the summary of the folder, read back
    assert load_dataset(out).num_users == 3
    assert main([*argv, "--out", str(out)]) == 2
    assert "semid prepare: error:" in capsys.readouterr().err


def test_cli_prepare_reports_bad_input_and_bad_flags(tmp_path: Path, capsys) -> None:
    inter = tmp_path / "x.csv"
    inter.write_text("user,item,timestamp\na,b,later\n")
    assert (
        main(["prepare", "--format", "csv", "--interactions", str(inter), "--out", str(tmp_path / "d")]) == 2
    )
    err = capsys.readouterr().err
    assert f"{inter}:2: timestamp 'later' is not a finite number" in err
    assert main(["prepare", "--format", "csv", "--reviews", str(inter), "--out", str(tmp_path / "d")]) == 2
    assert "--reviews does not apply to --format csv" in capsys.readouterr().err
    assert main(["prepare", "--format", "recbole", "--out", str(tmp_path / "d")]) == 2
    assert "--format recbole needs --inter" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.realdata
def test_beauty_round_trips_byte_for_byte(beauty_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(beauty_dir)
    write_dataset(tmp_path / "copy", ds.catalogue, ds.sequences)
    for name in ("items.jsonl", "sequences.txt"):
        assert (tmp_path / "copy" / name).read_bytes() == (beauty_dir / name).read_bytes(), name


def test_nanosecond_timestamps_stay_exact(tmp_path: Path) -> None:
    # a float64 rounds integers above 2^53: these three distinct times were read as equal, one row dropped as a
    # duplicate and the rest left in file order (b, a) instead of time order (a, b, a)
    inter = tmp_path / "x.csv"
    inter.write_text("user,item,timestamp\nu1,b,1700000000000000002\nu1,a,1700000000000000001\nu1,a,1700000000000000003\nu2,a,1\n")
    report = prepare_csv(inter, None, tmp_path / "data")
    ds = load_dataset(tmp_path / "data")
    assert report.duplicates_dropped == 0 and [s.tolist() for s in ds.sequences] == [[1], [1, 2, 1]]
    assert ds.catalogue.original_ids == ["a", "b"]


def test_prepare_refuses_what_it_cannot_do_before_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inter = tmp_path / "x.csv"
    inter.write_text("user,item,timestamp\na,b,1\n")
    (tmp_path / "afile").write_text("")
    assert main(["prepare", "--format", "csv", "--interactions", str(inter), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder; choose another --out" in capsys.readouterr().err
    assert main(["prepare", "--format", "csv", "--interactions", str(inter), "--time-column", " ", "--out", str(tmp_path / "d")]) == 2
    assert "--time-column is empty: name a column" in capsys.readouterr().err  # (it was replaced by the default)
    packed = tmp_path / "packed.csv"  # gzip data named as text: it was "not UTF-8 ... save the file as UTF-8"
    packed.write_bytes(gzip.compress(inter.read_bytes()))
    assert main(["prepare", "--format", "csv", "--interactions", str(packed), "--out", str(tmp_path / "d")]) == 2
    assert "packed.csv: gzip-compressed, not text: name it packed.csv.gz" in capsys.readouterr().err
