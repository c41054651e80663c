"""Train a generator into a run folder (see ``generator.runs.folder``): data -> examples -> Lightning fit -> best checkpoint.

    result = train_run("../shared/data/beauty", "ids/semantic_ids.npz", "runs/default", TrainOptions())

The design (``generator.designs``), chosen by the preset and the target, sets up the model, the data and the
Lightning system: ``causal`` (the default: one position per history item, every next-item target trained in one
pass), T5 (``tiger``, the published TIGER architecture, ``cpu``, ``item-t5``) and title (``--target title``).
Options left at None take the design's defaults.

The best checkpoint is chosen on validation over a fixed sample of validation users, for the decoder the run
serves with (``val/<decoder>/ndcg@10`` for the causal design, ``val/ndcg@10`` for T5); after training, the best
checkpoint is evaluated on all validation users (``RUN/metrics_valid.json``). Test users are never looked at here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from generator.designs.base import TrainInputs
from generator.models.checkpoint import ids_digest, safe_load
from generator.runs.decoders import choose_run_fusion
from generator.runs.evaluate import evaluate_run, validated_decoder
from generator.runs.folder import (
    BEST,
    CHECKPOINT_DIR,
    COMBINE_FILE,
    CONFIG_FILE,
    DISTILL_FILE,
    HYBRID_FILE,
    IDS_FILE,
    LAST,
    LOCK_FILE,
    LOG_DIR,
    check_writable,
    data_fingerprint,
    load_run,
    read_config,
    write_config,
)
from generator.runs.options import (
    FIXED_ON_RESUME,
    TrainOptions,
    effective_patience,
    parse_max_time,
    stored_options,
)
from generator.runs.out_folder import check_resume_folder, check_train_out, resume_point
from generator.runs.recommender import on_device
from generator.runs.train_checks import check_before_writing
from generator.training.callbacks import (
    AtomicCheckpointIO,
    BudgetProgress,
    BudgetSnapshots,
    CpuTimeLimit,
    DivergenceStop,
    KeptPatience,
    WeightEMA,
)
from generator.training.resume import RESUME, ResumePoints, RunCheckpoint, SignalGuard, StepSeeds
from semid.codebooks import check_ids_for
from semid.data import load_dataset
from semid.ids import SemanticIDs
from semid.io import file_sha256, folder_lock, remove_atomic_leftovers
from semid.split import leave_one_out
from semid.tree import PrefixTree

log = logging.getLogger(__name__)


class TrainResult(NamedTuple):
    run_dir: Path
    best_checkpoint: Path
    best_score: float | None  # val/ndcg@10 of the best checkpoint on the validation sample
    epochs: float  # optimiser steps / steps per epoch (per process)
    steps: int
    seconds: float
    padded_share: float
    metrics_valid: dict[str, Any] | None  # the final evaluation on all validation users (None if skipped)
    fusion: dict[str, Any] | None = None  # the hybrid's fusion chosen at the end (RUN/hybrid.json; None: no dense head)
    train_seconds: float | None = None  # the training's own (config.yaml's ``train_seconds``); ``seconds``: with the
    # final validation and the fusion's choice after it


def _unfinished_first_run(out: Path) -> bool:
    """Whether ``out`` holds a first run that stopped before its first checkpoint (it failed in setup, e.g. "no
    training examples", or early in training): config.yaml names no best checkpoint and checkpoints/ holds no file.
    Training into it again loses nothing; a folder with any checkpoint, or a finished run, is never reused."""
    import yaml  # read_config's parser: a config.yaml it cannot parse is not known to be unfinished

    try:
        config = read_config(out)
    except (FileNotFoundError, ValueError, yaml.YAMLError):
        return False
    ckpt_dir = out / CHECKPOINT_DIR
    checkpoints = ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(p.is_file() for p in ckpt_dir.rglob("*")))
    return config.get("best_checkpoint") is None and not checkpoints


def _prepare_run_dir(out: Path, ids: SemanticIDs, options: TrainOptions, resume: bool) -> Path | None:
    """Create or check the run folder; return the checkpoint to resume from (or None).

    A folder left by a first run that stopped before its first checkpoint is reused (its config.yaml and IDs copy
    are overwritten): otherwise a failed setup would block its folder for good, refused as a run and with nothing to
    resume.
    """
    last = out / CHECKPOINT_DIR / LAST
    remove_atomic_leftovers(out / CHECKPOINT_DIR)  # a checkpoint write a kill -9 cut short (we hold the lock)
    if not resume:
        if (out / "config.yaml").exists() or (out / CHECKPOINT_DIR).exists():
            if not _unfinished_first_run(out):
                raise FileExistsError(f"{out}: already holds a run; continue it with --resume (`resume=True`), or choose "
                                      "another folder")
            log.warning("%s: reusing the folder of a run that stopped before its first checkpoint", out)
        out.mkdir(parents=True, exist_ok=True)
        ids.save(out / IDS_FILE)
        return None
    stored = read_config(out)
    if stored.get("ids_digest") != ids_digest(ids):
        raise ValueError(f"{out}: this run was trained with other semantic IDs than the ones given; resume with its own {IDS_FILE}")
    old = stored_options(stored.get("train", {}))
    changed = [k for k in FIXED_ON_RESUME if k in old and old[k] != getattr(options, k)]
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {getattr(options, k)!r}" for k in changed)
        raise ValueError(f"{out}: a resumed run must keep {list(FIXED_ON_RESUME)}; changed {diffs}")
    point = resume_point(out / CHECKPOINT_DIR, ids_digest(ids))
    if point is None:
        why = ("; the run stopped before its first checkpoint: train again without `resume`" if _unfinished_first_run(out)
               else f"; it is a distilled run ({DISTILL_FILE}), which serves but does not train: resume its source"
               if (out / DISTILL_FILE).is_file()
               else f"; it is a combined run ({COMBINE_FILE}), which serves but does not train: resume its sources"
               if (out / COMBINE_FILE).is_file() else "")
        raise FileNotFoundError(f"{last}: nothing to resume from{why}")
    return point


def _check_same_model(out: Path, options: TrainOptions, config: Any) -> None:
    """A resume rebuilds the model from the options (its preset and ``model_options``); it must be the model the run
    was trained as (config.yaml's ``model``): a preset whose sizes changed since would otherwise load other weights, or
    the same shapes with another loss."""
    stored = read_config(out).get("model")
    if stored is None:
        return
    plain = lambda d: json.loads(json.dumps(d))  # noqa: E731 (tuples and lists alike)
    was, now = plain(type(config).from_dict(stored).to_dict()), plain(config.to_dict())
    diffs = [f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"{out}: this run was trained as another model than preset {options.preset!r} with its "
                         f"model options builds today ({', '.join(diffs)}); the preset's sizes may have changed since "
                         "(the default `causal` became width 128 with the sampled dense head; the width-64 default is "
                         "`causal-64`): resume with the preset and `--model-option`s that build the run's model")


def _sha256_if_file(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def _stale(metrics: Path, out: Path, digests: dict[str, str | None], changed: bool) -> bool:
    """Whether a metrics file no longer describes its checkpoint: the file it names is not the one whose digest it
    records; a file recording none (an older semid's, or not JSON): when the best checkpoint ``changed`` (a file of
    another checkpoint, unchanged, was removed with them). ``digests``: each checkpoint's, hashed once."""
    try:
        record = json.loads(metrics.read_text(encoding="utf-8"))
        ckpt, sha = record.get("checkpoint"), record.get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError):
        return changed
    if not (isinstance(ckpt, str) and isinstance(sha, str)):
        return changed
    if ckpt not in digests:
        digests[ckpt] = _sha256_if_file(out / ckpt)
    return digests[ckpt] != sha


def train_run(
    data_dir: str | os.PathLike[str],
    ids_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: TrainOptions = TrainOptions(),  # noqa: B008 (a frozen dataclass, so one shared default is safe)
    *,
    resume: bool = False,
    snapshots: Sequence[float] = (),
    callbacks: Sequence[L.Callback] = (),
) -> TrainResult:
    """Train a generator on a dataset folder with the given semantic IDs; write the run folder ``out_dir``.

    Args:
        resume: continue the run in ``out_dir`` from its last checkpoint (same IDs and fixed options).
        snapshots: wall-clock budgets in minutes: when training has run that long, the best checkpoint so far (chosen
            on validation) is copied to ``RUN/checkpoints/best_<M>min.ckpt`` (learning curves from one run).
        callbacks: more Lightning callbacks (logging, fault injection in tests).

    Raises:
        generator.training.resume.TrainingInterrupted: a SIGINT or SIGTERM stopped the training; ``resume`` continues it
            exactly. A resume changes nothing the finished run serves with until its replacement is written:
            config.yaml is rewritten at the end, best.ckpt only by a better checkpoint, metrics_valid.json by the
            final evaluation (the other metrics_*.json are removed at the end if the best checkpoint changed).
        FileExistsError: another training holds the folder's lock (``RUN/train.lock``, which must be a regular file:
            a symbolic link there is refused, never followed); ``out_dir`` is a file, or a non-empty folder that is
            not a run folder (``generator.runs.out_folder``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _train_run(data_dir, ids_path, out_dir, options, resume, snapshots, callbacks)
    finally:
        torch.set_num_threads(threads)


def check_resumable(out: Path) -> None:
    """Refuse to resume where no run is (a mistyped --out), saying so rather than that a file is missing."""
    if not (out / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{out}: nothing to resume (no run here: no {CONFIG_FILE}); leave out --resume to start one")


def _train_run(data_dir: Any, ids_path: Any, out_dir: Any, options: TrainOptions, resume: bool, snapshots: Sequence[float],
               extra_callbacks: Sequence[L.Callback]) -> TrainResult:
    start = time.perf_counter()
    out = Path(out_dir)
    dataset = load_dataset(data_dir)
    ids = SemanticIDs.load(ids_path)
    check_ids_for(ids, ids_path, dataset.num_items, data_dir)  # exactly its items 1..N, fitted on its embeddings
    # DDP worker processes (re-launched scripts) find the folder made by rank 0 and write nothing
    is_worker = rank_zero_only.rank != 0
    if is_worker:  # no lock (rank 0 holds it); its signals are noted, and rank 0's decide when all stop
        ckpt_path = resume_point(out / CHECKPOINT_DIR, ids_digest(ids)) if resume else None
        with SignalGuard(out) as guard:
            return _train(data_dir, ids_path, out, dataset, ids, options, resume, snapshots, extra_callbacks, ckpt_path, start, guard, True)
    if resume:  # a folder it cannot write would fail at the first checkpoint, after the work: check it first
        check_resumable(out)
        check_resume_folder(out, data_dir)  # its own checkpoints and logs folders, the data it was trained on
        check_writable(out / CONFIG_FILE, "the run's config")
        check_writable(out / CHECKPOINT_DIR / LAST, "checkpoints")
    else:
        check_train_out(out)  # not a file, not someone's folder: before anything is written into it
    check_before_writing(options, data_dir, ids.num_items)
    with folder_lock(out, LOCK_FILE, what="a training"), SignalGuard(out) as guard:
        ckpt_path = _prepare_run_dir(out, ids, options, resume)
        try:
            return _train(data_dir, ids_path, out, dataset, ids, options, resume, snapshots, extra_callbacks, ckpt_path, start, guard, False)
        except SIGTERMException:  # Lightning's own SIGTERM stop (at an epoch end) would exit 0: an interruption
            guard.received = guard.received or signal.SIGTERM
            raise guard.interrupted() from None


def _train(data_dir: Any, ids_path: Any, out: Path, dataset: Any, ids: SemanticIDs, options: TrainOptions, resume: bool,
           snapshots: Sequence[float], extra_callbacks: Sequence[L.Callback], ckpt_path: Path | None, start: float,
           guard: SignalGuard, is_worker: bool) -> TrainResult:
    best_before = _sha256_if_file(out / CHECKPOINT_DIR / BEST) if resume else None
    L.seed_everything(options.seed, workers=True, verbose=False)

    # 1. data, model, system
    layout = ids.layout(options.user_tokens)
    split = leave_one_out(dataset)
    if split.num_users == 0:  # (it failed deep in the design's setup: "need at least one array to concatenate")
        raise ValueError(f"{dataset.path / 'sequences.txt'}: no user has 3 or more items; leave-one-out holds out each "
                         "user's last item for test and the one before for validation: give users longer sequences")
    digest = ids_digest(ids)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    members = (read_config(out).get("model") or {}).get("members", 1) if resume else None
    config, dm, system, monitor = options.plugin.setup(TrainInputs(options, dataset, split, ids, layout, digest, tree, out, members))
    if resume:
        _check_same_model(out, options, config)
    run_config = {
        "data": str(Path(data_dir).resolve()),
        "data_fingerprint": data_fingerprint(data_dir),  # evaluate refuses other data (folder.check_same_data)
        "ids_source": str(Path(ids_path).resolve()),
        "ids_digest": digest,
        "design": options.design,
        "model": config.to_dict(),
        "layout": layout.to_dict(),
        "train": asdict(options),
        "monitor": monitor,
        "best_checkpoint": None,
    }
    if not is_worker and not resume:  # a resumed run keeps the config.yaml it serves with until the end
        write_config(out, run_config)
    dm.setup("fit")
    padded, targets_per_epoch = dm.padding_share(), dm.num_targets

    # 2. trainer
    ckpt_dir = out / CHECKPOINT_DIR
    checkpoint = RunCheckpoint(  # keeps its best score when the folder was moved before a resume
        dirpath=ckpt_dir, filename=BEST[: -len(".ckpt")], monitor=monitor, mode="max", save_top_k=1, save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,  # always best.ckpt / last.ckpt, also on resume
    )
    diverged = DivergenceStop(f"lower --lr (this run's {options.lr:g}; --warmup-steps {options.warmup_steps}) and train again")
    callbacks: list[Any] = [checkpoint, LearningRateMonitor(logging_interval="step"), StepSeeds(options.seed), diverged, *extra_callbacks]
    # after ModelCheckpoint (both are Checkpoint callbacks, which Lightning runs last, in their order)
    callbacks.append(ResumePoints(ckpt_dir, guard, every_steps=options.resume_every_steps, every_seconds=options.resume_every_seconds))
    cpu_budget = parse_max_time(options.max_cpu_time, "max_cpu_time")
    cpu_limit = None if cpu_budget is None else CpuTimeLimit(cpu_budget.total_seconds())
    if cpu_limit is not None:
        callbacks.append(cpu_limit)
    if options.optim().needs_budget:  # the schedule follows the share of the budget spent
        wall = parse_max_time(options.max_time)
        callbacks.append(BudgetProgress(None if wall is None else wall.total_seconds(), cpu_limit))
    if options.ema:  # every checkpoint then carries the average as its state_dict (the snapshots copy them as they are)
        callbacks.append(WeightEMA(options.ema))
    if snapshots:  # on the clock of the budget
        callbacks.append(BudgetSnapshots(snapshots, ckpt_dir / BEST, time.process_time if cpu_budget else time.perf_counter))
    if patience := effective_patience(options):  # checked after each validation (a step limit ends epochs without one)
        callbacks.append(KeptPatience(monitor=monitor, mode="max", patience=patience, check_on_train_epoch_end=False))
    every = options.val_every
    trainer = L.Trainer(
        default_root_dir=out,
        max_epochs=options.max_epochs if options.max_epochs is not None else -1,
        max_steps=options.max_steps,
        max_time=parse_max_time(options.max_time),
        accelerator=options.accelerator,
        devices=options.devices,
        strategy=options.strategy,
        precision=options.precision,
        logger=CSVLogger(out, name=LOG_DIR, version=None),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # BucketBatchSampler shards itself
        check_val_every_n_epoch=every if isinstance(every, int) else 1,
        val_check_interval=every if isinstance(every, float) else 1.0,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(dm.train_sampler()) // options.devices)),
        enable_progress_bar=options.progress,
        enable_model_summary=False,
        deterministic=False,
    )
    trainer.fit(system, datamodule=dm, ckpt_path=ckpt_path)
    guard.check()  # a signal after the last step

    # 3. the best checkpoint (chosen on validation), named in config.yaml
    best = ckpt_dir / BEST
    selected_on_validation = best.is_file()
    if not selected_on_validation:
        best = ckpt_dir / LAST
        log.warning("no validation ran, so there is no best checkpoint; using %s (not selected on validation)", best.name)
    if trainer.global_step > 0:  # this process ran the loop: its counters are the truth
        # Lightning rewrites last.ckpt only when a checkpoint is saved (the best score improved): make it the end. Every
        # DDP process calls it (a collective: rank 0 writes; a rank that returned first left rank 0 in its barrier)
        trainer.save_checkpoint(ckpt_dir / LAST, weights_only=False)  # a save with the optimiser state; reads use safe_load
        if trainer.global_rank == 0:
            (ckpt_dir / RESUME).unlink(missing_ok=True)  # last.ckpt is the newer point now
    if trainer.global_rank != 0:  # DDP workers stop here; rank 0 writes the files
        return TrainResult(out, best, None, float(trainer.current_epoch), trainer.global_step, time.perf_counter() - start, padded, None)
    # read from the last checkpoint: with ddp_spawn this process's trainer never ran the loop
    score, steps = _final_state(ckpt_dir / LAST)
    epochs = round(steps / max(1, -(-dm.train_sampler().num_batches() // options.devices)), 2)  # steps per process
    run_config["best_checkpoint"] = str(best.relative_to(out))
    run_config["selected_on_validation"] = selected_on_validation
    run_config["best_score"] = {monitor: score}
    run_config["epochs"], run_config["steps"] = epochs, steps
    run_config["train_seconds"] = round(time.perf_counter() - start, 1)
    run_config["padded_share"] = round(padded, 4)
    run_config["targets_per_epoch"] = int(targets_per_epoch)
    run_config["threads"] = options.threads
    write_config(out, run_config)
    digests = {str(best.relative_to(out)): _sha256_if_file(best)} if resume else {}
    changed = resume and digests[str(best.relative_to(out))] != best_before
    if resume:  # metrics of a checkpoint since replaced: the best changed, or the digest recorded is not its file's now
        stale = [p for p in out.glob("metrics_*.json") if (options.final_val_users == 0 or p.name != "metrics_valid.json")
                 and _stale(p, out, digests, changed)]  # (also: a resume killed after a new best)
        stale += [out / HYBRID_FILE] if (out / HYBRID_FILE).exists() and changed else []
        for path in sorted(stale):
            path.unlink()
        if stale:
            log.info("resume: removed %s (they describe the previous best checkpoint)", ", ".join(p.name for p in stale))

    # 4. all validation users, on the best checkpoint
    metrics_valid = None
    if options.final_val_users != 0:
        metrics_valid = evaluate_run(
            out, "valid", num_beams=options.num_beams, max_users=options.final_val_users, seed=options.seed,
            batch_size=options.eval_batch_size, decoder=validated_decoder(options.objective, options.dense, options.decoder),
            progress=options.progress,
        )
    # 5. the hybrid's fusion, chosen on validation users (an explicit step of training, never of evaluation), so
    # `--decoder hybrid` serves straight after training
    fusion = None
    if split.num_users < 2:  # (fitted on some validation users, chosen on others: it failed the finished run)
        log.warning("%s: no fusion chosen: the hybrid needs 2 validation users or more; serve it with --alpha A", out)
    elif options.dense and options.target == "ids" and options.objective == "joint":  # a dense-only run has no hybrid
        run = on_device(load_run(out), "cuda" if torch.cuda.is_available() else None)
        fusion = choose_run_fusion(run, split, num_beams=options.num_beams, batch_size=options.eval_batch_size, seed=options.seed)
    seconds = time.perf_counter() - start
    log.info("trained %s in %.0f s: best %s = %s", out, seconds, monitor, score)
    return TrainResult(out, best, score, epochs, steps, seconds, padded, metrics_valid, fusion, run_config["train_seconds"])


def _final_state(last: Path) -> tuple[float | None, int]:
    """(best val/ndcg@10, optimiser steps) recorded in the last checkpoint."""
    if not last.is_file():
        return None, 0
    ckpt = safe_load(last)
    score = None
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            score = float(state["best_model_score"])
    return score, int(ckpt.get("global_step", 0))

