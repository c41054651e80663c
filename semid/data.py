"""The canonical dataset folder, its loader, and the leave-one-out split.

A dataset folder (the layout of ``../shared/data/beauty``; ``semid prepare`` writes one from raw data)::

    items.jsonl          one item a line; line i holds item_id i+1:
                         {"item_id": 1, "asin": "B004756YJA", "title": "...", "attributes": ["OPI", "Makeup"]}
                         (``asin`` is the original item id whatever the source; ``attributes`` may be omitted)
    sequences.txt        one user a line: ``USER ITEM ITEM ...``, items oldest first, all ids ints from 1
    users.tsv            optional, written by ``semid prepare``: ``USER<TAB>original user id``
    item_emb_<name>.npy  optional float32 (N, D); row i is item_id i+1

Item ids are exactly 1..N (N items); row ``i`` of every per-item array belongs to item ``i + 1``.
Errors name the file, the line number and the problem, and are raised as ``ValueError`` / ``FileNotFoundError``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semid.io import not_utf8
from semid.safe_read import is_int, json_object, lone_surrogate, read_npy  # noqa: F401 (read_npy: re-exported)

log = logging.getLogger(__name__)

ITEMS_FILE = "items.jsonl"
SEQUENCES_FILE = "sequences.txt"
USERS_FILE = "users.tsv"
EMBEDDING_PREFIX = "item_emb_"
UNKNOWN_ATTRIBUTE = "Unknown"  # placeholder brand in the Beauty release; left out of item text


@dataclass(frozen=True, eq=False)
class Catalogue:
    """The items of a dataset, in item-id order.

    Attributes:
        item_ids: LongArray (N,) == arange(1, N + 1).
        original_ids: N original ids (the ``asin`` field).
        titles: N titles ("" where unknown).
        attributes: N lists of attribute strings (brand, category names, ...).
    """

    item_ids: np.ndarray
    original_ids: list[str]
    titles: list[str]
    attributes: list[list[str]]

    def __post_init__(self) -> None:
        n = len(self.titles)
        if len(self.original_ids) != n or len(self.attributes) != n:
            raise ValueError(
                f"`original_ids`, `titles` and `attributes` must have one entry per item, got lengths "
                f"{len(self.original_ids)}, {n}, {len(self.attributes)}"
            )
        ids = np.asarray(self.item_ids)
        if ids.shape != (n,) or not np.array_equal(ids, np.arange(1, n + 1)):
            raise ValueError(f"`item_ids` must be arange(1, {n + 1}), got an array of shape {ids.shape}")
        object.__setattr__(self, "item_ids", ids.astype(np.int64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalogue):
            return NotImplemented
        return np.array_equal(self.item_ids, other.item_ids) and (
            self.original_ids,
            self.titles,
            self.attributes,
        ) == (other.original_ids, other.titles, other.attributes)

    @property
    def num_items(self) -> int:
        """N, the number of items."""
        return len(self.titles)

    def _row(self, item_id: int) -> int:
        if not is_int(item_id) or not 1 <= item_id <= self.num_items:
            raise ValueError(f"`item_id` must be an int in [1, {self.num_items}], got {item_id!r}")
        return int(item_id) - 1

    def title_of(self, item_id: int) -> str:
        """The title of ``item_id`` (in [1, N]); "" when unknown."""
        return self.titles[self._row(item_id)]

    def text(self, item_id: int, fields: Sequence[str] = ("title", "attributes")) -> str:
        """The text of ``item_id`` (in [1, N]) that item embeddings are made from.

        With the default fields this is ``title + ". " + ", ".join(attributes)`` with "Unknown" left out: the recipe
        of the Beauty embeddings (see ../shared/data/README.md). An empty title keeps its ". " before the attributes
        (Beauty's 7 untitled items were embedded so: all-MiniLM-L6-v2 then gives their shipped vectors, cosine 1.0000;
        without it 0.957-0.983); other empty parts are left out, as before ("Title", not "Title. ").
        """
        row = self._row(item_id)
        parts = []
        for field in fields:
            if field == "title":
                parts.append(self.titles[row])
            elif field == "attributes":
                parts.append(", ".join(a for a in self.attributes[row] if a != UNKNOWN_ATTRIBUTE))
            else:
                raise ValueError(f"`fields` entries must be 'title' or 'attributes', got {field!r}")
        text = ". ".join(p for p in parts if p)
        return ". " + text if text and not parts[0] and len(parts) > 1 else text

    def texts(self, fields: Sequence[str] = ("title", "attributes")) -> list[str]:
        """:meth:`text` of every item, in item-id order (entry i is item i + 1)."""
        return [self.text(i, fields) for i in range(1, self.num_items + 1)]


@dataclass(frozen=True, eq=False)  # holds arrays: compare contents, not with ==
class Dataset:
    """A loaded dataset folder.

    Attributes:
        path: the folder.
        catalogue: the N items.
        user_ids: LongArray (U,), unique, in file order.
        sequences: U LongArrays of item ids in [1, N], oldest first; ``sequences[u]`` belongs to ``user_ids[u]``.
    """

    path: Path
    catalogue: Catalogue
    user_ids: np.ndarray
    sequences: list[np.ndarray]

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_items(self) -> int:
        return self.catalogue.num_items

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def embeddings(self, name: str) -> np.ndarray:
        """float32 (N, D) item embeddings from ``item_emb_<name>.npy``; row i is item i + 1."""
        return load_embeddings(self.path / f"{EMBEDDING_PREFIX}{name}.npy", self.num_items)

    def embedding_names(self) -> list[str]:
        """Names of the ``item_emb_<name>.npy`` files in the folder, sorted."""
        return sorted(
            p.name[len(EMBEDDING_PREFIX) : -len(".npy")] for p in self.path.glob(f"{EMBEDDING_PREFIX}*.npy")
        )


# ---- loading -----------------------------------------------------------------------------------------------------
def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Load and validate a dataset folder (see the module docstring). Raises ValueError / FileNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no dataset folder here (make one with `semid prepare`)")
    catalogue = _read_items(path / ITEMS_FILE)
    user_ids, sequences = _read_sequences(path / SEQUENCES_FILE, catalogue.num_items)
    log.info("loaded %s: %d users, %d items", path, len(sequences), catalogue.num_items)
    return Dataset(path=path, catalogue=catalogue, user_ids=user_ids, sequences=sequences)


def load_catalogue(path: str | os.PathLike[str]) -> Catalogue:
    """The items of a dataset folder alone (``items.jsonl``; the sequences are not read). Raises as :func:`load_dataset`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no dataset folder here (make one with `semid prepare`)")
    return _read_items(path / ITEMS_FILE)


