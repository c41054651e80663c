"""Cold-start splits: hold out the newest items, train without them, test on users whose target is one of them.

Sequences hold no timestamps, so "newest" needs a proxy. We use an item's **mean relative position**: each of its
interactions sits at position t of a user's sequence of length n (oldest first), i.e. at relative time
t / (n - 1) in [0, 1] of that user's history; an item's recency is the mean over its interactions. An item released
late can only appear after everything its buyers bought before it existed, so its interactions cluster near the end
of histories (recency near 1), whereas a long-selling item spreads over [0, 1]. The mean is used rather than the
minimum (an item's "earliest position") because one new user whose first purchase is the item would set the
minimum to 0. Ties go to the larger item id (the P5 numbering follows first appearance, roughly). Items with no
interaction count as newest (recency 1).

Cold items are relabelled after the warm ones (warm items 1..N_w in their old order, cold N_w + 1..N), so that
after training they can be added with ``SemanticIDs.add_items``, ``DenseHead.add_items`` and ``MIPSIndex.add``,
which all append ids above the current largest: the same way a real catalogue grows.

This module only splits datasets (numpy and ``semid`` only): adding the cold items to a trained generator's
semantic IDs, prefix tree and dense head is ``generator.runs.cold_items``.

Dimensions: N items, C cold items, U users, T cold test users.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from semid.data import EMBEDDING_PREFIX, Catalogue, Dataset
from semid.io import atomic_path, write_json
from semid.prepare import write_dataset

log = logging.getLogger(__name__)

PROXY = "mean relative position in users' sequences"
COLD_FILE = "coldstart.json"


def item_recency(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Each item's mean relative position t / (n - 1) over its interactions; float (N,), row i is item i + 1.

    A sequence of one item counts as position 1. Items with no interaction get 1 (newest).
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    if (lengths == 0).any():
        raise ValueError(f"`sequences[{int(np.argmax(lengths == 0))}]` is empty; every sequence needs an item")
    flat = np.concatenate(sequences).astype(np.int64)
    if flat.min() < 1 or flat.max() > num_items:
        raise ValueError(f"`sequences` must hold item ids in [1, {num_items}], got range [{flat.min()}, {flat.max()}]")
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(flat.size) - starts  # (interactions,) t within its sequence
    denom = np.repeat(np.maximum(lengths - 1, 1), lengths)
    rel = np.where(np.repeat(lengths, lengths) > 1, pos / denom, 1.0)
    total = np.bincount(flat, weights=rel, minlength=num_items + 1)[1:]
    count = np.bincount(flat, minlength=num_items + 1)[1:]
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def newest_items(sequences: Sequence[np.ndarray], num_items: int, fraction: float) -> np.ndarray:
    """The round(fraction * N) newest items by :func:`item_recency` (at least one); LongArray (C,), ascending."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be a number in (0, 1), got {fraction!r}")
    recency = item_recency(sequences, num_items)
    C = max(1, int(round(fraction * num_items)))
    if C >= num_items:
        raise ValueError(f"`fraction` {fraction} would make every one of the {num_items} items cold")
    ids = np.arange(1, num_items + 1)
    order = np.lexsort((-ids, -recency))  # recency descending, then larger id first
    return np.sort(ids[order[:C]])


def remove_items(sequences: Sequence[np.ndarray], items: np.ndarray) -> list[np.ndarray]:
    """Each sequence with every interaction with ``items`` removed (order kept; may leave sequences empty)."""
    if not len(sequences):
        return []
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.concatenate(sequences).astype(np.int64)
    keep = ~np.isin(flat, items)
    owner = np.repeat(np.arange(len(sequences)), lengths)  # (interactions,) which sequence each belongs to
    kept_lengths = np.bincount(owner[keep], minlength=len(sequences))
    return np.split(flat[keep], np.cumsum(kept_lengths)[:-1])


class Relabel(NamedTuple):
    """Item-id maps that put warm items first (old order kept) and cold items last.

    old_to_new: LongArray (N + 1,); old_to_new[old] is the new id (entry 0 unused, 0).
    new_to_old: LongArray (N + 1,); the inverse.
    num_warm:   N_w; new ids 1..N_w are warm, N_w + 1..N cold.
    """

    old_to_new: np.ndarray
    new_to_old: np.ndarray
    num_warm: int


def relabel_warm_first(num_items: int, cold_items: np.ndarray) -> Relabel:
    """Warm items keep their relative order as 1..N_w; cold items follow, ascending by old id."""
    cold_items = np.asarray(cold_items)
    if cold_items.size and (not np.issubdtype(cold_items.dtype, np.integer) or cold_items.min() < 1 or cold_items.max() > num_items):
        raise ValueError(f"`cold_items` must be item ids in 1..{num_items}, got {cold_items[:5].tolist()}...")  # (-1 marked item N)
    cold = np.zeros(num_items + 1, dtype=bool)
    cold[cold_items] = True
    ids = np.arange(1, num_items + 1)
    new_to_old = np.concatenate([[0], ids[~cold[1:]], ids[cold[1:]]])
    old_to_new = np.zeros(num_items + 1, dtype=np.int64)
    old_to_new[new_to_old] = np.arange(num_items + 1)
    return Relabel(old_to_new, new_to_old.astype(np.int64), int(num_items - cold[1:].sum()))


