"""CausalSystem: the LightningModule of the causal generator (joint loss, schedule, per-decoder validation).

One training step runs the backbone once over a batch of user windows and trains every real position: the code
head's tree-normalised log-likelihood of the next item (``objective`` "generative" or "joint") and the dense head's
full or sampled softmax over the catalogue ("joint" or "dense"; ``CausalConfig.dense_loss``).

Validation decodes a seeded sample of validation users with each decoder that the run can serve with and logs
``val/<decoder>/recall@K`` and ``val/<decoder>/ndcg@K``; the run keeps the checkpoint that is best for the decoder it
serves with (``serve``). Under DDP the hit sums are added across processes before logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import lightning as L
import torch

from generator.decoding.causal import item_paths
from generator.decoding.registry import CAUSAL, Ingredients, build_many
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.causal_loss import (
    child_counts,
    code_loss,
    dense_logits,
    dense_loss,
    history_columns,
    pair_counts,
)
from generator.models.checkpoint import CHECKPOINT_KEY
from generator.models.dense_loss import ColumnMask, check_log_q
from generator.models.ensemble import build_causal, member_models
from generator.training.causal_data import SeqBatch
from generator.training.optim import OptimConfig, adamw_schedule
from semid.layout import TokenLayout
from semid.tree import PrefixTree

OBJECTIVES = ("joint", "generative", "dense")


class StepBatch(NamedTuple):
    """A training batch with what the step would otherwise read back from the device, worked out on the host before
    the transfer (:meth:`CausalSystem.on_before_batch_transfer`): ``real`` LongTensor (P,) the flat indices of the
    positions with a target, and ``pairs`` the code loss's (position, child) pairs per level."""

    batch: SeqBatch
    real: torch.Tensor
    pairs: tuple[int, ...]


def monitor_name(decoder: str) -> str:
    return f"val/{decoder}/ndcg@10"


class RankSums:
    """Validation Recall@k and NDCG@k of item-level rankings, per decoder: sums kept on the device, reduced across
    processes and logged as ``val/<decoder>/recall@k`` and ``val/<decoder>/ndcg@k`` at the end (``serve``'s NDCG@10
    on the progress bar). Shared by the item-level systems (causal, title)."""

    def __init__(self, names: Sequence[str], ks: tuple[int, ...], device: torch.device) -> None:
        self.ks = ks
        self.sums = {name: torch.zeros(2 * len(ks) + 1, dtype=torch.float64, device=device) for name in names}

    def add(self, name: str, items: torch.Tensor, targets: torch.Tensor) -> None:
        """items: LongTensor (B, k) best first; targets: LongTensor (B,) the held-out items."""
        k, sums = self.ks[-1], self.sums[name]
        hit = items == targets[:, None]
        rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(targets, k))
        gain = 1.0 / torch.log2(rank.double() + 2.0)
        for i, kk in enumerate(self.ks):
            sums[i] += (rank < kk).sum()
            sums[len(self.ks) + i] += torch.where(rank < kk, gain, 0.0).sum()
        sums[-1] += targets.numel()

    def log(self, module: L.LightningModule, serve: str) -> None:
        for name, local in self.sums.items():
            sums = module.trainer.strategy.reduce(local, reduce_op="sum")
            users = sums[-1].clamp_min(1)
            for i, k in enumerate(self.ks):
                module.log(f"val/{name}/recall@{k}", (sums[i] / users).float(), sync_dist=True)
                module.log(f"val/{name}/ndcg@{k}", (sums[len(self.ks) + i] / users).float(), sync_dist=True,
                           prog_bar=k == 10 and name == serve)