def _require_file(file: Path) -> None:
    if file.exists() and not file.is_file():
        raise ValueError(f"{file}: not a regular file (a folder, device or pipe): a dataset folder needs it as a file "
                         "(`semid prepare` makes one)")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing (a dataset folder needs it; `semid prepare` makes one)")


ITEM_FIELDS = frozenset({"item_id", "asin", "title", "attributes"})  # what items.jsonl's objects hold


def _read_items(file: Path) -> Catalogue:
    _require_file(file)
    original_ids: list[str] = []
    titles: list[str] = []
    attributes: list[list[str]] = []
    unread: dict[str, int] = {}  # fields semid does not read -> their first line
    with open(file, encoding="utf-8-sig") as f:  # (a byte-order mark, as Windows editors write, is no error)
        for lineno, line in _numbered_lines(file, f):
            if not line.strip():
                raise ValueError(f"{file}:{lineno}: empty line (one JSON object per item expected)")
            rec = json_object(line, f"{file}:{lineno}", once=True)
            for key in rec.keys() - ITEM_FIELDS:  # (said once below, not dropped in silence)
                unread.setdefault(key, lineno)
            item_id = rec.get("item_id")
            if not isinstance(item_id, int) or isinstance(item_id, bool):
                raise ValueError(f"{file}:{lineno}: `item_id` must be an int, got {item_id!r}")
            if item_id != lineno:
                if 1 <= item_id < lineno:
                    raise ValueError(
                        f"{file}:{lineno}: duplicate item id {item_id} (first on line {item_id})"
                    )
                raise ValueError(
                    f"{file}:{lineno}: item ids must be 1..N in order (line i holds item i), expected {lineno}, got {item_id}"
                )
            titles.append(_field(rec, "title", str, "", file, lineno, required=True))
            original_ids.append(_field(rec, "asin", str, str(item_id), file, lineno))
            attrs = _field(rec, "attributes", list, [], file, lineno)
            if not all(isinstance(a, str) for a in attrs):
                raise ValueError(f"{file}:{lineno}: `attributes` must be a list of strings, got {attrs!r}")
            attributes.append(attrs)
    if not titles:
        raise ValueError(f"{file}: no items")
    if unread:
        log.warning("%s: fields %s are not read (first on line %d); an item's text is its `title` and `attributes` "
                    "(put brand, categories, ... there to embed them)", file, sorted(unread)[:10], min(unread.values()))
    first: dict[str, int] = {}
    if len(set(original_ids)) < len(original_ids):  # (ask for an asin, which item is it?)
        i = next(i for i, a in enumerate(original_ids, 1) if first.setdefault(a, i) != i)
        raise ValueError(f"{file}:{i}: asin {original_ids[i - 1]!r} is item {first[original_ids[i - 1]]}'s too: each item "
                         "needs an asin of its own")
    return Catalogue(np.arange(1, len(titles) + 1, dtype=np.int64), original_ids, titles, attributes)


