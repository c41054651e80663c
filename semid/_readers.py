"""Readers for `semid prepare`'s raw formats: line-numbered parsing of JSON lines, Python-literal metadata,
TSV/RecBole and CSV files (gzip or plain). Every error names the file and line. Used by :mod:`semid.prepare`."""

from __future__ import annotations

import ast
import csv
import gzip
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from semid.io import not_utf8
from semid.safe_read import json_object, lone_surrogate

_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


@dataclass
class _Interactions:
    """Raw interactions in file order."""

    source: Path
    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    times: list[float | int] = field(default_factory=list)  # ints kept exact (a float64 rounds them above 2^53)
    fractional: str | None = None  # the first timestamp that is not an integer, where it is ("FILE:LINE")
    beyond_float: str | None = None  # the first integer timestamp above 2^53 (a float64 cannot tell it from its
    # neighbours), where it is: the two together cannot be ordered exactly


@dataclass
class _Metadata:
    """Item original id -> (title, attributes), first row kept."""

    rows: int = 0
    duplicates: int = 0
    by_item: dict[str, tuple[str, list[str]]] = field(default_factory=dict)

    def add(self, item: str, title: str, attributes: Iterable[str], where: str) -> None:
        """Keep ``item``'s title verbatim (as the benchmark folders hold them, trailing spaces too) and its attributes
        deduplicated; a title or attribute with a lone surrogate (JSON's "\\ud800", not a character) is an error
        naming ``where`` (items.jsonl would hold it, and every later reader fail on it)."""
        self.rows += 1
        if item in self.by_item:
            self.duplicates += 1
            return
        attrs = _dedupe(attributes)
        for what, text in (("title", title), *(("attribute", a) for a in attrs)):
            if (bad := lone_surrogate(text)) is not None:
                raise ValueError(f"{where}: item {item[:40]!r}'s {what} {text[:40]!r} holds {bad!r}, which is not a "
                                 "character (a lone surrogate escape): fix it in the file")
        self.by_item[item] = (title, attrs)


def _dedupe(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v.strip() for v in values if v and v.strip()))


# ---- readers -----------------------------------------------------------------------------------------------------
@contextmanager
def _open_text(path: Path, newline: str | None = None) -> Iterator[IO[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: a folder, not a file: give the file itself" if path.is_dir() else
                                f"{path}: no such file")
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline=newline) as f:  # a byte-order mark is not the first column's
        try:
            yield f
        except UnicodeDecodeError:  # raised while the caller reads f: name the file and line
            raise not_utf8(path, newline) from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a .gz that is not gzip, truncated or damaged
            raise ValueError(f"{path}: not a readable gzip file ({type(e).__name__}: {e}); download it again, or give "
                             "the uncompressed file (a name not ending in .gz)") from None


MAX_LINE = 1 << 24  # characters a line of raw data may hold (Amazon's metadata lines: under 1 MB)


def _bounded(f: IO[str], path: Path) -> Iterator[str]:
    """The lines of ``f``, each read at most :data:`MAX_LINE` + 1 characters at a time: a longer one is an error
    naming the file and line, never read whole (a small .gz may hold one line of gigabytes)."""
    lineno = 0
    while line := f.readline(MAX_LINE + 1):
        lineno += 1
        if len(line) > MAX_LINE:
            raise ValueError(f"{path}:{lineno}: a line longer than {MAX_LINE:,} characters: not a file of records "
                             "this format holds (a damaged or wrong file?)")
        yield line


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """(``"path:lineno"``, line) for each line; an empty line is an error."""
    with _open_text(path) as f:
        for lineno, line in enumerate(_bounded(f, path), start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                raise ValueError(f"{where}: empty line")
            yield where, line


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, line in _lines(path):
        yield where, json_object(line, where)


def _read_amazon_meta(path: Path) -> _Metadata:
    meta = _Metadata()
    for where, line in _lines(path):
        try:
            rec = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f"{where}: not a Python dict literal as Amazon's 2014 metadata files hold one per line "
                             f"({type(e).__name__}{': ' + str(e)[:80] if not isinstance(e, ValueError) else ''}); a "
                             "file of JSON objects (true/false/null) is another format") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a dict literal, got {type(rec).__name__}")
        asin, title, brand = _get(rec, "asin", where), rec.get("title", ""), rec.get("brand", "")
        categories = rec.get("categories", [])
        if not isinstance(title, str) or not isinstance(brand, str):
            raise ValueError(f"{where}: `title` and `brand` must be strings, got {title!r} and {brand!r}")
        if not isinstance(categories, list) or not all(
            isinstance(p, list) and all(isinstance(c, str) for c in p) for p in categories
        ):
            raise ValueError(f"{where}: `categories` must be a list of lists of strings, got {categories!r}")
        if not isinstance(asin, str) or not asin.strip():  # (None and 5 were made the items "None" and "5")
            raise ValueError(f"{where}: `asin` must be a non-empty string, got {asin!r}")
        meta.add(asin, title, [brand, *(c for p in categories for c in p[1:])], where)
    return meta


