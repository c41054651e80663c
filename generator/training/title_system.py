"""TitleSystem: the LightningModule of a title run (title negative log-likelihood, schedule, validation by title beam).

One training step runs the backbone once over a batch of user windows and trains the title head on every real
position's next item (``TitleGenerator.title_nll``, averaged over positions). Validation decodes a seeded sample of
validation users with the constrained title beam and logs ``val/title-beam/recall@K`` and ``val/title-beam/ndcg@K``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from generator.decoding.protocol import StateDecoder
from generator.decoding.registry import TITLE, Ingredients, build
from generator.decoding.titles import LENGTH_PENALTY, TITLE_BEAM
from generator.models.checkpoint import CHECKPOINT_KEY
from generator.models.titles import TitleConfig, TitleGenerator
from generator.training.causal_data import SeqBatch
from generator.training.causal_system import RankSums
from generator.training.optim import OptimConfig, adamw_schedule
from semid.layout import TokenLayout
from semid.tree import PrefixTree

TARGET = "title"


def title_monitor() -> str:
    return f"val/{TITLE_BEAM}/ndcg@10"


class TitleSystem(L.LightningModule):
    """Args:
        config, layout, item_tokens, title_targets: the model (``generator.models.titles``).
        item_ids: LongTensor (N,) the item id of each row; codes: LongTensor (N, L) their codes; ids_digest: stored.
        tree: the title tree (validation decoding; not stored).
    """

    def __init__(self, config: TitleConfig, layout: TokenLayout, item_tokens: torch.Tensor, title_targets: torch.Tensor,
                 item_ids: torch.Tensor, codes: torch.Tensor, ids_digest: str, tree: PrefixTree, *,
                 optim: OptimConfig = OptimConfig(), num_beams: int = 20, ks: Sequence[int] = (5, 10),  # noqa: B008 (frozen)
                 length_penalty: float = LENGTH_PENALTY) -> None:
        super().__init__()
        self.config, self.layout, self.ids_digest, self.optim = config, layout, ids_digest, optim
        self.model = TitleGenerator(config, layout, item_tokens, title_targets)
        self.tree, self.item_ids, self.codes = tree, torch.as_tensor(item_ids), torch.as_tensor(codes)
        self.num_beams, self.ks, self.length_penalty = num_beams, tuple(sorted(ks)), length_penalty
        self.save_hyperparameters({"model": config.to_dict(), "layout": layout.to_dict(), "optim": asdict(optim),
                                   "num_beams": num_beams, "ids_digest": ids_digest, "target": TARGET})
        self._decoder: StateDecoder | None = None
        self._sums: RankSums | None = None

    def training_step(self, batch: SeqBatch, batch_idx: int) -> torch.Tensor:
        h = self.model.hidden(batch.histories)  # (B, T, D): one pass, every position
        real = batch.targets >= 0
        loss = self.model.title_nll(h[real], batch.targets[real], self.optim.label_smoothing).mean()
        P = int(real.sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=P)
        self.log("train/targets", float(P), reduce_fx="sum", batch_size=1)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_schedule(self, self.optim)

    def on_validation_epoch_start(self) -> None:
        self.tree = self.tree.to(self.device)
        ing = Ingredients(TITLE, self.model, self.tree, None, None, num_beams=self.num_beams,
                          title={"length_penalty": self.length_penalty}, item_ids=self.item_ids, codes=self.codes)
        self._decoder = build(ing, TITLE_BEAM)
        self._sums = RankSums([TITLE_BEAM], self.ks, self.device)

    def validation_step(self, batch: SeqBatch, batch_idx: int) -> None:
        h = self.model.last_hidden(batch.histories, batch.lengths)
        self._sums.add(TITLE_BEAM, self._decoder.rank_states(h, self.ks[-1]).items, batch.targets)

    def on_validation_epoch_end(self) -> None:
        self._sums.log(self, TITLE_BEAM)
        self._decoder, self._sums = None, None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": self.config.to_dict(), "layout": self.layout.to_dict(),
                                      "ids_digest": self.ids_digest, "target": TARGET}
