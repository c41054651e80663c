"""Train a generator into a run folder (see ``generator.run``): data -> examples -> Lightning fit -> best checkpoint.

    result = train_run("../shared/data/beauty", "ids/semantic_ids.npz", "runs/tiger", TrainOptions(preset="cpu"))

The best checkpoint is chosen on ``val/ndcg@10`` over a fixed sample of validation users; after training, the best
checkpoint is evaluated on all validation users (``RUN/metrics_valid.json``). Test users are never looked at here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from generator.datamodule import GeneratorDataModule
from generator.evaluate import evaluate_run
from generator.hybrid import ALPHA_FILE, dense_setup
from generator.model import ids_digest, preset
from generator.run import BEST, CHECKPOINT_DIR, IDS_FILE, LAST, LOG_DIR, read_config, write_config
from generator.system import GeneratorSystem, OptimConfig
from semid.data import leave_one_out, load_dataset
from semid.ids import SemanticIDs
from semid.io import atomic_path
from semid.tree import PrefixTree

log = logging.getLogger(__name__)

MONITOR = "val/ndcg@10"
# options that change what is trained: a resumed run must keep them
# (val_users, num_beams and decoder define the validation score that selects best.ckpt: changing them mid-run
# would compare checkpoints scored differently)
_FIXED_ON_RESUME = (
    "preset", "user_tokens", "max_history", "batch_size", "seed", "dense", "dense_options", "val_users", "num_beams", "decoder",
)


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``semid train`` takes. ``max_time`` is "HH:MM:SS" (or "DD:HH:MM:SS")."""

    preset: str = "tiger"
    max_epochs: int | None = 50
    max_steps: int = -1
    max_time: str | None = None
    seed: int = 0
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 500
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_history: int = 20
    user_tokens: int = 2000  # hashed user-id buckets (TIGER); 0 for none
    val_users: int | None = 1000  # validation users sampled for validation during training; None for all
    val_every: int | float = 1.0  # validate every N epochs (int) or fraction of an epoch (float < 1)
    final_val_users: int | None = None  # validation users for the final evaluation of the best checkpoint; 0 skips it
    num_beams: int = 20
    decoder: str = "auto"
    patience: int = 5  # validations without improvement before early stopping; 0 disables it
    eval_batch_size: int = 128
    num_workers: int = 0
    progress: bool = True
    # the dense head (generator.dense): None for none, else its item vectors' mode "id" | "content" | "both"
    dense: str | None = None
    objective: str = "joint"  # with a head: "joint" (generative + dense) or "dense" (encoder and head only)
    dense_embeddings: str = "minilm"  # the dataset's item_emb_<name>.npy for content vectors
    dense_options: dict[str, Any] | None = None  # more DenseHeadConfig fields: dim, pooling, loss, temperature, ...

    def __post_init__(self) -> None:
        preset(self.preset)  # validates the name
        for name in ("batch_size", "num_beams", "devices", "eval_batch_size", "max_history"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int) or self.max_epochs < 1):
            raise ValueError(f"`max_epochs` must be a positive int or None, got {self.max_epochs!r}")
        if not isinstance(self.user_tokens, int) or self.user_tokens < 0:
            raise ValueError(f"`user_tokens` must be a non-negative int, got {self.user_tokens!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"`patience` must be a non-negative int, got {self.patience!r}")
        if isinstance(self.val_every, float) and not 0 < self.val_every <= 1:
            raise ValueError(f"`val_every` must be an int number of epochs or a fraction in (0, 1], got {self.val_every!r}")
        parse_max_time(self.max_time)

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, label_smoothing=self.label_smoothing)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:  # a typo or an option of another version would otherwise be dropped silently
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**d)


