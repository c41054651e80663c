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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from generator.designs.registry import for_config
from generator.runs.derive import check_new_out, finish, new_run_folder, read_source, write_serving_checkpoint
from generator.runs.folder import DISTILL_FILE, IDS_FILE, read_config
from generator.training.distill import DistillOptions, distill_code_heads
from semid.data import load_dataset
from semid.split import leave_one_out

log = logging.getLogger(__name__)


def _check_teacher(source: Path, model: Any) -> None:
    """Refuse a run with no dense head (the teacher) or no node vectors (what the trees learn), naming what to do."""
    if not model.dense_dim:
        raise ValueError(f"{source}: has no dense head (trained with `--dense none`), and distillation needs a causal model "
                         "with a dense head: the code heads learn the run's own dense softmax; train the run with one (e.g. "
                         "the default `--dense id`) and distil that")
    if not model.node_vectors:
        raise ValueError(f"{source}: has no node vectors (trained with `--model-option node_vectors=False`), which "
                         "distillation needs (it trains them with the code heads); train the run with them (the default) "
                         "and distil that")


def distill_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], options: DistillOptions = DistillOptions(),  # noqa: B008 (frozen)
                *, fusion: bool = True) -> dict[str, Any]:
    """Distil ``run_dir``'s dense head into its code heads and write the result as the new run folder ``out_dir``
    (which must not exist yet, or be an empty folder, outside the source). Returns what ``distill.json`` holds."""
    source, out = Path(run_dir), Path(out_dir)
    check_new_out(out, [source], "distill")
    design = for_config(read_config(source)).name  # (a title run's config.yaml says "causal": its train.target tells)
    if design != "causal":
        raise ValueError(f"{source}: a run of the {design!r} design; distillation is for runs "
                         "of the causal design (the default of `semid train`) with a dense head")
    with new_run_folder(out, "distill") as tmp:
        run, config, meta, digest = read_source(source, "distill", ids_copy=tmp / IDS_FILE)
        _check_teacher(source, run.model_config)
        split = leave_one_out(load_dataset(run.data_dir))
        state, history = distill_code_heads(run.model, run.tree, run.ids, split, options,
                                            log=lambda row: log.info("distill %s", row))
        kept = max(history, key=lambda row: row["ndcg@10"])["epoch"]
        write_serving_checkpoint(tmp, meta, state, config)
        record = {"source": str(source.resolve()), "source_checkpoint": str(run.checkpoint.resolve()),
                  "source_sha256": digest, "epoch_kept": kept, "history": history, "options": asdict(options),
                  "note": "config.yaml is the source's: its training figures (steps, epochs, best score) are the source's"}
        finish(tmp, DISTILL_FILE, record, fusion=fusion and run.model.has_dense)
    log.info("distilled %s into %s: epoch %d kept (validation NDCG@10 %.4f -> %.4f)", source, out, kept,
             history[0]["ndcg@10"], history[kept]["ndcg@10"])
    return record
