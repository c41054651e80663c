"""Items added to a trained run for good (``semid add-items``): chained versions of the run's semantic IDs.

A run's ``RUN/semantic_ids.npz`` starts as the IDs the checkpoint was trained with. :func:`add_items` writes a new
version in its place, atomically (one file is the whole set), that *extends* the one before: the old items keep
their rows and tuples, the new ones follow. The file records its lineage and the new items' content::

    meta "lineage":  [{"digest": sha256 of the IDs, "num_items": n}, ...] every earlier version, oldest first
                     (the first is the version the run was trained with)
    meta "data":     the dataset folder the newest items came from (titles, evaluation)
    "added_content": float32 (M, D), the content embeddings of every item after the first version, in row order

:func:`load_model` accepts a checkpoint only for IDs whose first rows are exactly the IDs it was trained with (the
digest and item count of one lineage entry), and grows the model by the added items: their input vectors, code-head
scores and dense vectors come from their codes (and content, for models that read it), with no retraining.
Decoders normalise each tree node's distribution over the children it had in training
(``generator.causal.decode``), so old items' scores, and their order among themselves, do not change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from generator.model import LoadedModel, check_vocabulary, ids_digest, load_checkpoint
from semid.data import load_dataset
from semid.ids import SemanticIDs

log = logging.getLogger(__name__)

LINEAGE = "lineage"
ADDED_CONTENT = "added_content"


class AddedItems(NamedTuple):
    """What :func:`add_items` did: the new item ids, the IDs before and after, and the file written."""

    item_ids: np.ndarray
    before: int
    after: int
    path: Path
    colliding: int


def lineage(ids_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The earlier versions a semantic IDs file extends, oldest first (empty for IDs as trained)."""
    entries = SemanticIDs.load_metadata(ids_path).get(LINEAGE) or []
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("digest"), str) and isinstance(e.get("num_items"), int) for e in entries
    ):
        raise ValueError(f"{ids_path}: corrupt `lineage` metadata {entries!r}; restore the file from the run's training")
    return entries


def add_items(run_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str], *, embeddings: str | None = None,
              quantizer: str | os.PathLike[str] | None = None) -> AddedItems:
    """Add the items of ``data_dir`` that the run does not know yet (ids above its last) to the run, for good.

    Args:
        run_dir: a run folder (``semid train``).
        data_dir: a dataset folder holding the run's items (ids 1..n, unchanged) and the new ones (n+1..),
            with their content embeddings ``item_emb_<embeddings>.npy``.
        embeddings: the embeddings' name (default: the one the run was trained with, else ``minilm``).
        quantizer: the fitted quantizer (default: ``quantizer.pt`` beside the semantic IDs the run was trained with).
    """
    from generator.run import IDS_FILE, read_config
    from rqvae import load_quantizer

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    config = read_config(run_dir)
    if config.get("design") != "causal":
        raise ValueError(f"{run_dir}: a run of the {config.get('design')!r} design; items can be added to runs of the "
                         "causal design (the default of `semid train`) only")
    ids_path = run_dir / IDS_FILE
    ids = SemanticIDs.load(ids_path)
    before = lineage(ids_path)
    dataset = load_dataset(data_dir)
    n = ids.num_items
    if dataset.num_items <= n:
        raise ValueError(f"{data_dir}: {dataset.num_items:,} items, none above the run's {n:,}: nothing to add (the "
                         f"new items must be ids {n + 1}.. of the data folder, after the run's own)")
    _check_same_items(run_dir, config, ids_path, dataset, n)
    name = embeddings or (config.get("train") or {}).get("dense_embeddings") or "minilm"
    content = np.asarray(dataset.embeddings(name), dtype=np.float32)
    new_ids = np.arange(n + 1, dataset.num_items + 1, dtype=np.int64)
    qpath = Path(quantizer) if quantizer is not None else _default_quantizer(run_dir, config)
    codes = np.asarray(load_quantizer(qpath).encode(content[n:]))
    extended = ids.add_items(codes, new_ids)
    old_added = SemanticIDs.load_arrays(ids_path).get(ADDED_CONTENT)
    added = content[n:] if old_added is None else np.concatenate([old_added.astype(np.float32), content[n:]])
    if old_added is not None and old_added.shape[1] != content.shape[1]:
        raise ValueError(f"{data_dir}: item_emb_{name}.npy has width {content.shape[1]}, but the items added before had "
                         f"{old_added.shape[1]}: use the embeddings the run was trained with")
    extended.save(ids_path, arrays={ADDED_CONTENT: added}, lineage=[*before, {"digest": ids_digest(ids), "num_items": n}],
                  data=str(data_dir.resolve()), embeddings=name)
    stats = extended.collision_stats()
    log.info("added %d items to %s (%d -> %d); %s", new_ids.size, run_dir, n, extended.num_items, stats)
    return AddedItems(new_ids, n, extended.num_items, ids_path, stats.items_colliding)