def parse_max_time(text: str | None) -> timedelta | None:
    """"HH:MM:SS" or "DD:HH:MM:SS" -> timedelta."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (3, 4) or any(n < 0 for n in nums):
        raise ValueError(f"`max_time` must be HH:MM:SS or DD:HH:MM:SS, got {text!r}")
    d, h, m, s = ([0] * (4 - len(nums))) + nums
    if m >= 60 or s >= 60:
        raise ValueError(f"`max_time` must be HH:MM:SS or DD:HH:MM:SS, got {text!r}")
    return timedelta(days=d, hours=h, minutes=m, seconds=s)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place, so a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class TrainResult(NamedTuple):
    run_dir: Path
    best_checkpoint: Path
    best_score: float | None  # val/ndcg@10 of the best checkpoint on the validation sample
    epochs: float  # optimiser steps / steps per epoch (per process)
    steps: int
    seconds: float
    padded_share: float
    metrics_valid: dict[str, Any] | None  # the final evaluation on all validation users (None if skipped)


def _prepare_run_dir(out: Path, ids: SemanticIDs, options: TrainOptions, resume: bool) -> Path | None:
    """Create or check the run folder; return the checkpoint to resume from (or None)."""
    last = out / CHECKPOINT_DIR / LAST
    if not resume:
        if (out / "config.yaml").exists() or (out / CHECKPOINT_DIR).exists():
            raise FileExistsError(f"{out}: already holds a run; pass `resume` to continue it, or choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        ids.save(out / IDS_FILE)
        return None
    stored = read_config(out)
    if stored.get("ids_digest") != ids_digest(ids):
        raise ValueError(f"{out}: this run was trained with other semantic IDs than the ones given; resume with its own {IDS_FILE}")
    old = stored.get("train", {})
    changed = [k for k in _FIXED_ON_RESUME if k in old and old[k] != getattr(options, k)]
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {getattr(options, k)!r}" for k in changed)
        raise ValueError(f"{out}: a resumed run must keep {list(_FIXED_ON_RESUME)}; changed {diffs}")
    if not last.is_file():
        raise FileNotFoundError(f"{last}: nothing to resume from")
    # they describe the checkpoint being continued, not the one this resumed training will select
    stale = sorted([*out.glob("metrics_*.json"), *([out / ALPHA_FILE] if (out / ALPHA_FILE).exists() else [])])
    for path in stale:
        path.unlink()
    if stale:
        log.info("resume: removed %s (they describe the previous checkpoint)", ", ".join(p.name for p in stale))
    return last


def train_run(
    data_dir: str | os.PathLike[str],
    ids_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: TrainOptions = TrainOptions(),
    *,
    resume: bool = False,
) -> TrainResult:
    """Train a generator on a dataset folder with the given semantic IDs; write the run folder ``out_dir``.

    Args:
        resume: continue the run in ``out_dir`` from its last checkpoint (same IDs and fixed options).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    dataset = load_dataset(data_dir)
    ids = SemanticIDs.load(ids_path)
    if ids.num_items < dataset.num_items or int(ids.item_ids.max()) < dataset.num_items:
        raise ValueError(f"{ids_path}: semantic IDs for {ids.num_items} items, but {data_dir} has {dataset.num_items}")
    # DDP worker processes (re-launched scripts) find the folder made by rank 0 and write nothing
    is_worker = rank_zero_only.rank != 0
    ckpt_path = _prepare_run_dir(out, ids, options, resume) if not is_worker else (out / CHECKPOINT_DIR / LAST if resume else None)
    L.seed_everything(options.seed, workers=True, verbose=False)

    # 1. data, model, system
    layout = ids.layout(options.user_tokens)
    split = leave_one_out(dataset)
    digest = ids_digest(ids)
    config = preset(options.preset)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    dm = GeneratorDataModule(
        split, ids, layout, batch_size=options.batch_size, eval_batch_size=options.eval_batch_size,
        max_history=options.max_history, val_users=options.val_users, seed=options.seed, num_workers=options.num_workers,
    )
    dense = dense_setup(
        options.dense, options.objective if options.dense else "generative", dataset, split, ids, config.d_model,
        embeddings=options.dense_embeddings, options=options.dense_options,
    )
    system = GeneratorSystem(
        config, layout, digest, tree, optim=options.optim(), num_beams=options.num_beams, decoder=options.decoder,
        dense_head=dense.head, objective=dense.objective, log_q=dense.log_q, val_decoder=dense.val_decoder,
    )
    run_config = {
        "data": str(Path(data_dir).resolve()),
        "ids_source": str(Path(ids_path).resolve()),
        "ids_digest": digest,
        "model": config.to_dict(),
        "layout": layout.to_dict(),
        "train": asdict(options),
        "best_checkpoint": None,
    }
    if not is_worker:
        write_config(out, run_config)
    dm.setup("fit")
    padded = dm.padding_stats().padded_share

    # 2. trainer
    ckpt_dir = out / CHECKPOINT_DIR
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename=BEST[: -len(".ckpt")], monitor=MONITOR, mode="max", save_top_k=1, save_last=True,
        auto_insert_metric_name=False, enable_version_counter=False,  # always best.ckpt / last.ckpt, also on resume
    )
    callbacks: list[Any] = [checkpoint, LearningRateMonitor(logging_interval="step")]
    if options.patience:
        # checked after each validation (not at epoch end, which a step limit can reach without one)
        callbacks.append(EarlyStopping(monitor=MONITOR, mode="max", patience=options.patience, check_on_train_epoch_end=False))
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

    # 3. the best checkpoint (chosen on validation), named in config.yaml
    best = ckpt_dir / BEST
    selected_on_validation = best.is_file()
    if not selected_on_validation:
        best = ckpt_dir / LAST
        log.warning("no validation ran, so there is no best checkpoint; using %s (not selected on validation)", best.name)
    if trainer.global_rank != 0:  # DDP workers stop here; rank 0 writes the files
        return TrainResult(out, best, None, float(trainer.current_epoch), trainer.global_step, time.perf_counter() - start, padded, None)
    # read from the last checkpoint: with ddp_spawn this process's trainer never ran the loop
    score, steps = _final_state(ckpt_dir / LAST)
    epochs = round(steps / max(1, -(-dm.train_sampler().num_batches() // options.devices)), 2)  # steps per process
    run_config["best_checkpoint"] = str(best.relative_to(out))
    run_config["selected_on_validation"] = selected_on_validation
    run_config["best_score"] = {MONITOR: score}
    run_config["epochs"], run_config["steps"] = epochs, steps
    run_config["train_seconds"] = round(time.perf_counter() - start, 1)
    run_config["padded_share"] = round(padded, 4)
    write_config(out, run_config)

    # 4. all validation users, on the best checkpoint
    metrics_valid = None
    if options.final_val_users != 0:
        metrics_valid = evaluate_run(
            out, "valid", num_beams=options.num_beams, max_users=options.final_val_users, seed=options.seed,
            batch_size=options.eval_batch_size, decoder="dense" if dense.objective == "dense" else options.decoder,
            progress=options.progress,
        )
    seconds = time.perf_counter() - start
    log.info("trained %s in %.0f s: best %s = %s", out, seconds, MONITOR, score)
    return TrainResult(out, best, score, epochs, steps, seconds, padded, metrics_valid)


def _final_state(last: Path) -> tuple[float | None, int]:
    """(best val/ndcg@10, optimiser steps) recorded in the last checkpoint."""
    if not last.is_file():
        return None, 0
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    score = None
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
            score = float(state["best_model_score"])
    return score, int(ckpt.get("global_step", 0))

