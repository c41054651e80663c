"""The lineage of a run's semantic IDs after ``semid add-items``, and loading a checkpoint for extended IDs.

A version written by ``generator.runs.catalogue.add_items`` records every earlier version (digest and item count,
oldest first) and the added items' content embeddings; :func:`load_model` accepts a checkpoint only for IDs whose
first rows are exactly the IDs it was trained with, and grows the model by the added items.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from generator.designs.registry import load_checkpoint
from generator.models.checkpoint import LoadedModel, check_vocabulary
from semid.ids import IDsFile, SemanticIDs

LINEAGE = "lineage"
ADDED_CONTENT = "added_content"


def lineage(ids_path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The earlier versions a semantic IDs file extends, oldest first (empty for IDs as trained); ``meta``: the
    file's metadata when it was read already."""
    entries = (SemanticIDs.load_metadata(ids_path) if meta is None else meta).get(LINEAGE) or []
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("digest"), str) and isinstance(e.get("num_items"), int) for e in entries
    ):
        raise ValueError(f"{ids_path}: corrupt `lineage` metadata {entries!r}; restore the file from the run's training")
    return entries


def load_model(checkpoint: str | os.PathLike[str], ids: SemanticIDs, ids_path: str | os.PathLike[str],
               stored: IDsFile | None = None, *, mmap: bool = False) -> LoadedModel:
    """The checkpoint's model for ``ids``: the IDs it was trained with, or a version that extends them (the model
    grown by the added items). Any other IDs are refused, naming both files.

    Args:
        stored: ``ids_path`` as read already (``SemanticIDs.read``), so that the file is read once; default: read it.
        mmap: map the checkpoint rather than read it (``generator.designs.registry.load_checkpoint``).
    """
    stored = SemanticIDs.read(ids_path) if stored is None else stored
    entries = lineage(ids_path, stored.meta)
    if not entries:
        return load_checkpoint(checkpoint, ids, mmap=mmap)
    loaded = load_checkpoint(checkpoint, mmap=mmap)
    model = loaded.model
    if not hasattr(model, "add_items"):
        raise ValueError(f"{ids_path}: holds items added after training, which only runs of the causal design serve; "
                         f"{checkpoint} is a T5 checkpoint: use the IDs it was trained with")
    n0 = model.num_items
    root = entries[0]["num_items"]
    if not any(e["num_items"] == n0 and e["digest"] == loaded.ids_digest for e in entries) or ids.num_items < n0:
        raise ValueError(f"{checkpoint}: trained with semantic IDs that {ids_path} does not extend (its lineage: "
                         f"{[(e['num_items'], e['digest'][:12]) for e in entries]}); use the run's own checkpoint or IDs")
    try:
        check_vocabulary(loaded.layout, loaded.ids_digest, ids.head(n0), source=str(checkpoint))
    except ValueError as e:
        raise ValueError(f"{e} (the first {n0:,} items of {ids_path})") from None
    if ids.num_items > n0:
        tokens = loaded.layout.codes_to_tokens(ids.codes[n0:])
        content = None
        if model.config.content_dim:
            added = stored.arrays.get(ADDED_CONTENT)
            if added is None or added.shape != (ids.num_items - root, model.config.content_dim):
                raise ValueError(f"{ids_path}: `added_content` must be ({ids.num_items - root}, {model.config.content_dim}) "
                                 f"for this model, got {None if added is None else added.shape}; add the items again")
            import torch

            content = torch.from_numpy(np.ascontiguousarray(added[n0 - root :], dtype=np.float32))
        model.add_items(tokens, content)
    return loaded
