"""Exact resume: a training interrupted at any point (SIGINT, SIGTERM, ``kill -9``) and resumed ends with the same
weights and metrics as one that ran through.

What an interrupted run needs to continue exactly, and where each piece lives:

- weights, optimiser, schedule, loop counters, callback states (best score, early stopping): Lightning's checkpoint;
- where in the epoch it was: :class:`ResumableLoader`, a DataLoader whose ``state_dict`` is the number of batches it
  served this epoch (Lightning stores it with the loops) and which skips that many batch *indices* (nothing is
  collated) on the first epoch after a resume. The batch order itself is a function of (seed, epoch): the samplers
  draw from a generator seeded with both (``generator.training.sampling.EpochPermutation``);
- random numbers (dropout, sampled negatives): :class:`StepSeeds` seeds torch, numpy and ``random`` from
  (seed, global step) before every training step, so the stream of step t is the same whatever ran before it
  (validation, a DataLoader iterator, a resume): there is no RNG state to carry at all;
- a recent point to resume from: :class:`ResumePoints` writes ``checkpoints/resume.ckpt`` every N steps or T
  seconds and after every validation, and, when a SIGINT or SIGTERM arrives, at the end of the step under way
  (:class:`SignalGuard`), before the training stops with :class:`TrainingInterrupted`.

A resume point is never written at the end of a step that a validation follows: Lightning treats a checkpoint
taken there as if that validation had run. The one written after the validation (after ``ModelCheckpoint``) covers
it.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from generator.models.checkpoint import RESUME
from semid.safe_read import is_int

log = logging.getLogger(__name__)



class TrainingInterrupted(BaseException):
    """Training stopped on a signal; the run folder holds a point to resume from (``semid train --resume``).

    A BaseException, as KeyboardInterrupt is: raised wherever the program was, it must not be taken for an error of
    the code it interrupted (``except Exception`` clauses, e.g. the damaged-file checks, let it through)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# ---- where in the epoch --------------------------------------------------------------------------------------------
class _SkipFirst(Sampler[list[int]]):
    """``inner``'s batches, less the first ``skip`` of the next iteration. ``sampler`` is ``inner``'s, so
    Lightning's ``set_epoch`` reaches it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.skip = inner, 0
        self.sampler = getattr(inner, "sampler", None)

    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.inner):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.inner)


class ResumableLoader(DataLoader):
    """A training DataLoader over a batch sampler that Lightning can stop and restart mid-epoch.

    ``state_dict()`` -> ``{"epoch", "served"}``: the batches it has handed out this epoch (with a sized loader
    Lightning fetches none ahead, so that is the number trained). ``load_state_dict`` makes the next iteration skip
    them, if it is over the same epoch; the skipped batches' indices are drawn but nothing is collated. Iteration
    starts (and worker processes get their first indices) at the first ``next``, after Lightning has set the
    epoch. Takes DataLoader's arguments, with ``batch_sampler`` required.
    """

    def __init__(self, dataset: Any, *, batch_sampler: Any, **kwargs: Any) -> None:
        if batch_sampler is None:
            raise ValueError("`batch_sampler` must be given to a ResumableLoader, got None")
        super().__init__(dataset, batch_sampler=_SkipFirst(batch_sampler), **kwargs)
        self._served = 0
        self._pending: tuple[int, int] | None = None  # (epoch, batches served) of the state loaded

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        epoch, skip = self.batch_sampler.epoch(), 0
        if self._pending is not None:
            skip = self._pending[1] if self._pending[0] == epoch else 0
            self._pending = None
        self.batch_sampler.skip = self._served = skip
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch(), "served": int(self._served)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, served = state.get("epoch"), state.get("served")
        if not isinstance(epoch, int) or not isinstance(served, int) or served < 0:
            raise ValueError(f"a training loader state must hold int `epoch` and `served` >= 0, got {state!r}")
        self._pending = (epoch, served)


# ---- random numbers --------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int) -> int:
    """The seed of optimiser step ``step`` of a run seeded ``seed`` (a 63-bit mix of both)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


