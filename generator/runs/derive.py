"""A run folder made from other runs (``semid combine``, ``semid distill``), written the one safe way.

    check_new_out(out, sources, "distill")          # before any work: out is new (or empty) and outside the sources
    with new_run_folder(out, "distill") as tmp:      # a temporary folder beside out, renamed into place when whole
        run, config, ckpt, sha = read_source(source, "distill", ids_copy=tmp / IDS_FILE)
        write_serving_checkpoint(tmp, ckpt, state, config)
        finish(tmp, DISTILL_FILE, record, fusion=True)

The sources are only read, each under its lock; the new folder's checkpoint is servable, not resumable (no optimiser
state); ``out`` is either absent or whole: a failure anywhere removes the temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from generator.models.checkpoint import SERVING_KEYS, STATE_PREFIX, safe_load, with_integrity
from generator.runs.decoders import choose_run_fusion
from generator.runs.folder import (
    BEST,
    CHECKPOINT_DIR,
    IDS_FILE,
    Run,
    check_same_data,
    load_run,
    read_config,
    reading_lock,
    write_config,
)
from semid.io import atomic_path, file_sha256, fsync_path, make_temp_dir, write_json


def check_new_out(out: Path, sources: list[Path], command: str) -> None:
    """Refuse an ``out`` that holds anything, or lies inside a source, naming it and what to do."""
    for source in sources:  # loop over the sources (a few)
        if out.resolve().is_relative_to(source.resolve()):
            raise ValueError(f"{out}: is inside the source run {source}; `semid {command}` writes a new run folder beside it")
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; `semid {command}` writes a new run folder: name a new one")


# what to do with a source holding items added after training (`semid add-items`), by command: their codes have no
# training windows, and the run's data is the folder they were added from (not the one it was trained on)
ADDED_ITEMS = {
    "combine": "combine the runs first, then add the items to the combined run",
    "distill": "runs with added items cannot be distilled: distil the run before adding items, then add them to the "
               "distilled run (the run before: a copy of RUN with RUN/semantic_ids.v1.npz, the IDs it was trained with, "
               "as its semantic_ids.npz)",
}


def read_source(source: Path, command: str, ids_copy: Path | None = None) -> tuple[Run, dict[str, Any], dict[str, Any], str]:
    """One version of a run, read under its lock (unless no one can write the folder): the loaded run, its config,
    its checkpoint's serving record without the weights, and the checkpoint's sha256; its IDs copied to ``ids_copy``.
    Refuses a run with items added after training (:data:`ADDED_ITEMS`: what to do), then a run whose data changed
    since it was trained."""
    with reading_lock(source):
        run = load_run(source)
        config = read_config(source)
        meta = {k: v for k, v in safe_load(run.checkpoint).items() if k in SERVING_KEYS and k != "state_dict"}
        digest = file_sha256(run.checkpoint)
        if ids_copy is not None:
            shutil.copyfile(source / IDS_FILE, ids_copy)
    added = getattr(run.model, "num_items", 0) - getattr(run.model, "trained_items", getattr(run.model, "num_items", 0))
    if added > 0:  # before the data: after `semid add-items` the run's data is the folder the items came from
        raise ValueError(f"{source}: has {added} items added after training; {ADDED_ITEMS[command]}")
    check_same_data(config, source, run.data_dir)
    return run, config, meta, digest


def write_serving_checkpoint(tmp: Path, meta: dict[str, Any], state: dict[str, Any], config: dict[str, Any]) -> None:
    """The new run's one checkpoint (``meta`` with the model's ``state``) and its config.yaml pointing at it."""
    import torch

    (tmp / CHECKPOINT_DIR).mkdir()
    with atomic_path(tmp / CHECKPOINT_DIR / BEST) as f:
        torch.save(with_integrity({**meta, "state_dict": {STATE_PREFIX + k: v for k, v in state.items()}}), f)
    write_config(tmp, {**config, "best_checkpoint": f"{CHECKPOINT_DIR}/{BEST}"})


def finish(tmp: Path, record_file: str, record: dict[str, Any], *, fusion: bool) -> None:
    """The record of how the run was made, with the hybrid's fusion chosen on validation users as after training
    (``fusion``), written into the new run."""
    if fusion:
        record["fusion"] = choose_run_fusion(load_run(tmp))
    write_json(tmp / record_file, record)


@contextmanager
def new_run_folder(out: Path, command: str) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write the new run in, synced and renamed to ``out`` when the block ends
    (replacing an empty folder, never a full one); removed if anything fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.{command}-")  # before the work: a folder that cannot be written fails now
    try:
        yield tmp
        for path in (tmp / IDS_FILE, tmp / CHECKPOINT_DIR, tmp):
            fsync_path(path, folder=path.is_dir())
        try:
            os.rename(tmp, out)
        except OSError as e:  # another writer filled it meanwhile
            raise FileExistsError(f"{out}: was written by another process meanwhile ({e.strerror}); name a new folder") from e
        fsync_path(out.parent, folder=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
