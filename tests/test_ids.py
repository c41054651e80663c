import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semid.ids import SemanticIDs


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(1, 4),
    levels=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_extra_level_makes_tuples_unique(n, k, levels, seed):
    codes = np.random.default_rng(seed).integers(0, k, size=(n, levels))
    ids = SemanticIDs.from_codes(codes, [k] * levels, extra_level_size=n)
    assert ids.codes.shape == (n, levels + 1)
    assert len({tuple(r) for r in ids.codes.tolist()}) == n
    assert np.array_equal(ids.codes[:, :levels], codes)
    # extra level numbers each collision group 0, 1, 2, ... in item order
    for tup in {tuple(r) for r in codes.tolist()}:
        rows = np.flatnonzero((codes == tup).all(axis=1))
        assert ids.codes[rows, levels].tolist() == list(range(rows.size))
    stats = ids.collision_stats()
    counts = np.unique(codes, axis=0, return_counts=True)[1]
    assert stats.largest_group == counts.max()
    assert stats.items_colliding == counts[counts > 1].sum()
    assert stats.extra_level_used == counts.max()
    # lookups are inverse of each other
    assert np.array_equal(ids.items_of(ids.codes_of(ids.item_ids)), ids.item_ids)


def test_save_load_round_trip(tmp_path):
    codes = np.random.default_rng(0).integers(0, 5, size=(40, 2))
    ids = SemanticIDs.from_codes(codes, [5, 5], extra_level_size=8)
    ids.save(tmp_path / "ids.npz", method="test")
    loaded = SemanticIDs.load(tmp_path / "ids.npz")
    assert loaded == ids
    assert SemanticIDs.load_metadata(tmp_path / "ids.npz")["method"] == "test"
    assert not [p for p in tmp_path.iterdir() if p.name != "ids.npz"]  # no temp files left behind


def test_add_items_keeps_old_tuples():
    codes = np.array([[0, 1], [0, 1], [2, 2]])
    ids = SemanticIDs.from_codes(codes, [3, 3], extra_level_size=4)
    more = ids.add_items(np.array([[0, 1], [1, 1], [1, 1]]), np.array([4, 5, 6]))
    assert np.array_equal(more.codes[:3], ids.codes)
    assert more.codes[3:].tolist() == [[0, 1, 2], [1, 1, 0], [1, 1, 1]]
    assert len({tuple(r) for r in more.codes.tolist()}) == 6


def test_add_items_errors():
    ids = SemanticIDs.from_codes(np.array([[0, 1], [0, 1]]), [3, 3], extra_level_size=2)
    with pytest.raises(ValueError, match="must all be > 2"):
        ids.add_items(np.array([[2, 2]]), np.array([2]))
    with pytest.raises(ValueError) as e:  # (it advised raising `extra_level_size`, which the IDs fix here)
        ids.add_items(np.array([[0, 1]]), np.array([3]))
    assert str(e.value).endswith("too many others for the IDs' extra level; fit codebooks again (more levels or larger "
                                 "codebooks)") and "raise" not in str(e.value)


@pytest.mark.parametrize(
    "codes, sizes, match",
    [
        (np.array([[0, 5]]), [3, 3], r"codes\[0, 1\]` is 5"),
        (np.array([[0.5, 1]]), [3, 3], "integer array"),
        (np.array([0, 1]), [3, 3], r"\(N, L\)"),
        (np.array([[0, 1]]), [3], "2 entries"),
    ],
)
def test_from_codes_errors(codes, sizes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SemanticIDs.from_codes(codes, sizes, extra_level_size=2)


def test_too_many_collisions_for_extra_level():
    with pytest.raises(ValueError, match="extra-level value 2"):
        SemanticIDs.from_codes(np.zeros((3, 2), dtype=int), [2, 2], extra_level_size=2)


def test_unknown_item_and_bad_file(tmp_path):
    ids = SemanticIDs.from_codes(np.array([[0], [1]]), [2], extra_level_size=1)
    with pytest.raises(ValueError, match="unknown item id 7"):
        ids.codes_of(np.array([1, 7]))
    assert ids.items_of(np.array([[1, 0], [0, 0], [1, 1]])).tolist() == [2, 1, -1]  # [1, 1]: extra level out of range
    assert ids.items_of(np.array([5, 0])).tolist() == -1
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a semantic IDs file"):
        SemanticIDs.load(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError, match="fit-codebooks"):
        SemanticIDs.load(tmp_path / "missing.npz")


def test_corrupt_file_error_names_the_path(tmp_path):
    bad = tmp_path / "semantic_ids.npz"
    bad.write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match=r"semantic_ids.npz: not a readable semantic IDs file"):
        SemanticIDs.load(bad)
    np.savez(bad, codes=np.zeros((2, 2), dtype=object), item_ids=np.arange(2), meta=np.array("{}"))
    with pytest.raises(ValueError, match=r"semantic_ids.npz: not a readable semantic IDs file"):
        SemanticIDs.load(bad)