def _field(
    rec: dict[str, Any], key: str, kind: type, default: Any, file: Path, lineno: int, required: bool = False
) -> Any:
    if key not in rec:
        if required:
            raise ValueError(f"{file}:{lineno}: missing field `{key}`")
        return default
    value = rec[key]
    if not isinstance(value, kind):
        raise ValueError(f"{file}:{lineno}: `{key}` must be a {kind.__name__}, got {value!r}")
    for text in [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]:
        if (bad := lone_surrogate(text)) is not None:
            raise ValueError(f"{file}:{lineno}: `{key}` holds {bad!r}, not a character (a lone surrogate escape) in "
                             f"{text[:40]!r}: fix it in the file")
    return value


_INT64_MAX = 2**63 - 1
_ASCII_SPACE = re.compile("[ \t\r\n\x0b\x0c]+")  # what separates a line's ids; other characters are errors


def _read_sequences(file: Path, num_items: int) -> tuple[np.ndarray, list[np.ndarray]]:
    _require_file(file)
    users: list[int] = []
    sequences: list[np.ndarray] = []
    with open(file, encoding="utf-8-sig") as f:
        for lineno, line in _numbered_lines(file, f):
            tokens = [t for t in _ASCII_SPACE.split(line) if t]  # (str.split() split at \x1e, U+2028: two users merged)
            if not tokens:
                raise ValueError(f"{file}:{lineno}: empty line (expected `USER ITEM ITEM ...`)")
            if not all(map(_is_id, tokens)):  # int() alone would read "1_0" as 10, "+3" and " ٣" as 3
                bad = next(t for t in tokens if not _is_id(t))
                raise ValueError(f"{file}:{lineno}: {bad!r} is not an integer id (write ids as plain digits 0-9)")
            if (long := next((t for t in tokens if len(t) > 4000), None)) is not None:  # (int() refuses 4,300 digits)
                raise ValueError(f"{file}:{lineno}: id {long[:24]}... ({len(long):,} digits) is beyond the ids semid "
                                 f"holds (|id| <= {_INT64_MAX}); number users and items from 1")
            ints = [int(t) for t in tokens]
            if max(ints) > _INT64_MAX or min(ints) < -_INT64_MAX:  # numpy would raise OverflowError, naming neither
                big = max(ints, key=abs)  # file nor line
                raise ValueError(f"{file}:{lineno}: id {big} is beyond the ids semid holds (|id| <= {_INT64_MAX}); "
                                 "number users and items from 1")
            if len(ints) == 1:
                raise ValueError(
                    f"{file}:{lineno}: user {ints[0]} has no items (expected `USER ITEM ITEM ...`)"
                )
            users.append(ints[0])
            sequences.append(np.array(ints[1:], dtype=np.int64))
    if not users:
        raise ValueError(f"{file}: no users")
    user_ids = np.array(users, dtype=np.int64)
    # validation, vectorised; the slow path only runs to word the first error
    if user_ids.min() < 1:
        row = int(np.argmax(user_ids < 1))
        raise ValueError(f"{file}:{row + 1}: user id must be >= 1, got {users[row]}")
    uniq, first, counts = np.unique(user_ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        repeats = np.ones(user_ids.size, dtype=bool)
        repeats[first] = False
        row = int(np.argmax(repeats))  # the first line whose user appeared before
        first_row = int(first[np.searchsorted(uniq, user_ids[row])])
        raise ValueError(f"{file}:{row + 1}: duplicate user {users[row]} (first on line {first_row + 1})")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.concatenate(sequences)
    bad = (flat < 1) | (flat > num_items)
    if bad.any():
        pos = int(np.argmax(bad))
        row = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise ValueError(
            f"{file}:{row + 1}: user {users[row]} has unknown item id {int(flat[pos])} "
            f"(items.jsonl holds items 1..{num_items})"
        )
    return user_ids, sequences


def _is_id(token: str) -> bool:
    """Whether ``token`` is ASCII digits, optionally after a minus sign (a negative id gets its own error)."""
    digits = token[1:] if token.startswith("-") else token
    return digits.isascii() and digits.isdigit()


def _numbered_lines(file: Path, f: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of ``f``, the text file ``file`` opened as UTF-8; other bytes are an error naming
    the file and line."""
    try:
        yield from enumerate(f, start=1)
    except UnicodeDecodeError:
        raise not_utf8(file) from None


def load_embeddings(path: str | os.PathLike[str], num_items: int) -> np.ndarray:
    """Load item embeddings and check them against the catalogue.

    Args:
        path: an ``.npy`` file holding a numeric (N, D) array; row i is item i + 1.
        num_items: N, the number of items it must have rows for.
    Returns:
        float32 (N, D), every value finite (other numeric dtypes are converted).
    """
    path = Path(path)
    emb = read_npy(path)
    if emb.ndim != 2:
        raise ValueError(f"{path}: embeddings must be 2-D (N, D), got shape {emb.shape}")
    if emb.shape[0] != num_items:
        raise ValueError(
            f"{path}: {emb.shape[0]} rows but the dataset has {num_items} items (row i is item i + 1)"
        )
    if emb.dtype != np.float32 and np.issubdtype(emb.dtype, np.number):
        log.info("%s: converting embeddings from %s to float32", path, emb.dtype)
    return check_embedding_values(emb, path)


def check_embedding_values(emb: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """``emb`` (N, D) as float32, refused naming ``path`` unless it is numeric and every value finite."""
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
        raise ValueError(f"{path}: embeddings must be numeric, got dtype {emb.dtype}")
    if emb.ndim != 2 or emb.shape[1] == 0:
        raise ValueError(f"{path}: embeddings must be a 2-D array (items x dimensions, at least one), got shape {emb.shape}")
    with np.errstate(over="ignore"):  # (float64 beyond float32's range: named below, not warned about)
        emb32 = emb.astype(np.float32, copy=False)
    finite = np.isfinite(emb32).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        beyond = bool(np.isfinite(emb[row]).all())  # finite as stored: too large for float32
        raise ValueError(f"{path}: row {row} (item {row + 1}) has {'values beyond float32 range' if beyond else 'NaN or inf values'} "
                         f"({int((~finite).sum())} bad rows); embed the items again, or fix those rows")
    return emb32


# ---- leave-one-out split -----------------------------------------------------------------------------------------


# ---- summary -----------------------------------------------------------------------------------------------------
def summary(dataset: Dataset) -> dict[str, Any]:
    """Counts that describe a dataset (JSON-serialisable)."""
    lengths = np.fromiter((len(s) for s in dataset.sequences), dtype=np.int64, count=dataset.num_users)
    seen = np.zeros(dataset.num_items + 1, dtype=bool)
    seen[np.concatenate(dataset.sequences)] = True
    return {
        "path": str(dataset.path),
        "users": dataset.num_users,
        "items": dataset.num_items,
        "interactions": int(lengths.sum()),
        "sequence_length_min": int(lengths.min()),
        "sequence_length_mean": float(lengths.mean()),
        "sequence_length_max": int(lengths.max()),
        "items_never_interacted": int((~seen[1:]).sum()),
        "items_empty_title": sum(1 for t in dataset.catalogue.titles if not t.strip()),
        "embeddings": dataset.embedding_names(),
    }


def format_summary(s: dict[str, Any]) -> str:
    """A few aligned lines for people, from :func:`summary`'s dict."""
    rows = [
        ("dataset", s["path"]),
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        (
            "sequence length",
            f"min {s['sequence_length_min']}, mean {s['sequence_length_mean']:.1f}, max {s['sequence_length_max']}",
        ),
        ("items never interacted", f"{s['items_never_interacted']:,}"),
        ("items with empty title", f"{s['items_empty_title']:,}"),
        ("embeddings", ", ".join(s["embeddings"]) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
