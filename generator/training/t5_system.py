"""GeneratorSystem: the thin LightningModule around the T5 generator (loss, optimiser, schedule, validation).

Validation is the task itself: constrained beam search over the prefix tree for each validation user, then
Recall@K / NDCG@K of the held-out item, logged as ``val/recall@10``, ``val/ndcg@10`` (and @5). Under DDP every
process decodes its own shard and the hit counts are summed across processes before logging, so the numbers are
exact, not a mean of per-process means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch

from generator.decoding.t5_generate import check_beam_args, get_decoder
from generator.models.dense import META_KEY, DenseHead, joint_loss
from generator.models.t5 import CHECKPOINT_KEY, GeneratorConfig, build_model, checkpoint_meta, seq2seq_loss
from generator.training.examples import Batch
from semid.layout import TokenLayout
from semid.tree import PrefixTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to ``lr`` over ``warmup_steps``, then inverse-square-root decay (TIGER, T5)."""

    lr: float = 2e-3
    warmup_steps: int = 500
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be a non-negative int, got {self.warmup_steps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing!r}")


def lr_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warmup, then sqrt(warmup / step)."""
    step = step + 1
    if warmup_steps == 0:
        return 1.0
    return step / warmup_steps if step < warmup_steps else math.sqrt(warmup_steps / step)


def adamw_schedule(module: torch.nn.Module, optim: OptimConfig) -> dict[str, Any]:
    """Lightning's optimiser config: AdamW (matrices decayed, vectors and layer-norm scales not) with
    :func:`lr_factor`'s warmup and inverse-sqrt decay, stepped every optimiser step."""
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    warmup = optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GeneratorSystem(L.LightningModule):
    """Trains :func:`generator.models.t5.build_model`'s T5; validates by constrained beam search.

    Args:
        config, layout: the model (see ``generator.models.t5``).
        ids_digest: fingerprint of the semantic IDs; stored in every checkpoint next to the config and layout.
        tree: prefix tree of every item's code tokens + eos (validation decoding); not stored in checkpoints.
        optim: optimiser and schedule.
        num_beams: beams for validation decoding; ks: cut-offs to report (the largest is the list length).
        decoder: "auto" | "beam" | "generate" (see ``generator.decoding.t5_generate.get_decoder``).
        dense_head: the dense head on the encoder (``generator.models.dense``), trained by ``objective`` ("generative":
            not at all, "joint": with the generative loss, "dense": alone); ``log_q`` (N,) for its sampled loss.
        val_decoder: a decoder to validate with instead of ``decoder`` (the dense one when only it is trained).
    """

    def __init__(
        self,
        config: GeneratorConfig,
        layout: TokenLayout,
        ids_digest: str,
        tree: PrefixTree,
        *,
        optim: OptimConfig = OptimConfig(),
        num_beams: int = 20,
        ks: Sequence[int] = (5, 10),
        decoder: str = "auto",
        dense_head: DenseHead | None = None,
        objective: str = "generative",
        log_q: torch.Tensor | None = None,
        val_decoder: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.config, self.layout, self.ids_digest, self.optim = config, layout, ids_digest, optim
        self.tree, self.num_beams, self.ks = tree, num_beams, tuple(sorted(ks))
        self.decoder_name = decoder
        get_decoder(decoder)  # fail now, not after the first epoch
        num_items = int(((tree.node_value >= 0) & (tree.node_depth == tree.max_depth)).sum())  # one eos leaf per item
        check_beam_args(self.ks[-1], num_beams, num_items)
        self.model = build_model(config, layout)
        self.dense_head, self.objective, self.val_decoder = dense_head, objective, val_decoder
        self.register_buffer("log_q", log_q, persistent=False)
        self.save_hyperparameters(
            {"model": config.to_dict(), "layout": layout.to_dict(), "optim": asdict(optim), "num_beams": num_beams,
             "ks": list(self.ks), "decoder": decoder, "ids_digest": ids_digest, "objective": objective,
             "dense": dense_head.config.to_dict() if dense_head is not None else None}
        )
        self._val_sums: torch.Tensor | None = None

    # ---- training ------------------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.dense_head is not None and self.objective != "generative":
            parts = joint_loss(
                self.model, self.dense_head, batch.input_ids, batch.attention_mask, batch.labels,
                self.dense_head.rows_of(batch.target), objective=self.objective,
                label_smoothing=self.optim.label_smoothing, log_q=self.log_q,
            )
            B = batch.input_ids.shape[0]
            self.log_dict({"train/gen_loss": parts.generative, "train/dense_loss": parts.dense}, batch_size=B)
            self.log("train/loss", parts.total, prog_bar=True, batch_size=B)
            return parts.total
        loss = seq2seq_loss(self.model, batch.input_ids, batch.attention_mask, batch.labels, label_smoothing=self.optim.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.input_ids.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_schedule(self, self.optim)

    # ---- validation ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # [sum recall@k for k in ks] + [sum ndcg@k for k in ks] + [users, loss sum]
        self._val_sums = torch.zeros(2 * len(self.ks) + 2, dtype=torch.float64, device=self.device)
        if self.tree.device != self.device:
            self.tree = self.tree.to(self.device)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        assert self._val_sums is not None, "on_validation_epoch_start did not run"
        B = batch.input_ids.shape[0]
        loss = seq2seq_loss(self.model, batch.input_ids, batch.attention_mask, batch.labels)
        decode = self.val_decoder if self.val_decoder is not None else get_decoder(self.decoder_name)
        k = self.ks[-1]
        res = decode(self.model, batch.input_ids, batch.attention_mask, self.tree, self.layout, k=k, num_beams=self.num_beams)
        hit = res.items == batch.target[:, None]  # (B, k)
        rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full((B,), k, device=hit.device))  # (B,), k = miss
        gain = 1.0 / torch.log2(rank.double() + 2.0)
        for i, kk in enumerate(self.ks):
            self._val_sums[i] += (rank < kk).sum()
            self._val_sums[len(self.ks) + i] += torch.where(rank < kk, gain, 0.0).sum()
        self._val_sums[-2] += B
        self._val_sums[-1] += loss.double() * B

    def on_validation_epoch_end(self) -> None:
        assert self._val_sums is not None, "on_validation_epoch_start did not run"
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # exact totals across processes
        # every process now holds the same totals; sync_dist=True below averages equal values (a no-op)
        users = sums[-2].clamp_min(1)
        for i, k in enumerate(self.ks):
            self.log(f"val/recall@{k}", (sums[i] / users).float(), sync_dist=True)
            self.log(f"val/ndcg@{k}", (sums[len(self.ks) + i] / users).float(), sync_dist=True, prog_bar=k == 10)
        self.log("val/loss", (sums[-1] / users).float(), sync_dist=True)
        self.log("val/users", sums[-2].float(), sync_dist=True)
        self._val_sums = None

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_meta(self.config, self.layout, self.ids_digest)
        if self.dense_head is not None:
            checkpoint[CHECKPOINT_KEY][META_KEY] = self.dense_head.config.to_dict()
