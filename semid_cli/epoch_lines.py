"""The callback behind ``semid train``'s one line per epoch (``console.epoch_lines``), in a module of its own: it
imports lightning, which the command line reads only when it trains, and a class at module level can be pickled
(``--strategy ddp_spawn`` sends the callbacks to its processes: a class made inside a function failed there)."""

from __future__ import annotations

import logging
import time

import lightning as L


class EpochLines(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        shown = {k: v for k, v in trainer.callback_metrics.items() if k == "train/loss" or k.endswith("/ndcg@10")}
        values = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(shown.items()))
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        logging.getLogger("semid.progress").info("epoch %d%s  step %d  %s  (%.0f s)", trainer.current_epoch + 1, total,
                                                 trainer.global_step, values, time.perf_counter() - self.start)