def _tsv_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Tab-separated rows; every row must have as many fields as the first (the header)."""
    width = None
    for where, line in _lines(path):
        row = line.rstrip("\r\n").split("\t")
        width = width or len(row)
        if len(row) != width:
            raise ValueError(
                f"{where}: expected {width} tab-separated columns (as in the header), got {len(row)}"
            )
        yield where, row


def _csv_rows(path: Path) -> Iterator[tuple[str, list[str]]]:
    """CSV rows; every row must have as many fields as the first (the header)."""
    with _open_text(path, newline="") as f:
        reader, width = csv.reader(_bounded(f, path), strict=True), None  # a stray quote is an error, not a silent merge
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                width = width or len(row)
                if not row:
                    raise ValueError(f"{where}: empty line")
                if len(row) != width:
                    raise ValueError(f"{where}: expected {width} columns (as in the header), got {len(row)}")
                yield where, row
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _recbole_header(path: Path, first: tuple[str, list[str]] | None, typed: bool = False) -> list[Any]:
    """Names of a RecBole header's ``name:type`` columns (``(name, type)`` pairs when ``typed``)."""
    if first is None:
        raise ValueError(f"{path}: empty file (expected a header like `user_id:token`)")
    columns = []
    for c, col in enumerate(first[1], start=1):
        name, _, kind = col.strip().rpartition(":")
        if not name or kind not in _RECBOLE_TYPES:
            raise ValueError(
                f"{first[0]}: header column {c} is {col!r}, expected `name:type` with type in {_RECBOLE_TYPES}"
            )
        columns.append((name, kind) if typed else name)
    return columns


def _columns(path: Path, header: list[str] | None, wanted: dict[str, str]) -> list[int]:
    """Positions of the ``wanted`` columns (role -> name) in ``header``; errors list the columns there are."""
    if header is None:
        raise ValueError(f"{path}: empty file (expected a header)")
    positions = []
    for role, name in wanted.items():
        if name not in header:
            raise ValueError(f"{path}:1: no {role} column {name!r} in the header; columns are {header}")
        if header.count(name) > 1:
            raise ValueError(f"{path}:1: the header names {name!r} {header.count(name)} times; name each column once")
        positions.append(header.index(name))
    if len(set(positions)) < len(positions):
        raise ValueError(f"{path}:1: one column serves two roles ({wanted}); name a column for each")
    return positions


def _get(rec: dict[str, Any], key: str, where: str) -> Any:
    if key not in rec:
        raise ValueError(f"{where}: missing field `{key}`")
    return rec[key]


def _append(raw: _Interactions, user: str, item: str, time: Any, where: str) -> None:
    try:
        if isinstance(time, bool) or (isinstance(time, str) and ("_" in time or not time.isascii())):
            raise ValueError  # (int and float read "2020_01_15" as 20200115, and other scripts' digits as numbers)
        if isinstance(time, int) or (isinstance(time, str) and time.strip().lstrip("+-").isdecimal()):
            ts: float | int = int(time)  # exact: nanosecond clocks pass 2^53
        else:
            ts = float(time)
            if not math.isfinite(ts):
                raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{where}: timestamp {time!r} is not a finite number") from None
    if not -(2**63) <= ts < 2**63:  # (a float too: beside integers above 2^53 the times are int64)
        raise ValueError(f"{where}: timestamp {time!r} is beyond a 64-bit integer: write it in coarser units")
    if isinstance(ts, int) and abs(ts) > 2**53 and raw.beyond_float is None:
        raw.beyond_float = f"{where}: timestamp {time!r}"
    elif isinstance(ts, float) and not ts.is_integer() and raw.fractional is None:
        raw.fractional = f"{where}: timestamp {time!r}"
    if not isinstance(user, str) or not isinstance(item, str) or not user.strip() or not item.strip():
        raise ValueError(f"{where}: user and item ids must be non-empty strings, got {user!r} and {item!r}")
    if any(c in user + item for c in "\n\r\t"):  # in a CSV: a quote opened and never closed swallows the next rows
        raise ValueError(f"{where}: the user or item id holds a line break or tab ({user[:40]!r}, {item[:40]!r}): remove "
                         "it (in a CSV file: a quote opened on an earlier line and not closed? fix the file's quoting)")
    for kind, name in (("user", user), ("item", item)):
        if (bad := lone_surrogate(name)) is not None:  # (users.tsv could not be written)
            raise ValueError(f"{where}: the {kind} id {name[:40]!r} holds {bad!r}, which is not a character (a lone "
                             "surrogate escape): fix the id in the file")
    raw.users.append(user)
    raw.items.append(item)
    raw.times.append(ts)


def _csv_header(path: Path, first: tuple[str, list[str]] | None) -> list[str] | None:
    return first[1] if first is not None else None


def _read_table(path: Path, rows_of: Callable[[Path], Iterator[tuple[str, list[str]]]],
                header_of: Callable[[Path, Any], Any], user: str, item: str, time: str) -> _Interactions:
    """The interactions of a table with a header (RecBole's .inter, a CSV file), read by its named columns."""
    raw = _Interactions(path)
    rows = rows_of(path)
    u, i, t = _columns(path, header_of(path, next(rows, None)), {"user": user, "item": item, "time": time})
    for where, row in rows:
        _append(raw, row[u], row[i], row[t], where)
    return raw