def _patched(src, dst, offset_of, value: bytes) -> None:  # noqa: ANN001
    data = bytearray(src.read_bytes())
    for at in offset_of(data):
        data[at: at + len(value)] = value
    dst.write_bytes(bytes(data))


def test_damaged_zips_and_an_empty_file_are_errors_naming_it(tmp_path):
    """zipfile's and zlib's own exceptions (a compression method it cannot read, an encrypted member, damaged deflate
    data) and an IDs file of no items are ValueErrors naming the file, not tracebacks."""
    ids = SemanticIDs.from_codes(np.array([[0], [1], [1]]), [2], extra_level_size=2)
    plain = tmp_path / "plain.npz"
    ids.save(plain)
    data = plain.read_bytes()

    def local_headers(d):  # (the offsets of each local file header, PK\x03\x04)
        at, out = d.find(b"PK\x03\x04"), []
        while at >= 0:
            out.append(at)
            at = d.find(b"PK\x03\x04", at + 4)
        return out

    def central_headers(d):
        at, out = d.find(b"PK\x01\x02"), []
        while at >= 0:
            out.append(at)
            at = d.find(b"PK\x01\x02", at + 4)
        return out

    method = tmp_path / "method.npz"  # compression method 99 in every header
    _patched(plain, method, lambda d: [a + 8 for a in local_headers(d)] + [a + 10 for a in central_headers(d)], b"\x63\x00")
    encrypted = tmp_path / "encrypted.npz"  # the encryption flag in every header
    _patched(plain, encrypted, lambda d: [a + 6 for a in local_headers(d)] + [a + 8 for a in central_headers(d)], b"\x01\x00")
    deflated = tmp_path / "deflated.npz"

    with zipfile.ZipFile(plain) as z, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info))
    raw = bytearray(deflated.read_bytes())
    first = local_headers(bytes(raw))[0]
    start = first + 30 + int.from_bytes(raw[first + 26: first + 28], "little") + int.from_bytes(raw[first + 28: first + 30], "little")
    raw[start: start + 8] = b"\xff" * 8  # the first member's deflate stream damaged
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(raw))
    empty = tmp_path / "empty.npz"
    np.savez(empty, codes=np.zeros((0, 2), dtype=np.int64), item_ids=np.zeros(0, dtype=np.int64),
             meta=np.array(json.dumps({"format": "semid.semantic_ids", "version": 1, "codebook_sizes": [2, 2]})))
    assert data != method.read_bytes() != encrypted.read_bytes()
    for path in (method, encrypted, damaged):
        with pytest.raises(ValueError, match=rf"{path.name}: not a readable semantic IDs file"):
            SemanticIDs.load(path)
    with pytest.raises(ValueError, match=r"empty.npz: the semantic IDs file holds no items"):
        SemanticIDs.load(empty)


def test_crafted_ids_are_refused_naming_what_is_wrong(tmp_path):
    codes = np.array([[0, 0], [1, 0], [2, 1]])
    # uint64 ids out of order: np.diff wrapped around, so "strictly ascending" passed
    with pytest.raises(ValueError, match="strictly ascending"):
        SemanticIDs(codes, np.array([1, 3, 2], dtype=np.uint64), [3, 2])
    with pytest.raises(ValueError, match="beyond an int64 id"):
        SemanticIDs(codes, np.array([1, 2, 2**63], dtype=np.uint64), [3, 2])
    # a codebook far larger than its codes and the catalogue: a 10 KB file made training allocate 256 GB
    with pytest.raises(ValueError, match=r"codebook size 500,000,000 at level 0 is more than max\(65,536, the 3 items\)"):
        SemanticIDs(codes, np.array([1, 2, 3]), [500_000_000, 2])
    assert SemanticIDs(codes, np.array([1, 2, 3]), [65_536, 2]).codebook_sizes == (65_536, 2)  # (the limit itself)
    # a recorded embeddings digest that is not a string failed with "'int' object is not subscriptable"
    from semid.codebooks import check_ids_for

    ids = SemanticIDs(codes, np.array([1, 2, 3]), [3, 2])
    ids.save(tmp_path / "ids.npz", embeddings="item_emb.npy", embeddings_sha256=5)
    (tmp_path / "item_emb.npy").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"ids.npz: `meta.embeddings_sha256` must be a string, got 5"):
        check_ids_for(ids, tmp_path / "ids.npz", 3, tmp_path)
