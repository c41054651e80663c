"""`semid prepare`: raw interaction data -> the canonical dataset folder (see :mod:`semid.data`).

Formats:

- ``amazon2014``: ``reviews_<Category>_5.json.gz`` (JSON lines: reviewerID, asin, unixReviewTime) and
  ``meta_<Category>.json.gz`` (one Python-literal dict a line: asin, title, brand, categories). Attributes are the
  brand (when present) then the category names of every category path, without each path's root (the category of
  the whole file, e.g. "Beauty"), deduplicated in order -- as in ../shared/data/beauty. Titles are kept verbatim.
- ``recbole``: ``<name>.inter`` (tab-separated, typed header ``user_id:token  item_id:token  timestamp:float ...``)
  and optionally ``<name>.item``: its title-like ``:token``/``:token_seq`` column (name contains "title") is the
  title, the other ``:token``/``:token_seq`` columns are attributes (a token_seq gives one attribute per
  space-separated token); float columns are ignored.
- ``csv``: an interactions CSV with user, item and timestamp columns, optionally an items CSV with the item column,
  a title column and other text columns (one attribute per non-empty cell, in column order).

Any input file may be gzip-compressed (name ending in ``.gz``). Timestamps must be numbers.

Numbering (deterministic): the interactions kept are sorted by (timestamp, position in the input file) -- a stable
sort, so ties keep file order. Item ids 1..N follow the order in which items first appear in that sorted stream;
user ids 1..U likewise. Each user's sequence is their interactions in that order. Original ids are kept: the
``asin`` field of items.jsonl (whatever the source) and ``users.tsv`` (``user_id<TAB>original_user_id``).

Nothing is dropped silently; :class:`PrepareReport` counts: rows repeating an earlier (user, item, timestamp) row
(dropped), interactions/users/items removed by ``kcore`` (iterative k-core; 0 = off), items without metadata
(kept, with an empty title), metadata rows for items without interactions and repeated metadata rows (first kept).
Bad input raises ValueError naming the file, the line number and the problem.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semid._readers import (
    _append,
    _columns,
    _csv_header,
    _csv_rows,
    _get,
    _Interactions,
    _json_lines,
    _Metadata,
    _read_amazon_meta,
    _read_table,
    _recbole_header,
    _tsv_rows,
)
from semid.data import EMBEDDING_PREFIX, ITEMS_FILE, SEQUENCES_FILE, USERS_FILE, Catalogue
from semid.io import atomic_open, check_can_write
from semid.safe_read import is_int, lone_surrogate

log = logging.getLogger(__name__)

FORMATS = ("amazon2014", "recbole", "csv")


@dataclass(frozen=True)
class PrepareReport:
    """What ``prepare_*`` read, kept and dropped; nothing else is dropped. Invariant:
    ``rows_read - duplicates_dropped - kcore_interactions_dropped == interactions``."""

    format: str  # one of FORMATS
    out: Path  # the dataset folder written
    rows_read: int  # interaction rows in the input
    duplicates_dropped: int  # rows repeating an earlier (user, item, timestamp)
    kcore: int  # the k of k-core filtering; 0 = off
    kcore_interactions_dropped: int
    kcore_users_dropped: int
    kcore_items_dropped: int
    users: int  # U written
    items: int  # N written
    interactions: int  # written
    metadata_rows: int  # item metadata rows in the input
    items_without_metadata: int  # kept, with an empty title and no attributes
    metadata_unused: int  # metadata of items without (remaining) interactions: not in the catalogue
    metadata_duplicates: int  # metadata rows repeating an item; the first is kept
    stale_files_removed: tuple[str, ...] = ()  # item_emb_*.npy of the dataset that --overwrite replaced


PathLike = str | os.PathLike[str]


# ---- public entry points ---------------------------------------------------------------------------------------
def prepare_amazon2014(
    reviews: PathLike, meta: PathLike, out: PathLike, kcore: int = 0, overwrite: bool = False
) -> PrepareReport:
    """Amazon review data (2014): ``reviews_<Category>_5.json.gz`` + ``meta_<Category>.json.gz`` -> ``out``."""
    _check_args(out, kcore, overwrite)
    inter = _Interactions(Path(reviews))
    for where, rec in _json_lines(inter.source):
        user, item, ts = (_get(rec, key, where) for key in ("reviewerID", "asin", "unixReviewTime"))
        _append(inter, user, item, ts, where)
    return _finish("amazon2014", inter, _read_amazon_meta(Path(meta)), out, kcore, overwrite)


def prepare_recbole(
    inter: PathLike,
    item: PathLike | None,
    out: PathLike,
    *,
    kcore: int = 0,
    overwrite: bool = False,
    user_field: str = "user_id",
    item_field: str = "item_id",
    time_field: str = "timestamp",
) -> PrepareReport:
    """RecBole atomic files: ``<name>.inter`` and optionally ``<name>.item`` -> ``out``."""
    _check_args(out, kcore, overwrite)
    raw = _read_table(Path(inter), _tsv_rows, _recbole_header, user_field, item_field, time_field)
    meta = _Metadata()
    if item is not None:
        path = Path(item)
        rows = _tsv_rows(path)
        names, types = zip(*_recbole_header(path, next(rows, None), typed=True), strict=True)
        (key,) = _columns(path, list(names), {"item": item_field})
        text = [c for c, ty in enumerate(types) if c != key and ty in ("token", "token_seq")]
        title = next((c for c in text if "title" in names[c].lower()), None)
        attrs = [(c, types[c] == "token_seq") for c in text if c != title]
        for where, row in rows:
            values = (row[c].split(" ") if seq else [row[c]] for c, seq in attrs)
            meta.add(row[key], row[title] if title is not None else "", (a for vs in values for a in vs), where)
    return _finish("recbole", raw, meta, out, kcore, overwrite)


def prepare_csv(
    interactions: PathLike,
    items: PathLike | None,
    out: PathLike,
    *,
    kcore: int = 0,
    overwrite: bool = False,
    user_column: str = "user",
    item_column: str = "item",
    time_column: str = "timestamp",
    title_column: str = "title",
) -> PrepareReport:
    """CSV files: interactions (user, item, timestamp columns) and optionally items (item, title, text columns)."""
    _check_args(out, kcore, overwrite)
    raw = _read_table(Path(interactions), _csv_rows, _csv_header, user_column, item_column, time_column)
    meta = _Metadata()
    if items is not None:
        path = Path(items)
        rows = _csv_rows(path)
        header = _csv_header(path, next(rows, None))
        key, title = _columns(path, header, {"item": item_column, "title": title_column})
        others = [c for c in range(len(header)) if c not in (key, title)]
        for where, row in rows:
            meta.add(row[key], row[title], (row[c] for c in others), where)
    return _finish("csv", raw, meta, out, kcore, overwrite)


def write_dataset(
    out: PathLike,
    catalogue: Catalogue,
    sequences: Sequence[np.ndarray],
    *,
    original_user_ids: Sequence[str] | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write a canonical dataset folder, its three files put in place together once all are whole (a failure leaves
    the folder's files as they were); users are numbered 1..U in ``sequences`` order.

    Args:
        catalogue: the N items (item ids 1..N).
        sequences: U int arrays of item ids in [1, N], oldest first, each non-empty.
        original_user_ids: U original user ids for ``users.tsv`` (default: the new ids).
        overwrite: replace an existing dataset in ``out``; its ``item_emb_*.npy`` files (made from the old items)
            are removed.
    Returns:
        the names of stale files removed.
    """
    out = Path(out)
    _check_out(out, overwrite)
    n, num_users = catalogue.num_items, len(sequences)
    if num_users == 0:
        raise ValueError("`sequences` must hold at least one user, got 0")
    originals = (
        [str(u) for u in range(1, num_users + 1)] if original_user_ids is None else list(original_user_ids)
    )
    if len(originals) != num_users:
        raise ValueError(
            f"`original_user_ids` must have {num_users} entries (one per sequence), got {len(originals)}"
        )
    for u, seq in enumerate(sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(
                f"`sequences[{u}]` must be a non-empty 1-D int array, got {seq.dtype} {seq.shape}"
            )
        if seq.min() < 1 or seq.max() > n:
            raise ValueError(f"`sequences[{u}]` has item ids outside [1, {n}]: {seq.tolist()[:10]}")
    bad = next((o for o in originals if any(c in o for c in "\t\r\n")), None)
    if bad is not None:
        raise ValueError(f"original user id {bad!r} contains a tab or newline; users.tsv cannot hold it")
    bad = next((o for o in originals if lone_surrogate(o) is not None), None)
    if bad is not None:
        raise ValueError(f"original user id {bad[:40]!r} holds a lone surrogate escape; users.tsv (UTF-8) cannot hold it")
    removed = []
    if overwrite:
        for stale in sorted(out.glob(f"{EMBEDDING_PREFIX}*.npy")):
            log.warning("%s: removing %s, made from the items being replaced", out, stale.name)
            stale.unlink()
            removed.append(stale.name)
    # the three files written to temporary files together and put in place only when all three are whole (a failure
    # leaves the folder's files as they were, never the new sequences beside the old items); items.jsonl is renamed
    # last (the first context is left last): its presence marks a dataset
    with atomic_open(out / ITEMS_FILE, "w", encoding="utf-8") as fi, atomic_open(out / USERS_FILE, "w", encoding="utf-8") as fu, \
            atomic_open(out / SEQUENCES_FILE, "w", encoding="utf-8") as fs:
        for u, seq in enumerate(sequences, start=1):
            fs.write(f"{u} {' '.join(map(str, np.asarray(seq).tolist()))}\n")
        fu.write("user_id\toriginal_user_id\n")
        fu.writelines(f"{u}\t{o}\n" for u, o in enumerate(originals, start=1))
        for i in range(n):
            rec = {"item_id": i + 1, "asin": catalogue.original_ids[i], "title": catalogue.titles[i]}
            fi.write(json.dumps({**rec, "attributes": catalogue.attributes[i]}) + "\n")
    log.info("wrote %s: %d users, %d items", out, num_users, n)
    return removed


# ---- building: dedupe, k-core, order, number --------------------------------------------------------------------
def _finish(
    fmt: str, raw: _Interactions, meta: _Metadata, out: PathLike, kcore: int, overwrite: bool
) -> PrepareReport:
    n = len(raw.users)
    if n == 0:
        raise ValueError(f"{raw.source}: no interactions (an empty file, or a header alone): give the file with one "
                         "interaction per row")
    users, user_names = _encode(raw.users)
    items, item_names = _encode(raw.items)
    names = np.concatenate([user_names, item_names]).astype(str)
    spaced = names[np.char.strip(names) != names]
    if spaced.size:  # "u1, x, 5": ' x' and 'x' are two items unless the file says otherwise: said, not guessed
        log.warning("%s: %d user or item ids have spaces around them (e.g. %r), kept as they are, so %r and %r are two "
                    "ids; remove the spaces in the file if they are one", raw.source, spaced.size, str(spaced[0]),
                    str(spaced[0]), str(spaced[0]).strip())
    if raw.beyond_float and raw.fractional:  # (a float64 would round the large ones: distinct rows made duplicates)
        raise ValueError(f"{raw.beyond_float} is an integer above 2^53 and {raw.fractional} has a fraction: the two "
                         "cannot be ordered exactly together; write every timestamp as an integer in one unit")
    times = np.asarray(raw.times, dtype=np.int64 if raw.beyond_float else np.float64)  # exact either way
    # 1. a row repeating an earlier (user, item, timestamp) is dropped; the first in file order stays
    order = np.lexsort((np.arange(n), times, items, users))
    same = (np.diff(users[order]) == 0) & (np.diff(items[order]) == 0) & (np.diff(times[order]) == 0)
    keep = np.ones(n, dtype=bool)
    keep[order[1:][same]] = False
    duplicates = n - int(keep.sum())
    # 2. iterative k-core: drop users and items with fewer than k interactions until none is left
    users_before, items_before = np.unique(users[keep]).size, np.unique(items[keep]).size
    kept_before_kcore = int(keep.sum())
    while kcore > 0:
        user_count = np.bincount(users[keep], minlength=len(user_names))
        item_count = np.bincount(items[keep], minlength=len(item_names))
        drop = keep & ((user_count[users] < kcore) | (item_count[items] < kcore))
        if not drop.any():
            break
        keep &= ~drop
    if not keep.any():
        raise ValueError(f"{raw.source}: no interactions left after {kcore}-core filtering: lower --kcore (0 keeps "
                         "every interaction)")
    # 3. sort by (timestamp, file order); number items and users by first appearance
    rows = np.flatnonzero(keep)
    rows = rows[np.argsort(times[rows], kind="stable")]
    new_items, item_codes = _number_by_first_appearance(items[rows])
    new_users, user_codes = _number_by_first_appearance(users[rows])
    by_user = np.argsort(new_users, kind="stable")  # stable: each user's items stay in time order
    sequences = np.split(new_items[by_user], np.cumsum(np.bincount(new_users)[1:])[:-1])
    # 4. catalogue from metadata; items without metadata keep an empty title
    originals = [item_names[c] for c in item_codes.tolist()]
    found = [meta.by_item.get(o) for o in originals]
    catalogue = Catalogue(
        item_ids=np.arange(1, len(originals) + 1, dtype=np.int64),
        original_ids=originals,
        titles=[m[0] if m else "" for m in found],
        attributes=[list(m[1]) if m else [] for m in found],
    )
    missing = sum(m is None for m in found)
    if missing:
        log.warning("%d of %d items have no metadata; they are kept with an empty title", missing, len(found))
    out = Path(out)
    removed = write_dataset(
        out,
        catalogue,
        sequences,
        original_user_ids=[user_names[c] for c in user_codes.tolist()],
        overwrite=overwrite,
    )
    report = PrepareReport(
        format=fmt,
        out=out,
        rows_read=n,
        duplicates_dropped=duplicates,
        kcore=int(kcore),
        kcore_interactions_dropped=kept_before_kcore - rows.size,
        kcore_users_dropped=users_before - len(sequences),
        kcore_items_dropped=items_before - catalogue.num_items,
        users=len(sequences),
        items=catalogue.num_items,
        interactions=int(rows.size),
        metadata_rows=meta.rows,
        items_without_metadata=missing,
        metadata_unused=len(meta.by_item) - (len(found) - missing),
        metadata_duplicates=meta.duplicates,
        stale_files_removed=tuple(removed),
    )
    assert (
        report.rows_read - report.duplicates_dropped - report.kcore_interactions_dropped
        == report.interactions
    ), f"prepare lost rows without counting them: {report}"
    return report


def _encode(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Strings -> int codes in first-seen order. Returns codes (n,) and the names of codes 0, 1, ..."""
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(s, len(index)) for s in names), dtype=np.int64, count=len(names))
    return codes, list(index)


def _number_by_first_appearance(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber codes (n,) to 1..K in order of first appearance. Returns new ids (n,) and old code of ids 1..K."""
    uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[by_first] = np.arange(uniq.size)
    return rank[inverse] + 1, uniq[by_first]


# ---- checks ----------------------------------------------------------------------------------------------------
def _check_args(out: PathLike, kcore: int, overwrite: bool) -> None:
    """Checks made before reading any input, so a bad argument fails fast."""
    if not is_int(kcore) or kcore < 0:
        raise ValueError(f"`kcore` must be a non-negative int (0 = no filtering), got {kcore!r}")
    _check_out(Path(out), overwrite)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() and not out.exists():
        raise FileExistsError(f"{out}: a symbolic link to nothing ({os.readlink(out)}); name a folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    check_can_write(out, "--out")  # (before the input is read)
    ours = [n for n in (ITEMS_FILE, SEQUENCES_FILE, USERS_FILE) if os.path.lexists(out / n)]
    ours += sorted(p.name for p in out.glob(f"{EMBEDDING_PREFIX}*.npy")) if out.is_dir() else []
    if ours and not overwrite:  # any file a dataset folder holds: someone's sequences.txt is not ours to replace
        raise FileExistsError(
            f"{out}: already holds {', '.join(ours)}, which a dataset folder holds; pass --overwrite to replace "
            "them, or name a new folder"
        )
    semids = [n for n in ("config.yaml", "semantic_ids.npz") if os.path.lexists(out / n)]  # a run's, codebooks'
    if semids:  # a dataset written into another semid folder mixes the two (and the folder's own commands refuse it)
        raise FileExistsError(f"{out}: holds {', '.join(semids)}: a run or codebooks folder, not a dataset's; name a new "
                              "or empty folder for the dataset")
