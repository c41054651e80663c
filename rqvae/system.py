"""Fitting an RQ-VAE with Lightning: a thin system around the plain model (loss, optimizer, logging), seeded and
deterministic on CPU, with early stopping on the reconstruction loss.

The codes are for the items fitted on (items that come later are encoded with the fitted model), so there is no
held-out set: early stopping watches the training reconstruction loss averaged over each epoch, which costs no
extra pass over the items."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

from rqvae._checks import limit_threads, standardization
from rqvae.model import RQVAE, RQVAEConfig

log = logging.getLogger(__name__)

# the item set is small and already in memory: worker processes would only add start-up time
_QUIET = (
    r".*does not have many workers.*",
    r".*GPU available but not used.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # lightning 2.6 on torch 2.13, not ours to fix
)


class RQVAESystem(L.LightningModule):
    """Trains an :class:`RQVAE` on an item set; k-means initialises its codebooks on the whole set first.

    Args:
        model: the RQ-VAE (standardisation already set).
        items: FloatTensor (N, D), the whole item set, for the codebooks' k-means initialisation.
    """

    def __init__(self, model: RQVAE, items: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.items = items

    def on_train_start(self) -> None:
        if not self.model.is_fitted:
            self.model.init_codebooks(self.items.to(self.device))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch[0])
        B = batch[0].shape[0]
        self.log("train/loss", out.loss, batch_size=B, on_step=False, on_epoch=True)
        self.log("train/recon", out.recon_loss, batch_size=B, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/commit", out.commit_loss, batch_size=B, on_step=False, on_epoch=True)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.model.config
        return torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)


def train_rqvae(embeddings: np.ndarray, config: RQVAEConfig, *, progress: bool = True) -> RQVAE:
    """Fit an RQ-VAE on validated embeddings.

    Seeds the global RNGs (``lightning.seed_everything``); on CPU the run is deterministic (the process-wide
    deterministic-algorithms flag is restored afterwards).

    Args:
        embeddings: FloatArray (N, D), finite, N >= K (validated by the caller).
        config: the model and fitting options.
        progress: show Lightning's progress bar.

    Returns:
        The fitted model, in eval mode, on CPU.
    """
    L.seed_everything(config.seed, workers=True, verbose=False)
    x = torch.from_numpy(embeddings)
    model = RQVAE(config, x.shape[1])
    model.set_standardization(*standardization(embeddings))
    train = DataLoader(
        TensorDataset(x),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    early = EarlyStopping(
        monitor="train/recon",
        mode="min",
        patience=config.patience,
        min_delta=config.min_delta,
        check_on_train_epoch_end=True,
    )
    was_deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    # Lightning's start-up notes (GPU/TPU available, a logging-service tip) say nothing about this fit
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    was_level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(
            accelerator=config.accelerator,
            devices=1,
            max_epochs=config.max_epochs,
            deterministic=True if config.accelerator == "cpu" else "warn",
            callbacks=[early],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )
        with warnings.catch_warnings(), limit_threads(config.num_threads):
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            trainer.fit(RQVAESystem(model, x), train_dataloaders=train)
    finally:
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
        lightning_log.setLevel(was_level)
    log.info(
        "rqvae: %d epochs, train/recon %.4f%s",
        trainer.current_epoch,
        float(trainer.callback_metrics.get("train/recon", float("nan"))),
        " (early stop)" if early.stopped_epoch else "",
    )
    return model.cpu().eval()