class StepSeeds(L.Callback):
    """Seeds torch (every device), numpy and ``random`` from (seed, global step) before every training step."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        s = step_seed(self.seed, trainer.global_step)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)  # noqa: NPY002 (the legacy global RNG is what np.random.* callers draw from)
        random.seed(s)


# ---- signals -------------------------------------------------------------------------------------------------------
class SignalGuard:
    """SIGINT and SIGTERM handlers for a training: while ``deferring`` (inside training steps, where stopping at once
    would lose the step), a signal is noted and :class:`ResumePoints` stops at the end of the step; anywhere else, or
    on a second signal, :class:`TrainingInterrupted` is raised where the program is. Restores the previous handlers on
    exit. Does nothing outside the main thread (signal handlers can only be set there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, out: Path) -> None:
        self.out, self.received, self.deferring = out, None, False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        if self.deferring and first:
            log.warning("%s: stopping at the end of this step", signal.Signals(signum).name)
            return
        raise self.interrupted()

    def interrupted(self) -> TrainingInterrupted:
        name = signal.Signals(self.received or signal.SIGTERM).name
        return TrainingInterrupted(
            self.received or signal.SIGTERM,
            f"{self.out}: training stopped by {name}; the run can be continued exactly where it stopped with "
            "`semid train ... --resume` (same --out)",
        )

    def check(self) -> None:
        """Raise :class:`TrainingInterrupted` if a signal arrived."""
        if self.received is not None:
            raise self.interrupted()


# ---- resume points -------------------------------------------------------------------------------------------------
def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning will validate after the training step that just ended (its own rule)."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


class ResumePoints(Checkpoint):
    """Writes ``ckpt_dir/resume.ckpt`` (atomically, through the trainer's checkpoint IO) every ``every_steps``
    optimiser steps or ``every_seconds`` seconds (0 disables either), after every validation, and at the end of
    the step under way when a signal arrives (then stops with :class:`TrainingInterrupted`).

    A subclass of ``Checkpoint``, so Lightning runs it after ``ModelCheckpoint``, whose new best score the point
    written after a validation must hold. Its state records a stop decided by early stopping, so that a run resumed
    from a point after that decision stops there too.
    """

    def __init__(self, ckpt_dir: Path, guard: SignalGuard, *, every_steps: int = 0, every_seconds: float = 60.0) -> None:
        if not is_int(every_steps) or every_steps < 0:
            raise ValueError(f"`resume_every_steps` must be a non-negative int, got {every_steps!r}")
        if not isinstance(every_seconds, (int, float)) or isinstance(every_seconds, bool) or not every_seconds >= 0:
            raise ValueError(f"`resume_every_seconds` must be a non-negative number, got {every_seconds!r}")
        self.path, self.guard = Path(ckpt_dir) / RESUME, guard
        self.every_steps, self.every_seconds = int(every_steps), float(every_seconds)
        self._last_step, self._last_time = -1, 0.0
        self._stop_on_start = False

    # state kept in every checkpoint
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        early = trainer is not None and trainer.should_stop and any(
            isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience for cb in trainer.callbacks
        )
        return {"early_stopped": bool(early)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stop_on_start = bool(state.get("early_stopped", False))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step, self._last_time = trainer.global_step, time.monotonic()
        if self._stop_on_start:  # resumed after early stopping had decided to stop
            trainer.should_stop = True
        self.guard.deferring = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.guard.deferring = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.guard.deferring = False

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # a write (with the optimiser); reads use safe_load
        self._last_step, self._last_time = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        stopping = self.guard.received is not None
        due = (self.every_steps and trainer.global_step - self._last_step >= self.every_steps) or (
            self.every_seconds and time.monotonic() - self._last_time >= self.every_seconds
        )
        if trainer.world_size > 1:  # every process must take the same decision: saving is collective
            stopping, due = trainer.strategy.broadcast((stopping, bool(due)), src=0)
        if (stopping or due) and trainer.global_step != self._last_step and not _validation_follows(trainer):
            self._save(trainer)
        if stopping:
            self.guard.received = self.guard.received or signal.SIGTERM
            raise self.guard.interrupted()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.state.fn == "fit":
            self.guard.check()  # a validation is redone from the last point: stop at once

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._save(trainer)
        self.guard.check()


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps its best score when the run folder was moved or copied before a resume.

    Lightning restores the best score, its path and the last path only when the stored ``dirpath`` equals the new
    one; otherwise it warns and starts the comparison afresh, so a copied folder's resumed run would pick its best
    checkpoint among the epochs after the resume alone and could overwrite a better ``best.ckpt`` with a worse one.
    A run's checkpoints always live in its own ``checkpoints/`` folder under fixed names, so the stored paths are
    moved to this folder (their names kept) and restored as Lightning restores a folder that did not move.
    """

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's own key, so checkpoints written before this class resume into it and readers find it."""
        key = super().state_key
        return ModelCheckpoint.__qualname__ + key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old is None or new is None or old == new:
            return super().load_state_dict(state_dict)

        def moved(path: Any) -> Any:
            p = Path(path) if isinstance(path, str) and path else None
            return str(Path(new) / p.name) if p is not None and str(p.parent) == str(old) else path

        state = dict(state_dict, dirpath=new)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if key in state:
                state[key] = moved(state[key])
        if "best_k_models" in state:
            state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
        return super().load_state_dict(state)