@dataclass(frozen=True, eq=False)
class ColdStartSplit:
    """A dataset split for the cold-start experiment, in *new* item ids (see :class:`Relabel`).

    Attributes:
        fraction: the share of items held out.
        cold_items: LongArray (C,), the held-out items' *old* ids, ascending.
        relabel: the id maps.
        user_ids: LongArray (U',) users who keep at least one warm interaction.
        warm_sequences: U' sequences with cold items removed: the whole training world (leave-one-out on it gives
            the warm train/validation split; its validation and test targets are warm and never trained on).
        test_user_ids: LongArray (T,) users (>= 3 items) whose test target, their last item, is cold.
        test_histories: T histories (everything before the target, cold items included: by test time they exist).
        test_targets: LongArray (T,) new ids, all > ``relabel.num_warm``.
    """

    fraction: float
    cold_items: np.ndarray
    relabel: Relabel
    user_ids: np.ndarray
    warm_sequences: list[np.ndarray]
    test_user_ids: np.ndarray
    test_histories: list[np.ndarray]
    test_targets: np.ndarray

    @property
    def num_warm(self) -> int:
        return self.relabel.num_warm

    @property
    def new_cold_ids(self) -> np.ndarray:
        """LongArray (C,): the cold items' new ids, N_w + 1..N."""
        return np.arange(self.num_warm + 1, self.relabel.new_to_old.size, dtype=np.int64)


def cold_start_split(dataset: Dataset, fraction: float = 0.05) -> ColdStartSplit:
    """Hold out the newest ``fraction`` of items (see the module docstring for the proxy)."""
    cold = newest_items(dataset.sequences, dataset.num_items, fraction)
    relabel = relabel_warm_first(dataset.num_items, cold)
    new_seqs = [relabel.old_to_new[s] for s in dataset.sequences]
    warm = remove_items(new_seqs, np.arange(relabel.num_warm + 1, dataset.num_items + 1))
    has_warm = np.array([s.size > 0 for s in warm], dtype=bool)
    is_test = np.array([s.size >= 3 and s[-1] > relabel.num_warm for s in new_seqs], dtype=bool)
    split = ColdStartSplit(
        fraction=float(fraction),
        cold_items=cold,
        relabel=relabel,
        user_ids=dataset.user_ids[has_warm],
        warm_sequences=[s for s, k in zip(warm, has_warm, strict=True) if k],
        test_user_ids=dataset.user_ids[is_test],
        test_histories=[s[:-1] for s, k in zip(new_seqs, is_test, strict=True) if k],
        test_targets=np.array([s[-1] for s, k in zip(new_seqs, is_test, strict=True) if k], dtype=np.int64),
    )
    removed = sum(len(s) for s in dataset.sequences) - sum(len(s) for s in split.warm_sequences)
    log.info(
        "cold start: %d of %d items held out (%s), %d interactions removed, %d cold test users",
        cold.size, dataset.num_items, PROXY, removed, split.test_targets.size,
    )
    return split


def write_warm_dataset(
    dataset: Dataset, split: ColdStartSplit, out: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write the warm world as a canonical dataset folder (new ids 1..N_w) that ``semid`` trains on as is.

    Writes ``items.jsonl``/``sequences.txt``/``users.tsv`` of the warm items and ``warm_sequences`` (users keep
    their ids as original ids), every ``item_emb_<name>.npy`` of ``dataset`` restricted to warm items in new order,
    and ``coldstart.json`` (fraction, proxy, cold items' old ids, the new-to-old map) to rebuild the split.
    """
    out = Path(out)
    warm_old = split.relabel.new_to_old[1 : split.num_warm + 1]  # old id of new ids 1..N_w
    cat = dataset.catalogue
    rows = (warm_old - 1).tolist()
    warm_cat = Catalogue(
        np.arange(1, split.num_warm + 1),
        [cat.original_ids[r] for r in rows],
        [cat.titles[r] for r in rows],
        [cat.attributes[r] for r in rows],
    )
    write_dataset(out, warm_cat, split.warm_sequences, original_user_ids=[str(u) for u in split.user_ids], overwrite=overwrite)
    for name in dataset.embedding_names():
        with atomic_path(out / f"{EMBEDDING_PREFIX}{name}.npy") as tmp:
            np.save(tmp, dataset.embeddings(name)[warm_old - 1])
    write_json(
        out / COLD_FILE,
        {
            "source": str(dataset.path),
            "fraction": split.fraction,
            "proxy": PROXY,
            "num_items": int(dataset.num_items),
            "num_warm": split.num_warm,
            "cold_items_old_ids": split.cold_items.tolist(),
            "new_to_old": split.relabel.new_to_old[1:].tolist(),
        },
    )
    return out


def write_full_dataset(dataset: Dataset, split: ColdStartSplit, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the whole world in *new* ids (warm items 1..N_w, cold N_w+1..N) as a dataset folder: the catalogue a
    warm run grows into with ``semid add-items``. Every user's full sequence, relabelled; every embedding file."""
    out = Path(out)
    order = split.relabel.new_to_old[1:]  # old id of new ids 1..N
    cat = dataset.catalogue
    rows = (order - 1).tolist()
    full = Catalogue(np.arange(1, order.size + 1), [cat.original_ids[r] for r in rows], [cat.titles[r] for r in rows],
                     [cat.attributes[r] for r in rows])
    sequences = [split.relabel.old_to_new[s] for s in dataset.sequences]
    write_dataset(out, full, sequences, original_user_ids=[str(u) for u in dataset.user_ids], overwrite=overwrite)
    for name in dataset.embedding_names():
        with atomic_path(out / f"{EMBEDDING_PREFIX}{name}.npy") as tmp:
            np.save(tmp, dataset.embeddings(name)[order - 1])
    return out


def read_cold_manifest(folder: str | os.PathLike[str]) -> dict:
    """``coldstart.json`` of a folder written by :func:`write_warm_dataset`."""
    path = Path(folder) / COLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cold-start manifest (write the folder with `write_warm_dataset`)")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if len(manifest["new_to_old"]) != manifest["num_items"]:
        raise ValueError(f"{path}: `new_to_old` has {len(manifest['new_to_old'])} entries for {manifest['num_items']} items")
    return manifest