def _check_same_items(run_dir: Path, config: dict[str, Any], ids_path: Path, dataset: Any, n: int) -> None:
    """DATA's first n items must be the run's items (same original ids, in order): the new ones come after."""
    source = Path(SemanticIDs.load_metadata(ids_path).get("data") or config.get("data", ""))
    if not (source / "items.jsonl").is_file():
        log.warning("%s: the run's data folder %s is not here; DATA's first %d items are taken to be the run's", run_dir, source, n)
        return
    theirs = load_dataset(source).catalogue.original_ids[:n]
    ours = dataset.catalogue.original_ids[:n]
    bad = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b), None)
    if bad is not None:
        raise ValueError(f"{dataset.path}: item {bad + 1} is {ours[bad]!r}, but the run's item {bad + 1} is {theirs[bad]!r} "
                         f"({source}): DATA must hold the run's {n:,} items first, unchanged, then the new ones")


def _default_quantizer(run_dir: Path, config: dict[str, Any]) -> Path:
    source = config.get("ids_source")
    if not source:
        raise ValueError(f"{run_dir / 'config.yaml'}: names no `ids_source`; pass the fitted quantizer with --quantizer")
    folder = Path(source).parent
    path = folder / "quantizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fitted quantizer beside the run's semantic IDs ({source}); pass it with --quantizer")
    ids_file = Path(source)
    if ids_file.is_file() and config.get("ids_digest") and ids_digest(SemanticIDs.load(ids_file)) != config["ids_digest"]:
        raise ValueError(f"{ids_file}: no longer the semantic IDs the run was trained with (refitted?), so {path} is not "
                         "their quantizer; pass the right one with --quantizer")
    return path


def load_model(checkpoint: str | os.PathLike[str], ids: SemanticIDs, ids_path: str | os.PathLike[str]) -> LoadedModel:
    """The checkpoint's model for ``ids``: the IDs it was trained with, or a version that extends them (the model
    grown by the added items). Any other IDs are refused, naming both files."""
    entries = lineage(ids_path)
    if not entries:
        return load_checkpoint(checkpoint, ids)
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    if not hasattr(model, "add_items"):
        raise ValueError(f"{ids_path}: holds items added after training, which only runs of the causal design serve; "
                         f"{checkpoint} is a T5 checkpoint: use the IDs it was trained with")
    n0 = model.num_items
    root = entries[0]["num_items"]
    if not any(e["num_items"] == n0 and e["digest"] == loaded.ids_digest for e in entries) or ids.num_items < n0:
        raise ValueError(f"{checkpoint}: trained with semantic IDs that {ids_path} does not extend (its lineage: "
                         f"{[(e['num_items'], e['digest'][:12]) for e in entries]}); use the run's own checkpoint or IDs")
    check_vocabulary(loaded.layout, loaded.ids_digest, ids.head(n0), source=str(checkpoint))
    if ids.num_items > n0:
        tokens = loaded.layout.codes_to_tokens(ids.codes[n0:])
        content = None
        if model.config.content_dim:
            added = SemanticIDs.load_arrays(ids_path).get(ADDED_CONTENT)
            if added is None or added.shape != (ids.num_items - root, model.config.content_dim):
                raise ValueError(f"{ids_path}: `added_content` must be ({ids.num_items - root}, {model.config.content_dim}) "
                                 f"for this model, got {None if added is None else added.shape}; add the items again")
            import torch

            content = torch.from_numpy(np.ascontiguousarray(added[n0 - root :], dtype=np.float32))
        model.add_items(tokens, content)
    return loaded
