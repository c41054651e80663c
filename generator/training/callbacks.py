"""Lightning pieces of a training run: checkpoints written atomically, and budget snapshots (the checkpoints a
learning curve reads)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer, WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.optim.swa_utils import AveragedModel

from generator.models.checkpoint import safe_load, with_integrity
from semid.io import atomic_path, write_json


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place, so a crash never leaves half a file; each
    carries its format, version and content digest (``generator.models.checkpoint.with_integrity``), and is read back with
    ``safe_load`` (no code runs; a damaged file is an error naming it), also when Lightning resumes from it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None) -> None:
        if storage_options is not None:  # (as Lightning's own)
            raise TypeError(f"`storage_options` is not supported by {type(self).__name__}, got {storage_options!r}")
        with atomic_path(path) as tmp:  # torch.save straight into the run's folder: Lightning's own save held the
            torch.save(with_integrity(checkpoint), tmp)  # whole file in memory, then wrote it to $TMPDIR and moved it
            # (a kill -9 left a copy there; a full /tmp failed a run whose own disk had room)

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path)


def ema_update(decay: float) -> Callable[..., None]:
    """``AveragedModel``'s ``multi_avg_fn`` for an exponential moving average (torch's ``get_ema_multi_avg_fn`` with a
    warm-up): each update moves the average towards
    the weights by ``1 - d`` in one fused call per dtype, where ``d = min(decay, (1 + n) / (10 + n))`` and ``n`` counts
    the updates before (``AveragedModel``'s first one copies the weights), so the random initial weights do not linger
    in the average of a short run (a 0.999 average is still 37% initialisation after 1,000 steps without it). It
    touches every weight at each step, the tables that ``sparse_tables`` updates row by row included."""
    if not 0 < decay < 1:
        raise ValueError(f"the EMA decay must be in (0, 1), got {decay!r}")

    def update(averaged: list[Any], current: list[Any], num_averaged: Any) -> None:
        n = int(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


class HostCountedEMA(AveragedModel):
    """``AveragedModel`` for :class:`WeightEMA` whose update reads nothing back from the device.

    torch's ``update_parameters`` tests its tensor count on the host twice per update (``n_averaged == 0``,
    ``n_averaged > 0``), and :func:`ema_update` turns it into a Python number: on a GPU, three synchronisations per
    optimiser step. Here the count is also kept on the host (read from the tensor once per process, at the first update
    after a start or a load), the first update copies and the later ones lerp, over parameter lists gathered once; the
    tensor count still advances (on the device) and is what checkpoints store. Same arithmetic as torch's path."""

    def __init__(self, model: torch.nn.Module, device: Any, decay: float) -> None:
        super().__init__(model, device=device, use_buffers=False)
        self._ema = ema_update(decay)
        self._count: int | None = None
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._count = None  # a resume brings another count
        return super().load_state_dict(*args, **kwargs)

    def update_parameters(self, model: torch.nn.Module) -> None:
        if self._count is None:
            self._count = int(self.n_averaged)
        if self._pairs is None:  # in-place updates only (Lightning's swaps copy data), so the lists stay valid
            self._pairs = ([p.detach() for p in self.parameters()], [p.detach() for p in model.parameters()])
        mine, theirs = self._pairs
        if self._count == 0:
            torch._foreach_copy_(mine, [t.to(m.device) for m, t in zip(mine, theirs, strict=True)])
        else:
            self._ema(mine, [t.to(m.device) for m, t in zip(mine, theirs, strict=True)], self._count)
        self.n_averaged.add_(1)
        self._count += 1


