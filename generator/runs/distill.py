"""``semid distill``: a new run folder whose code heads learned from the source run's dense head
(:mod:`generator.training.distill`).

The source run is only read. The new folder holds the source's config.yaml (its best checkpoint renamed), semantic
IDs, a checkpoint with the distilled weights (loadable and servable like any run's, not resumable: train the source
further instead), ``distill.json`` (the options, the validation history and the epoch kept) and, as after training,
the hybrid's fusion chosen on validation users. It is written in a temporary folder beside ``out`` and renamed into
place when complete, so ``out`` is either absent or whole.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from generator.models.checkpoint import SERVING_KEYS, STATE_PREFIX, safe_load, with_integrity
from generator.runs.decoders import choose_run_fusion
from generator.runs.folder import (
    BEST,
    CHECKPOINT_DIR,
    DISTILL_FILE,
    IDS_FILE,
    check_same_data,
    load_run,
    read_config,
    reading_lock,
    write_config,
)
from generator.training.distill import DistillOptions, distill_code_heads
from semid.data import load_dataset
from semid.io import atomic_path, fsync_path, make_temp_dir, write_json
from semid.split import leave_one_out

log = logging.getLogger(__name__)


def distill_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: DistillOptions = DistillOptions(),  # noqa: B008 (frozen)
                *, fusion: bool = True) -> dict[str, Any]:
    """Distil ``run_dir``'s dense head into its code heads and write the result as the new run folder ``out_dir``
    (which must not exist yet, or be an empty folder, outside the source). Returns what ``distill.json`` holds."""
    source, out = Path(run_dir), Path(out_dir)
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; `semid distill` writes a new run folder: name a new one")
    if out.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"{out}: is inside the source run {source}; `semid distill` writes a new run folder beside it")
    if read_config(source).get("design") != "causal":
        raise ValueError(f"{source}: a run of the {read_config(source).get('design')!r} design; distillation is for runs "
                         "of the causal design (the default of `semid train`) with a dense head")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.distill-")  # before the work: a folder that cannot be written fails now
    try:
        # one version of the run: its config, IDs and checkpoint read under its lock (a writer takes it), unless no
        # one can write the folder (read-only: nothing to wait for, and no lock file can be made)
        with reading_lock(source, "distill"):
            run = load_run(source)
            config = read_config(source)
            ckpt = {k: v for k, v in safe_load(run.checkpoint).items() if k in SERVING_KEYS}  # no optimiser or average: not resumable
            shutil.copyfile(source / IDS_FILE, tmp / IDS_FILE)
        check_same_data(run.config, source, run.data_dir)  # the data it was trained on, unchanged since
        split = leave_one_out(load_dataset(run.data_dir))
        state, history = distill_code_heads(run.model, run.tree, run.ids, split, options,
                                            log=lambda row: log.info("distill %s", row))
        kept = max(history, key=lambda row: row["ndcg@10"])["epoch"]
        ckpt["state_dict"] = {STATE_PREFIX + k: v for k, v in state.items()}
        (tmp / CHECKPOINT_DIR).mkdir()
        import torch

        with atomic_path(tmp / CHECKPOINT_DIR / BEST) as f:
            torch.save(with_integrity(ckpt), f)
        write_config(tmp, {**config, "best_checkpoint": f"{CHECKPOINT_DIR}/{BEST}"})
        record = {"source": str(source.resolve()), "source_checkpoint": str(run.checkpoint.resolve()), "epoch_kept": kept,
                  "history": history, "options": asdict(options),
                  "note": "config.yaml is the source's: its training figures (steps, epochs, best score) are the source's"}
        if fusion and run.model.has_dense:
            record["fusion"] = choose_run_fusion(load_run(tmp))
        write_json(tmp / DISTILL_FILE, record)
        for path in (tmp / IDS_FILE, tmp / CHECKPOINT_DIR, tmp):
            fsync_path(path, folder=path.is_dir())
        os.rename(tmp, out)  # replaces an empty folder of that name, never a full one
        fsync_path(out.parent, folder=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("distilled %s into %s: epoch %d kept (validation NDCG@10 %.4f -> %.4f)", source, out, kept,
             history[0]["ndcg@10"], history[kept]["ndcg@10"])
    return record
