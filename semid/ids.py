"""SemanticIDs: items <-> unique code tuples.

A quantizer gives each item L base codes; items whose L codes collide are told apart by one extra level
(0, 1, 2, ... within each collision group, in item order, as in TIGER). Every item then has a unique tuple of
L + 1 codes. Codebook sizes are explicit, never guessed from the data.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from semid.io import atomic_path
from semid.layout import TokenLayout
from semid.prefix_index import find, prefix_key, rank_within_groups
from semid.safe_read import check_npz, int64_of, is_int

log = logging.getLogger(__name__)

FORMAT = "semid.semantic_ids"
FORMAT_VERSION = 1


class CollisionStats(NamedTuple):
    """How often base code tuples collide (before the extra level)."""

    num_items: int
    items_colliding: int  # items that share their base tuple with at least one other item
    fraction_colliding: float
    num_groups: int  # distinct base tuples
    largest_group: int
    extra_level_used: int  # distinct values the extra level takes (= largest_group)


class SemanticIDs:
    """Unique semantic IDs for a catalogue.

    Build with :meth:`from_codes`; load with :meth:`load`.

    Attributes:
        codes: LongArray (N, L + 1); codes[:, l] in [0, codebook_sizes[l]); the last column is the extra level.
        item_ids: LongArray (N,), unique, ascending; row i of ``codes`` belongs to item ``item_ids[i]``.
        codebook_sizes: K_l for the L base levels, then the extra level's size.
    """

    def __init__(self, codes: np.ndarray, item_ids: np.ndarray, codebook_sizes: Sequence[int]) -> None:
        codes = np.asarray(codes)
        item_ids = np.asarray(item_ids)
        sizes = _sizes(codebook_sizes)
        if codes.ndim != 2 or codes.shape[1] != len(sizes) or codes.shape[1] < 2:
            raise ValueError(f"`codes` must be (N, {len(sizes)}) with at least 2 levels, got shape {codes.shape}")
        if item_ids.shape != (codes.shape[0],):
            raise ValueError(f"`item_ids` must have shape ({codes.shape[0]},), got {item_ids.shape}")
        _check_int_array("codes", codes)
        _check_int_array("item_ids", item_ids)
        if item_ids.dtype.kind == "u" and item_ids.size and int(item_ids.max()) > _INT64_MAX:  # (np.diff wraps in uint)
            raise ValueError(f"`item_ids` holds {int(item_ids.max())}, beyond an int64 id")
        item_ids = item_ids.astype(np.int64)
        if item_ids.size and item_ids[0] < 0:  # (ascending: the first is the least; -1 is items_of's "no item")
            raise ValueError(f"`item_ids` must be non-negative, got {int(item_ids[0])}")
        most = max(MAX_CODEBOOK, codes.shape[0])
        if any(k > most for k in sizes):
            level = next(i for i, k in enumerate(sizes) if k > most)
            raise ValueError(f"codebook size {sizes[level]:,} at level {level} is more than max({MAX_CODEBOOK:,}, the "
                             f"{codes.shape[0]:,} items): most of its codes could have no item, and the model would hold "
                             "a row for each")
        if item_ids.size and (np.diff(item_ids) <= 0).any():
            i = int(np.flatnonzero(np.diff(item_ids) <= 0)[0])
            raise ValueError(f"`item_ids` must be strictly ascending (unique), got {int(item_ids[i])} then {int(item_ids[i + 1])} at rows {i}, {i + 1}")
        _check_codes_in_range(codes, sizes)
        self.codes = codes.astype(np.int64)
        self.item_ids = item_ids.astype(np.int64)
        self.codebook_sizes = sizes
        self._keys = prefix_key(self.codes, sizes)
        order = np.argsort(self._keys, kind="stable")
        if (np.diff(self._keys[order]) == 0).any():
            dup = order[np.flatnonzero(np.diff(self._keys[order]) == 0)[0] + 1]
            raise ValueError(f"code tuples are not unique: item {int(self.item_ids[dup])} shares its tuple {self.codes[dup].tolist()}")
        self._key_order = order

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        codebook_sizes: Sequence[int],
        *,
        extra_level_size: int,
        item_ids: np.ndarray | None = None,
    ) -> SemanticIDs:
        """Add the extra level that separates colliding base tuples.

        Args:
            codes: int array (N, L) with codes[:, l] in [0, codebook_sizes[l]).
            codebook_sizes: K_l for each of the L base levels.
            extra_level_size: how many values the extra level has room for (the largest collision group must fit,
                and so must groups that grow when items are added later).
            item_ids: int array (N,), ascending and unique; default 1..N (the dataset's numbering).
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"`codes` must be a non-empty (N, L) integer array, got shape {codes.shape}")
        _check_int_array("codes", codes)
        sizes = _sizes(codebook_sizes)
        if len(sizes) != codes.shape[1]:
            raise ValueError(f"`codebook_sizes` must have {codes.shape[1]} entries (one per level), got {list(sizes)}")
        if any(k < 1 for k in sizes):
            raise ValueError(f"`codebook_sizes` must be positive, got {list(sizes)}")
        if not is_int(extra_level_size) or extra_level_size < 1:
            raise ValueError(f"`extra_level_size` must be a positive int, got {extra_level_size!r}")
        _check_codes_in_range(codes, sizes)
        if item_ids is None:
            item_ids = np.arange(1, codes.shape[0] + 1, dtype=np.int64)
        extra = rank_within_groups(prefix_key(codes, sizes)[:, None])[0]
        _check_extra_fits(extra, extra_level_size)
        full = np.concatenate([codes.astype(np.int64), extra[:, None]], axis=1)
        return cls(full, np.asarray(item_ids), sizes + (int(extra_level_size),))

    def add_items(self, codes: np.ndarray, item_ids: np.ndarray) -> SemanticIDs:
        """A new SemanticIDs with items added (cold start); existing items keep their tuples.

        Args:
            codes: int array (M, L) of base codes for the new items.
            item_ids: int array (M,) of new ids, all greater than the current largest id.
        """
        codes = np.asarray(codes)
        item_ids = np.asarray(item_ids)
        L = self.num_base_levels
        if codes.ndim != 2 or codes.shape[1] != L:
            raise ValueError(f"`codes` must be (M, {L}), got shape {codes.shape}")
        if item_ids.shape != (codes.shape[0],):
            raise ValueError(f"`item_ids` must have shape ({codes.shape[0]},), got {item_ids.shape}")
        _check_int_array("codes", codes)
        _check_int_array("item_ids", item_ids)
        if item_ids.size == 0:
            return self
        if self.item_ids.size and item_ids.min() <= self.item_ids.max():
            raise ValueError(f"new `item_ids` must all be > {int(self.item_ids.max())} (the largest existing id), got {int(item_ids.min())}")
        base_sizes = self.codebook_sizes[:L]
        _check_codes_in_range(codes, base_sizes)
        old_keys = prefix_key(self.codes[:, :L], base_sizes)
        new_keys = prefix_key(codes.astype(np.int64), base_sizes)
        # next free extra value per group = 1 + the largest used there (0 for a new group)
        uniq, inv = np.unique(old_keys, return_inverse=True)
        next_free = np.zeros(uniq.size + 1, dtype=np.int64)  # the last entry, 0, is a new group's (find: -1)
        np.maximum.at(next_free, inv, self.codes[:, L] + 1)
        extra = next_free[find(uniq, new_keys)] + rank_within_groups(new_keys[:, None])[0]
        try:
            _check_extra_fits(extra, self.codebook_sizes[-1])
        except ValueError as e:  # (its size is the IDs' own here: "raise `extra_level_size`" named nothing to raise)
            raise ValueError(f"{str(e).split(': raise')[0]}: the new items share a prefix with too many others for the "
                             "IDs' extra level; fit codebooks again (more levels or larger codebooks)") from None
        new_full = np.concatenate([codes.astype(np.int64), extra[:, None]], axis=1)
        return SemanticIDs(
            np.concatenate([self.codes, new_full]), np.concatenate([self.item_ids, item_ids]), self.codebook_sizes
        )

    # ---- properties --------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_levels(self) -> int:
        """L + 1: base levels plus the extra level."""
        return int(self.codes.shape[1])

    @property
    def num_base_levels(self) -> int:
        return self.num_levels - 1

    def layout(self, num_user_tokens: int = 2000) -> TokenLayout:
        """The token layout for these IDs (one block per level, the extra level last)."""
        return TokenLayout(codebook_sizes=self.codebook_sizes, num_user_tokens=num_user_tokens)

    # ---- lookups (vectorised) ----------------------------------------------------------------------------------
    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Row index of each item id; raises on an unknown id."""
        item_ids = int64_of("item_ids", item_ids)
        pos = find(self.item_ids, item_ids)
        if (pos < 0).any():
            raise ValueError(f"unknown item id {int(item_ids[pos < 0][0])}: not among the {self.num_items} items of these semantic IDs")
        return pos

    def codes_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Code tuples (..., L + 1) of item ids (...)."""
        return self.codes[self.rows_of(item_ids)]

    def items_of(self, codes: np.ndarray) -> np.ndarray:
        """Item id of each full code tuple (..., L + 1); -1 where no item has that tuple."""
        codes = int64_of("codes", codes)
        if codes.ndim == 0 or codes.shape[-1] != self.num_levels:
            raise ValueError(f"`codes` must be full tuples of {self.num_levels} codes (the extra level last) in its last "
                             f"dimension, got shape {codes.shape}")
        flat = codes.reshape(-1, self.num_levels)
        row = find(self._keys[self._key_order], prefix_key(flat, self.codebook_sizes))  # -1: out of range or no item
        out = np.where(row >= 0, self.item_ids[self._key_order[row]], -1)
        return out.reshape(codes.shape[:-1])

    def collision_stats(self) -> CollisionStats:
        L = self.num_base_levels
        keys = prefix_key(self.codes[:, :L], self.codebook_sizes[:L])
        _, counts = np.unique(keys, return_counts=True)
        colliding = int(counts[counts > 1].sum())
        return CollisionStats(
            num_items=self.num_items,
            items_colliding=colliding,
            fraction_colliding=colliding / max(self.num_items, 1),
            num_groups=int(counts.size),
            largest_group=int(counts.max()) if counts.size else 0,
            extra_level_used=int(self.codes[:, L].max()) + 1 if self.num_items else 0,
        )

    # ---- persistence -------------------------------------------------------------------------------------------
    def head(self, num_items: int) -> SemanticIDs:
        """The IDs of the first ``num_items`` items (those an extended version started from, see ``add_items``)."""
        if not is_int(num_items) or not 1 <= num_items <= self.num_items:
            raise ValueError(f"`num_items` must be an int in [1, {self.num_items}], got {num_items!r}")
        return SemanticIDs(self.codes[:num_items], self.item_ids[:num_items], self.codebook_sizes)

    def save(self, path: str | os.PathLike[str], *, arrays: dict[str, np.ndarray] | None = None, **metadata: object) -> None:
        """Write one versioned ``.npz`` file, atomically. ``metadata`` (JSON-serialisable) is kept alongside, and
        ``arrays`` (numeric, no objects) beside the codes (read them back with :func:`load_arrays`)."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "codebook_sizes": list(self.codebook_sizes)}
        if set(metadata) & set(meta):  # (a `version=` or `codebook_sizes=` replaced the file's own: unloadable, or other IDs)
            raise ValueError(f"`metadata` must not name {sorted(set(metadata) & set(meta))}: the file's own keys")
        meta.update(metadata)
        extra = dict(arrays or {})
        clash = set(extra) & {"codes", "item_ids", "meta", "file", "allow_pickle"}  # (the last two: np.savez's own)
        if clash or any(np.asarray(a).dtype == object for a in extra.values()):
            raise ValueError(f"`arrays` must be numeric arrays named other than codes/item_ids/meta/file/allow_pickle, got {sorted(extra)}")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, codes=self.codes, item_ids=self.item_ids, meta=np.array(json.dumps(meta)), **extra)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SemanticIDs:
        return cls.read(path).ids

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> IDsFile:
        """Read a semantic IDs file once: the IDs, its metadata and the extra arrays saved beside them.

        Every check is made before the data is read (sizes and shapes from the headers, ``semid.safe_read``); a
        damaged or crafted file is a ValueError naming it: not a zip, a zip bomb, arrays of the wrong kind, ``meta``
        that is not a JSON object with this format's keys, codes out of their level's range.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no semantic IDs file here (write one with `semid fit-codebooks`)")
        again = "write it again with `semid fit-codebooks`"
        try:
            headers = check_npz(path)
            missing = {"codes", "item_ids", "meta"} - set(headers)
            if missing:
                raise ValueError(f"{path}: not a semantic IDs file (missing arrays {sorted(missing)})")
            _check_headers(path, headers)
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                codes, item_ids = z["codes"], z["item_ids"]
                arrays = {name: z[name] for name in z.files if name not in ("codes", "item_ids", "meta")}
        except (OSError, EOFError, json.JSONDecodeError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError) as e:  # (damaged deflate data; a compression method or encryption zipfile cannot read)
            raise ValueError(f"{path}: not a readable semantic IDs file ({type(e).__name__}: {e}); {again}") from e
        except ValueError as e:
            text = str(e).removeprefix(f"{path}: ")
            if text.startswith("not a"):
                raise
            raise ValueError(f"{path}: not a readable semantic IDs file ({text}); {again}") from e
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: array `meta` must hold a JSON object, got {type(meta).__name__}; {again}")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a semantic IDs file (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: semantic IDs format version {meta.get('version')!r}; this semid reads version {FORMAT_VERSION}")
        sizes = meta.get("codebook_sizes")
        if not isinstance(sizes, list) or not sizes or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in sizes):
            raise ValueError(f"{path}: `meta.codebook_sizes` must be a list of positive ints, got {sizes!r}; {again}")
        if len(item_ids) == 0:
            raise ValueError(f"{path}: the semantic IDs file holds no items; {again}")
        try:
            ids = cls(codes, item_ids, sizes)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{path}: {e}; {again}") from None
        return IDsFile(ids, meta, arrays)

    @staticmethod
    def load_metadata(path: str | os.PathLike[str]) -> dict:
        return SemanticIDs.read(path).meta

    @staticmethod
    def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
        """The extra arrays saved beside the codes (``save(arrays=...)``); never unpickles."""
        return SemanticIDs.read(path).arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SemanticIDs):
            return NotImplemented
        return (
            self.codebook_sizes == other.codebook_sizes
            and np.array_equal(self.codes, other.codes)
            and np.array_equal(self.item_ids, other.item_ids)
        )

    def __repr__(self) -> str:
        return f"SemanticIDs(num_items={self.num_items}, codebook_sizes={list(self.codebook_sizes)})"


