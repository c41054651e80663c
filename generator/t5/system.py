"""GeneratorSystem: the thin LightningModule around the T5 generator (loss, optimiser, schedule, validation).

Validation is the task itself: constrained beam search over the prefix tree for each validation user, then
Recall@K / NDCG@K of the held-out item, logged as ``val/recall@10``, ``val/ndcg@10`` (and @5). Under DDP every
process decodes its own shard and the hit counts are summed across processes before logging, so the numbers are
exact, not a mean of per-process means.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch

from generator.decoding.protocol import Histories, check_decode_args
from generator.decoding.registry import Ingredients, build, resolve
from generator.models.checkpoint import CHECKPOINT_KEY, checkpoint_meta
from generator.models.dense import META_KEY, DenseHead, DenseHeadConfig
from generator.models.dense_loss import OBJECTIVES, check_log_q, joint_loss, log_popularity
from generator.t5.data import Batch
from generator.t5.decoders import T5
from generator.t5.model import GeneratorConfig, build_model, seq2seq_loss
from generator.training.optim import OptimConfig, adamw_schedule
from semid.data import Dataset
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.split import Split
from semid.tree import PrefixTree

log = logging.getLogger(__name__)


class GeneratorSystem(L.LightningModule):
    """Trains :func:`generator.t5.model.build_model`'s T5; validates by constrained beam search.

    Args:
        config, layout: the model (see ``generator.t5.model``).
        ids_digest: fingerprint of the semantic IDs; stored in every checkpoint next to the config and layout.
        tree: prefix tree of every item's code tokens + eos (validation decoding); not stored in checkpoints.
        optim: optimiser and schedule.
        num_beams: beams for validation decoding; ks: cut-offs to report (the largest is the list length).
        decoder: the T5 decoder validation ranks with, a name of ``generator.decoding.registry`` ("auto", "beam",
            "generate", "dense"; "dense" needs ``dense_head`` and ``ids``).
        dense_head: the dense head on the encoder (``generator.models.dense``), trained by ``objective`` ("generative":
            not at all, "joint": with the generative loss, "dense": alone); ``log_q`` (N,) for its sampled loss.
        ids: the semantic IDs (the dense decoder's item codes).
    """

    def __init__(
        self,
        config: GeneratorConfig,
        layout: TokenLayout,
        ids_digest: str,
        tree: PrefixTree,
        *,
        optim: OptimConfig = OptimConfig(),  # noqa: B008 (frozen)
        num_beams: int = 20,
        ks: Sequence[int] = (5, 10),
        decoder: str = "auto",
        dense_head: DenseHead | None = None,
        objective: str = "generative",
        log_q: torch.Tensor | None = None,
        ids: SemanticIDs | None = None,
    ) -> None:
        super().__init__()
        self.config, self.layout, self.ids_digest, self.optim = config, layout, ids_digest, optim
        self.tree, self.num_beams, self.ks = tree, num_beams, tuple(sorted(ks))
        self.decoder_name = resolve(T5, decoder)  # fail now, not after the first epoch
        if self.decoder_name == "dense" and (dense_head is None or ids is None):
            raise ValueError("validation with decoder 'dense' needs `dense_head` and `ids`")
        num_items = int(((tree.node_value >= 0) & (tree.node_depth == tree.max_depth)).sum())  # one eos leaf per item
        check_decode_args(self.ks[-1], num_beams, num_items)
        self.model = build_model(config, layout)
        self.dense_head, self.objective, self.ids = dense_head, objective, ids
        self._decoder = None
        if log_q is not None and dense_head is not None:
            check_log_q(log_q, dense_head.num_items)  # once here, not in every step
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
        # built for every validation pass (the weights, so the dense item vectors, changed since the last one)
        self._decoder = build(Ingredients(T5, self.model, self.tree, self.layout, self.ids, num_beams=self.num_beams,
                                          dense_head=self.dense_head), self.decoder_name)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        assert self._val_sums is not None, "on_validation_epoch_start did not run"
        B = batch.input_ids.shape[0]
        loss = seq2seq_loss(self.model, batch.input_ids, batch.attention_mask, batch.labels)
        k = self.ks[-1]
        res = self._decoder(Histories(batch.input_ids, batch.attention_mask.bool()), k)
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
        self._val_sums, self._decoder = None, None

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_meta(self.config, self.layout, self.ids_digest)
        if self.dense_head is not None:
            checkpoint[CHECKPOINT_KEY][META_KEY] = self.dense_head.config.to_dict()


# ---- the dense head of a training run ---------------------------------------------------------------------------
class DenseSetup(NamedTuple):
    """What the Lightning system needs for the dense head: the head (None for none), the objective and log q (N,)
    of the training targets (sampled loss only)."""

    head: DenseHead | None
    objective: str
    log_q: torch.Tensor | None


def dense_setup(
    mode: str | None,
    objective: str,
    dataset: Dataset,
    split: Split,
    ids: SemanticIDs,
    input_dim: int,
    *,
    embeddings: str = "minilm",
    options: dict[str, Any] | None = None,
) -> DenseSetup:
    """Build the dense head of a training run.

    Args:
        mode: ``"id"``, ``"content"``, ``"both"``, or None for no head (then ``objective`` must be "generative").
        objective: ``"joint"`` (generative + dense), ``"dense"`` (encoder and head only) or ``"generative"``.
        embeddings: name of the dataset's ``item_emb_<name>.npy`` (content modes); row i is item i + 1.
        options: further :class:`DenseHeadConfig` fields (``dim``, ``pooling``, ``loss``, ``temperature``, ...).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    if mode is None:
        if objective != "generative":
            raise ValueError(f"`objective` {objective!r} needs a dense head: pass `dense` (id, content or both)")
        return DenseSetup(None, objective, None)
    config = DenseHeadConfig(input_dim=input_dim, mode=mode, **(options or {}))
    if int(ids.item_ids.max()) > dataset.num_items:
        raise ValueError(f"the semantic IDs have items above {dataset.num_items}, the dataset's last: no content for them")
    content = None if mode == "id" else torch.from_numpy(dataset.embeddings(embeddings)[ids.item_ids - 1])
    head = DenseHead(config, torch.from_numpy(ids.item_ids), content)
    log_q = None
    if config.loss == "sampled":
        targets = np.concatenate([s[1:] for s in split.train])  # every training example's target
        log_q = log_popularity(head.rows_of(torch.from_numpy(targets)), head.num_items)
    return DenseSetup(head, objective, log_q)
