"""Items added to a trained run for good (``semid add-items``): chained versions of the run's semantic IDs.

A run's ``RUN/semantic_ids.npz`` starts as the IDs the checkpoint was trained with. :func:`add_items` writes a new
version in its place, atomically (one file is the whole set), that *extends* the one before: the old items keep
their rows and tuples, the new ones follow. The file records its lineage and the new items' content::

    meta "lineage":  [{"digest": sha256 of the IDs, "num_items": n}, ...] every earlier version, oldest first
                     (the first is the version the run was trained with)
    meta "data":     the dataset folder the newest items came from (titles, evaluation)
    "added_content": float32 (M, D), the content embeddings of every item after the first version, in row order

``generator.runs.lineage.load_model`` accepts a checkpoint only for IDs whose first rows are exactly the IDs it was trained with (the
digest and item count of one lineage entry), and grows the model by the added items: their input vectors, code-head
scores and dense vectors come from their codes (and content, for models that read it), with no retraining.
Decoders normalise each tree node's distribution over the children it had in training
(``generator.decoding.causal``), so old items' scores, and their order among themselves, do not change.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from generator.designs.registry import for_config
from generator.models.checkpoint import ids_digest
from generator.runs.cold_items import extend_ids
from generator.runs.folder import IDS_FILE, LOCK_FILE, best_checkpoint, data_fingerprint, read_config
from generator.runs.lineage import ADDED_CONTENT, lineage, load_model
from semid.data import load_dataset
from semid.ids import SemanticIDs
from semid.safe_read import cut, npy_rows, read_npy

log = logging.getLogger(__name__)



class AddedItems(NamedTuple):
    """What :func:`add_items` did: the new item ids, the IDs before and after, and the file written."""

    item_ids: np.ndarray
    before: int
    after: int
    path: Path
    colliding: int


def add_items(run_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str], *, embeddings: str | None = None,
              quantizer: str | os.PathLike[str] | None = None) -> AddedItems:
    """Add the items of ``data_dir`` that the run does not know yet (ids above its last) to the run, for good.

    Args:
        run_dir: a run folder (``semid train``) of the causal design.
        data_dir: a dataset folder holding the run's items (ids 1..n, unchanged, checked by original id) and the new
            ones (n+1..), with their embeddings.
        embeddings: the name of the quantizer's input embeddings ``item_emb_<name>.npy`` (default: the file the
            codebooks were fitted on, from the quantizer folder's stats.json). The model's content (``--dense both``)
            always comes from the embeddings it was trained with (``train.dense_embeddings``).
        quantizer: the fitted quantizer (default: ``quantizer.pt`` beside the semantic IDs the run was trained with).

    The new version is checked to load with the run's best checkpoint before it replaces ``RUN/semantic_ids.npz``;
    the version it replaces is kept as ``RUN/semantic_ids.v<k>.npz`` (k = 1 for the IDs as trained). The run's
    training lock is held throughout, so two add-items (or a training) cannot interleave.
    """
    from rqvae import load_quantizer
    from semid.io import atomic_path, folder_lock

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if embeddings is not None and (not isinstance(embeddings, str) or not embeddings.strip()):
        raise ValueError(f"`embeddings` (--embeddings) must name item_emb_<NAME>.npy of DATA, got {embeddings!r}; leave "
                         "it out for the embeddings the quantizer was fitted on")
    config = read_config(run_dir)
    design = for_config(config).name  # (a title run's config.yaml says "causal": its train.target tells)
    if design != "causal":
        raise ValueError(f"{run_dir}: a run of the {design!r} design; items can be added to runs of the "
                         "causal design (the default of `semid train`) only")
    with folder_lock(run_dir, LOCK_FILE, what="a training or add-items"):
        ids_path = run_dir / IDS_FILE
        ids = SemanticIDs.load(ids_path)
        before = lineage(ids_path)
        dataset = load_dataset(data_dir)
        n = ids.num_items
        if dataset.num_items <= n:
            raise ValueError(f"{data_dir}: {dataset.num_items:,} items, none above the run's {n:,}: nothing to add (the "
                             f"new items must be ids {n + 1}.. of the data folder, after the run's own)")
        source = _check_same_items(run_dir, config, ids_path, dataset, n)
        qpath = Path(quantizer) if quantizer is not None else _default_quantizer(run_dir, config)
        if not qpath.is_file():
            raise FileNotFoundError(f"{qpath}: no fitted quantizer here (`semid fit-codebooks` writes quantizer.pt)")
        if quantizer is not None and not _trained_with(qpath.parent / IDS_FILE, config):  # another fit's
            raise ValueError(f"{qpath}: fitted with other semantic IDs ({qpath.parent / IDS_FILE}) than the run was "
                             "trained with, so it would give the new items codes of another tokeniser; pass the quantizer "
                             "fitted with the run's IDs (beside them, the default)")
        fitted = load_quantizer(qpath)  # read first: a file that is no quantizer says so before its stats.json is asked
        codes_name = embeddings if embeddings is not None else _fitted_on(qpath)
        if embeddings is not None and not (source.path / f"item_emb_{embeddings}.npy").is_file():
            try:  # (nothing to compare the run's rows with: they were accepted from any encoder, with a warning)
                fitted_name = _fitted_on(qpath)
            except ValueError:
                fitted_name = embeddings  # (stats.json names no file: the warning below, as before)
            if fitted_name != embeddings:
                raise ValueError(f"--embeddings {embeddings}: the quantizer was fitted on item_emb_{fitted_name}.npy "
                                 f"({qpath.parent / 'stats.json'}), and the run's data folder {source.path} has no "
                                 f"item_emb_{embeddings}.npy to check the new file against: the new items' codes must "
                                 f"come from the same encoder; pass --embeddings {fitted_name}, or leave it out")
        _check_same_embeddings(source, dataset, codes_name, n)
        new = np.asarray(dataset.embeddings(codes_name)[n:], dtype=np.float32)
        width = _collaborative_width(qpath)  # codebooks fitted beside a run's item vectors: new items have none
        if width:  # the same transform as the fitted items', with no vectors: normalised text, then zeros
            from semid.collaborative import with_collaborative

            new = with_collaborative(new, np.zeros((0, width), np.float32), np.zeros(0, np.int64))
        extended = extend_ids(ids, new, np.arange(n + 1, dataset.num_items + 1), encode=fitted.encode)
        arrays = {}
        content_dim = int((config.get("model") or {}).get("content_dim") or 0)
        content_name = (config.get("train") or {}).get("dense_embeddings") or "minilm"
        if content_dim:  # the model reads content: the new items' rows of the embeddings it was trained with
            content = np.asarray(dataset.embeddings(content_name)[n:], dtype=np.float32)
            if content.shape[1] != content_dim:
                raise ValueError(f"{data_dir}: item_emb_{content_name}.npy has width {content.shape[1]}, but the run was "
                                 f"trained with content of width {content_dim}: use the embeddings it was trained with")
            if content_name != codes_name:  # the model's content: from the run's encoder too
                _check_same_embeddings(source, dataset, content_name, n)
            old = SemanticIDs.load_arrays(ids_path).get(ADDED_CONTENT)
            arrays[ADDED_CONTENT] = content if old is None else np.concatenate([old.astype(np.float32), content])
        meta = {"lineage": [*before, {"digest": ids_digest(ids), "num_items": n}], "data": str(data_dir.resolve()),
                "data_fingerprint": data_fingerprint(data_dir), "embeddings": codes_name}
        with atomic_path(ids_path) as tmp:  # write, prove it loads with the run's checkpoint, then replace
            extended.save(tmp, arrays=arrays, **meta)
            load_model(best_checkpoint(run_dir, config), extended, tmp)
            with atomic_path(run_dir / f"semantic_ids.v{len(before) + 1}.npz") as keep:
                keep.write_bytes(ids_path.read_bytes())  # the version being replaced, kept
    stats = extended.collision_stats()
    log.info("added %d items to %s (%d -> %d); %s", extended.num_items - n, run_dir, n, extended.num_items, stats)
    return AddedItems(extended.item_ids[n:], n, extended.num_items, ids_path, stats.items_colliding)


def _fit_stats(quantizer: Path) -> dict[str, Any]:
    """The stats.json beside the quantizer (``semid fit-codebooks`` writes it); {} where there is none."""
    import json

    stats = quantizer.parent / "stats.json"
    if not stats.is_file():
        return {}
    fix = "restore it, or fit the codebooks again (`semid fit-codebooks`)"
    try:
        out = json.loads(stats.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{stats}: not readable JSON ({e}); {fix}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{stats}: must hold a JSON object, got {type(out).__name__}; {fix}")
    record = out.get("collaborative")
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("width"), int)
                                   and not isinstance(record["width"], bool) and record["width"] >= 0):
        raise ValueError(f"{stats}: `collaborative` must be an object with an int `width` >= 0, got {record!r}; {fix}")
    return out


def _collaborative_width(quantizer: Path) -> int:
    """The width of the item vectors the quantizer was fitted on beside the embeddings (``fit-codebooks
    --collaborative``; 0 for none): new items get zeros there, so their codes come from their embeddings alone."""
    record = _fit_stats(quantizer).get("collaborative")
    return int(record["width"]) if isinstance(record, dict) else 0


def _fitted_on(quantizer: Path) -> str:
    """The name of the embeddings the quantizer was fitted on (``item_emb_<name>.npy`` in its folder's stats.json)."""
    source = _fit_stats(quantizer).get("embeddings", "")
    stem = Path(source).name
    if stem.startswith("item_emb_") and stem.endswith(".npy"):
        return stem[len("item_emb_") : -len(".npy")]
    raise ValueError(f"{quantizer.parent / 'stats.json'}: does not name the item_emb_<name>.npy the quantizer was fitted "
                     f"on (got {source!r}); pass its name with --embeddings")


def _check_same_items(run_dir: Path, config: dict[str, Any], ids_path: Path, dataset: Any, n: int) -> Any:
    """DATA's first n items must be the run's items (same original ids and titles, in order): the new ones come
    after. Returns the run's own dataset (what DATA was checked against)."""
    meta = SemanticIDs.load_metadata(ids_path)
    source = Path(meta.get("data") or config.get("data", ""))
    if not (source / "items.jsonl").is_file():
        raise FileNotFoundError(f"{source}: the run's data folder (named in {run_dir / 'config.yaml'}) is not here, so "
                                f"{dataset.path} cannot be checked to hold the run's {n:,} items first; put it back")
    expected = meta.get("data_fingerprint") if meta.get("data") else config.get("data_fingerprint")
    if expected is not None and data_fingerprint(source) != expected:  # e.g. prepared again in place: renumbered
        raise ValueError(f"{source}: the run's data folder changed since the run's items were numbered from it, so "
                         f"{dataset.path} cannot be checked to hold the run's {n:,} items first, in order; restore the "
                         "folder as it was (or train again on the new data)")
    own = load_dataset(source)
    for what, theirs, ours in (("", own.catalogue.original_ids[:n], dataset.catalogue.original_ids[:n]),
                               ("'s title", own.catalogue.titles[:n], dataset.catalogue.titles[:n])):
        bad = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b), None)
        if bad is not None:  # (a changed title would change what the run answers for an item it was trained on)
            raise ValueError(f"{dataset.path}: item {bad + 1}{what} is {cut(ours[bad])!r}, but the run's item {bad + 1}{what} "
                             f"is {cut(theirs[bad])!r} ({source}): DATA must hold the run's {n:,} items first, "
                             "unchanged, then the new ones")
    return own