class WeightEMA(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimiser step (``--ema DECAY``), on
    Lightning's ``WeightAveraging``: validation scores the average (so the best checkpoint is the best average), and
    every checkpoint's ``state_dict`` is the average, which is what a loaded run serves. The trained weights and the
    average's count ride along (``current_model_state``, ``averaging_state``) and come back on a resume.

    Unlike the base class, training's end leaves the trained weights in place: the final ``last.ckpt`` then still
    resumes exactly (its ``state_dict`` is the average all the same). Buffers are the design's fixed tables, not
    averaged."""

    def __init__(self, decay: float) -> None:
        super().__init__(use_buffers=False, multi_avg_fn=ema_update(decay))
        self.decay = decay

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # the base class's AveragedModel, with an update that does not synchronise (above)
            self._average_model = HostCountedEMA(pl_module, self._device or pl_module.device, self.decay)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class KeptPatience(EarlyStopping):
    """Early stopping whose ``patience`` is the run's option on a resume too: Lightning's restores the checkpoint's
    (``--patience 1000`` on a resume was recorded in config.yaml and ignored: the run stopped at its old patience)."""

    @property
    def state_key(self) -> str:
        """EarlyStopping's own key: checkpoints written before this class keep their early-stopping state."""
        key = super().state_key
        return EarlyStopping.__qualname__ + key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience


class DivergenceStop(L.Callback):
    """Stops a training whose weights became NaN or infinite (a learning rate too high), with an error that says so,
    before a validation decodes with them (a beam search over NaN scores ends outside the tree) or the run's end
    writes anything from them. Checked at each validation and at the end of training: one host synchronisation each,
    none inside a step. ``advice``: what to change, in the command line's words."""

    def __init__(self, advice: str) -> None:
        self.advice = advice

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = list(pl_module.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # (one read back, not one a tensor)
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        if bad:
            raise ValueError(f"training diverged by step {trainer.global_step} (epoch {trainer.current_epoch}): "
                             f"{len(bad)} weight tensors became NaN or infinite (the first: {bad[0]}); {self.advice}")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)


class CpuTimeLimit(L.Callback):
    """Stops training once this process has used ``seconds`` of CPU time in training (``max_cpu_time``).

    A budget in CPU time, unlike wall-clock ``max_time``, buys the same work whatever else runs on the machine (one
    torch thread: CPU seconds are the seconds it would take alone). As Lightning's ``Timer`` for ``max_time``, the
    seconds used are kept in the checkpoint: a resumed run spends what is left of its budget."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"`max_cpu_time` must be positive, got {seconds!r} s")
        self.seconds, self.start, self.before = float(seconds), 0.0, 0.0

    def used(self) -> float:
        """CPU seconds this run has trained, before a resume included."""
        return self.before + time.process_time() - self.start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.used() >= self.seconds:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"used_s": self.used()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("used_s", 0.0))


class BudgetProgress(L.Callback):
    """Sets ``pl_module.budget_progress``, the share of the run's budget spent (0..1), at every optimiser step, for
    a schedule that follows it (``OptimConfig.needs_budget``: "cosine", a cooldown). The budget that ends first
    counts: ``max_steps``, ``max_epochs`` (in steps), ``max_time`` (Lightning's ``Timer``, which keeps its time across
    a resume) or ``max_cpu_time`` (:class:`CpuTimeLimit`, likewise)."""

    def __init__(self, max_seconds: float | None = None, cpu_limit: CpuTimeLimit | None = None) -> None:
        self.max_seconds, self.cpu_limit = max_seconds, cpu_limit

    def progress(self, trainer: L.Trainer, steps: int) -> float:
        """The share of the budget spent after ``steps`` optimiser steps and the time used so far."""
        shares = [0.0]
        if trainer.max_steps and trainer.max_steps > 0:
            shares.append(steps / trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and 0 < batches < float("inf"):
            shares.append(steps / (trainer.max_epochs * batches))
        if self.max_seconds:
            timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
            if timer is not None:
                shares.append(timer.time_elapsed("train") / self.max_seconds)
        if self.cpu_limit is not None:
            shares.append(self.cpu_limit.used() / self.cpu_limit.seconds)
        return min(max(shares), 1.0)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # the schedule sets the next step's rate right after this step: the share spent once this step is done
        pl_module.budget_progress = self.progress(trainer, trainer.global_step + 1)


class BudgetSnapshots(L.Callback):
    """Copies the best checkpoint so far (``best``) to ``best_<M>min.ckpt`` beside it once training has run M minutes on
    ``clock`` (wall clock by default; ``time.process_time`` for CPU-time budgets), and at the end for budgets not
    reached, with the best validation score and step in ``snapshots.json``."""

    def __init__(self, minutes: Sequence[float], best: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.minutes = sorted(float(m) for m in minutes)
        if not self.minutes or self.minutes[0] <= 0:
            raise ValueError(f"`snapshots` must be positive minutes, got {list(minutes)!r}")
        self.best, self.ckpt_dir, self.start, self.done, self.clock = Path(best), Path(best).parent, 0.0, {}, clock

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.clock()

    def _take(self, trainer: L.Trainer, minutes: float, reached: bool) -> None:
        best = self.best
        if trainer.global_rank != 0 or not best.is_file():
            return
        name = f"best_{minutes:g}min.ckpt"
        with atomic_path(self.ckpt_dir / name) as tmp:
            shutil.copyfile(best, tmp)
        cb = trainer.checkpoint_callback
        score = None if cb is None or cb.best_model_score is None else float(cb.best_model_score)
        self.done[f"{minutes:g}"] = {"checkpoint": name, "best_score": score, "reached": reached,
                                     "elapsed_s": round(self.clock() - self.start, 1), "step": trainer.global_step}
        write_json(self.ckpt_dir / "snapshots.json", self.done)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        elapsed = (self.clock() - self.start) / 60
        while self.minutes and elapsed >= self.minutes[0]:
            self._take(trainer, self.minutes.pop(0), True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        while self.minutes:  # budgets longer than the run: its final best
            self._take(trainer, self.minutes.pop(0), False)