class IDsFile(NamedTuple):
    """A semantic IDs file as read once (:meth:`SemanticIDs.read`)."""

    ids: SemanticIDs
    meta: dict  # the file's metadata (format, version, codebook_sizes, and what the writer added)
    arrays: dict[str, np.ndarray]  # the extra arrays saved beside the codes


def _check_headers(path: Path, headers: dict) -> None:
    """Shapes and dtypes of a semantic IDs file's arrays, from their headers (before any data is read)."""
    codes, item_ids, meta = headers["codes"], headers["item_ids"], headers["meta"]
    if len(codes.shape) != 2 or codes.dtype.kind not in "iu":
        raise ValueError(f"{path}: array `codes` must be a 2-D integer array (N, L), got shape {codes.shape} {codes.dtype}")
    if item_ids.shape != codes.shape[:1] or item_ids.dtype.kind not in "iu":
        raise ValueError(f"{path}: array `item_ids` must be integers of shape ({codes.shape[0]},), got {item_ids.shape} {item_ids.dtype}")
    if meta.shape != () or meta.dtype.kind != "U":
        raise ValueError(f"{path}: array `meta` must be one JSON string, got shape {meta.shape} {meta.dtype}")


# ---- private helpers (inputs already validated) --------------------------------------------------------------------
_INT64_MAX = 2**63 - 1
MAX_CODEBOOK = 1 << 16  # the largest codebook a level may have beyond the item count (an embedding row per code)


def _sizes(codebook_sizes: Sequence[int]) -> tuple[int, ...]:
    """Codebook sizes as ints; a TypeError for anything else (2.9 was 2, True 1, "3" 3)."""
    if isinstance(codebook_sizes, (str, bytes)) or not all(is_int(k) for k in codebook_sizes):
        raise TypeError(f"`codebook_sizes` must be ints, got {codebook_sizes!r}")
    return tuple(int(k) for k in codebook_sizes)


def _check_int_array(name: str, a: np.ndarray) -> None:
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"`{name}` must be an integer array, got dtype {a.dtype}")


def _check_codes_in_range(codes: np.ndarray, sizes: Sequence[int]) -> None:
    bad = (codes < 0) | (codes >= np.asarray(sizes))
    if bad.any():
        row, level = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"`codes[{row}, {level}]` is {int(codes[row, level])}; level {level} takes codes in [0, {sizes[level]})")


def _check_extra_fits(extra: np.ndarray, extra_level_size: int) -> None:
    if extra.size and extra.max() >= extra_level_size:
        raise ValueError(
            f"a collision group needs extra-level value {int(extra.max())}, but `extra_level_size` is {extra_level_size}: "
            "raise `extra_level_size` or fit codebooks with fewer collisions"
        )