def _check_same_embeddings(own: Any, dataset: Any, name: str, n: int) -> None:
    """The run's items' rows of DATA's ``item_emb_<name>.npy`` (the quantizer's input, or the model's content) must be
    the run's own: the new items' rows then come from the same encoder, so their codes live where the run's do
    (embeddings made again with another model gave the new items codes of another space, with no error). Both files
    are compared a chunk of rows at a time (never read whole here)."""
    path, new_path = own.path / f"item_emb_{name}.npy", dataset.path / f"item_emb_{name}.npy"
    if not path.is_file():  # (the run's folder never had this file: nothing to compare with)
        log.warning("%s: not here, so the run's items' rows of %s are not checked against it", path, new_path)
        return
    theirs, ours = read_npy(path, mmap=True), read_npy(new_path, mmap=True)
    for arr, where in ((theirs, path), (ours, new_path)):
        if arr.ndim != 2 or arr.shape[0] < n or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{where}: a numeric (items x dimensions) array with at least the run's {n:,} items' rows "
                             f"is needed, got {arr.dtype} of shape {arr.shape}; make it with `semid embed`")
    if theirs.shape[1] != ours.shape[1]:
        raise ValueError(f"{new_path}: width {ours.shape[1]}, but the run's items were coded from width "
                         f"{theirs.shape[1]} ({path}): make it with the encoder that made the run's")
    step = max(1, (1 << 24) // (4 * theirs.shape[1]))  # rows of 16 MB in float32
    for lo in range(0, n, step):  # loop over chunks of rows
        hi = min(lo + step, n)
        a, b = npy_rows(path, lo, hi).astype(np.float32), npy_rows(new_path, lo, hi).astype(np.float32)
        rows = np.flatnonzero(~np.isclose(a, b, rtol=1e-4, atol=1e-6).all(axis=1))
        if rows.size:
            raise ValueError(f"{new_path}: item {lo + int(rows[0]) + 1}'s embedding differs from the run's ({path}): "
                             "the new items would get codes (or content) from another encoder's space than the run's "
                             "items'; make the file with the encoder that made the run's (the run's items' rows unchanged)")



def _trained_with(ids_file: Path, config: dict[str, Any]) -> bool:
    """Whether ``ids_file`` is the semantic IDs the run was trained with (or cannot be told: no file, no digest)."""
    return not (ids_file.is_file() and config.get("ids_digest")) or ids_digest(SemanticIDs.load(ids_file)) == config["ids_digest"]


def _default_quantizer(run_dir: Path, config: dict[str, Any]) -> Path:
    source = config.get("ids_source")
    if not source:
        raise ValueError(f"{run_dir / 'config.yaml'}: names no `ids_source`; pass the fitted quantizer with --quantizer")
    folder = Path(source).parent
    path = folder / "quantizer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no fitted quantizer beside the run's semantic IDs ({source}); pass it with --quantizer")
    ids_file = Path(source)
    if not _trained_with(ids_file, config):
        raise ValueError(f"{ids_file}: no longer the semantic IDs the run was trained with (refitted?), so {path} is not "
                         "their quantizer; pass the right one with --quantizer")
    return path