class CausalSystem(L.LightningModule):
    """Args:
        config, layout, item_tokens, content: the model (``generator.models.causal``).
        item_ids: LongTensor (N,) the item id of each row; ids_digest: fingerprint stored in checkpoints.
        tree: the prefix tree of every item's code tokens + eos (validation decoding; not stored).
        objective: "joint" | "generative" | "dense"; serve: the decoder whose validation score selects checkpoints.
        dense_weight: weight of the dense loss in "joint".
        log_q: FloatTensor (N,), the training targets' log popularity: the sampled dense loss's log-Q correction and
            popularity negatives (needed with ``config.dense_loss`` "sampled" unless neither is used).
    """

    def __init__(
        self, config: CausalConfig, layout: TokenLayout, item_tokens: torch.Tensor, item_ids: torch.Tensor, ids_digest: str,
        tree: PrefixTree, *, content: torch.Tensor | None = None, optim: OptimConfig = OptimConfig(), objective: str = "joint",  # noqa: B008 (frozen)
        serve: str = "beam", num_beams: int = 20, ks: Sequence[int] = (5, 10), dense_weight: float = 1.0,
        log_q: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
        if config.distill and objective != "joint":
            raise ValueError(f"`distill` trains the code head on the dense head's softmax: `objective` must be 'joint', got {objective!r}")
        if objective != "generative" and not config.dense_dim:
            raise ValueError(f"`objective` {objective!r} needs a dense head (dense_dim > 0)")
        self.config, self.layout, self.ids_digest, self.optim = config, layout, ids_digest, optim
        self.objective, self.serve, self.ks, self.dense_weight = objective, serve, tuple(sorted(ks)), dense_weight
        self.model = build_causal(config, layout, item_tokens, content)  # an ensemble with `members` > 1
        self.tree, self.item_ids, self.num_beams = tree, torch.as_tensor(item_ids), num_beams
        self.val_decoders = (["dense"] if objective == "dense" else ["beam", "exact"] + (["dense"] if config.dense_dim else []))
        if serve not in self.val_decoders:
            raise ValueError(f"`serve` decoder {serve!r} is not validated by a {objective!r} run; choose one of {self.val_decoders}")
        self.save_hyperparameters({"model": config.to_dict(), "layout": layout.to_dict(), "optim": asdict(optim),
                                   "objective": objective, "serve": serve, "num_beams": num_beams, "ids_digest": ids_digest})
        if log_q is not None:
            check_log_q(log_q, int(item_tokens.shape[0]))
        elif config.dense_loss == "sampled" and (config.logq_correction or config.dense_negatives == "popularity"):
            raise ValueError("the sampled dense loss needs `log_q` (the training targets' log popularity) for its "
                             "log-Q correction or popularity negatives")
        self.register_buffer("log_q", log_q, persistent=False)
        # (L, N) on the host, each member's tables checked against the items once here, not in every step (a host
        # read on a GPU); the members' tables are built from the same items, so member 0's counts are all of theirs
        self._child_counts = [child_counts(model) for model in member_models(self.model)][0]
        self._nodes: torch.Tensor | None = None
        self._decoders: dict[str, Any] = {}
        self._sums: RankSums | None = None

    # ---- training ------------------------------------------------------------------------------------------------
    def _item_nodes(self) -> torch.Tensor:
        if self._nodes is None or self._nodes.device != self.device:
            self.tree = self.tree.to(self.device)
            self._nodes = item_paths(self.model, self.tree).nodes  # (N, L + 1)
        return self._nodes

    def plan(self, batch: SeqBatch) -> StepBatch:
        """What a training step needs to know of its batch's shapes, from the host copy of its targets."""
        targets = batch.targets.cpu()
        real = torch.nonzero(targets.flatten() >= 0).squeeze(1)
        return StepBatch(batch, real, pair_counts(self._child_counts, targets.flatten()[real]))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, SeqBatch) and batch.targets.dim() == 2:  # a training batch (evaluation targets are (B,))
            return self.plan(batch)
        return batch

    def training_step(self, batch: SeqBatch | StepBatch, batch_idx: int) -> torch.Tensor:
        """The members' joint losses. No value is read back from the device (no host synchronisation on a GPU) when
        the batch comes planned (:class:`StepBatch`, as the trainer passes it); a bare :class:`SeqBatch` is planned
        here from a host copy of its targets."""
        step = batch if isinstance(batch, StepBatch) else self.plan(batch)
        batch, real = step.batch, step.real.to(step.batch.targets.device)
        rows = batch.targets.flatten()[real]  # (P,)
        P = rows.numel()
        gen, dense = [], []
        members = member_models(self.model)
        masked = None  # the columns each position's dense softmax leaves out: its own history (seen_negatives False)
        if self.objective != "generative" and not self.config.seen_negatives:
            masked = history_columns(batch.histories, real, rows, members[0].num_items)  # once for every member
        for model in members:  # loop over an ensemble's members (one unless `members` > 1)
            g, d = self._losses(model, batch.histories, real, rows, step.pairs, masked)
            gen.append(g)
            dense.append(d)
        total = rows.new_zeros((), dtype=torch.float32)
        if self.objective != "dense":  # an ensemble's members each train on their own loss: the sum's gradient
            total = total + torch.stack(gen).sum()
            self.log("train/gen_loss", torch.stack(gen).detach().mean(), batch_size=P)
        if self.objective != "generative":
            total = total + self.dense_weight * torch.stack(dense).sum()
            self.log("train/dense_loss", torch.stack(dense).detach().mean(), batch_size=P)
        self.log("train/loss", total, prog_bar=True, batch_size=P)
        self.log("train/targets", float(P), reduce_fx="sum", batch_size=1)
        return total

    def _losses(self, model: CausalGenerator, histories: torch.Tensor, real: torch.Tensor, rows: torch.Tensor,
                pairs: tuple[int, ...], masked: ColumnMask | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One generator's code-head and dense-head losses on a batch (None for a head the objective leaves out);
        ``masked``: the columns each position's dense softmax leaves out (``history_columns``)."""
        hs = model.hidden(histories).flatten(0, 1)[real]  # (P, D): one pass, every real position
        full = self.objective != "generative" and self.config.dense_loss == "full"
        logits = dense_logits(model, hs) if full else None  # (P, N): the full softmax's, and distill's teacher
        if logits is not None and masked is not None:  # the teacher too gives no mass to what is never served
            logits = logits.masked_fill(masked(None), float("-inf"))
        gen = dense = None
        if self.objective != "dense":
            allowed = None
            if not self.config.node_vectors:  # the block-wide path masks with the tree
                nodes = self._item_nodes()[rows]  # (P, L + 1)
                allowed = [self.tree.allowed_mask(nodes[:, lv], token_range=self.layout.level_range(lv)) for lv in range(self.layout.num_levels)]
            distill = self.config.distill
            teacher = logits.detach().softmax(-1) if distill and logits is not None else None
            gen = code_loss(model, model.level_queries(hs), model.item_tokens[rows + 1], allowed,
                            label_smoothing=self.optim.label_smoothing, teacher=teacher, distill=distill if teacher is not None else 0.0,
                     pairs=pairs)
        if self.objective != "generative":
            dense = (torch.nn.functional.cross_entropy(logits, rows) if logits is not None
                     else dense_loss(model, hs, rows, log_q=self.log_q, masked=masked))
        return gen, dense

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_schedule(self, self.optim, lazy=self.config.sparse_tables)

    # ---- validation ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.tree = self.tree.to(self.device)
        ing = Ingredients(CAUSAL, self.model, self.tree, self.layout, None, num_beams=self.num_beams,
                          item_ids=self.item_ids.to(self.device))
        self._decoders = build_many(ing, self.val_decoders)  # through the registry, sharing item paths and tables
        self._sums = RankSums(self.val_decoders, self.ks, self.device)

    def validation_step(self, batch: SeqBatch, batch_idx: int) -> None:
        h = self.model.last_hidden(batch.histories, batch.lengths)
        k = self.ks[-1]
        for name in self.val_decoders:  # loop over decoders (<= 3), one backbone pass for all
            self._sums.add(name, self._decoders[name].rank_states(h, k).items, batch.targets)

    def on_validation_epoch_end(self) -> None:
        self._sums.log(self, self.serve)
        self._sums, self._decoders = None, {}

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.config.to_dict(), "layout": self.layout.to_dict(),
                                      "ids_digest": self.ids_digest, "objective": self.objective, "serve": self.serve}
