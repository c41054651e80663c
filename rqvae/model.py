"""RQ-VAE: MLP encoder -> residual vector quantizer -> MLP decoder (TIGER, Rajput et al., NeurIPS 2023).

A plain ``nn.Module``; :mod:`rqvae.system` fits it with Lightning. Inputs are standardised inside the model (the
per-dimension mean and scale are buffers set from the data at fit time): unit-norm sentence embeddings fed raw
collapse the codebooks. The quantizer is ``vector_quantize_pytorch.ResidualVQ`` with EMA codebooks, k-means
initialisation and dead-code replacement; every option that matters is set explicitly here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import NotFittedError
from torch import nn
from vector_quantize_pytorch import ResidualVQ

from rqvae._checkpoint import read_checkpoint, save_checkpoint
from rqvae._checks import (
    check_bool,
    check_codebook_size,
    check_codes,
    check_embeddings,
    check_levels,
    check_num_threads,
    check_positive,
)

METHOD = "rqvae"


@dataclass(frozen=True)
class RQVAEConfig:
    """Everything that defines an RQ-VAE and how it is fitted (the input dimension D comes from the data).

    Codes:
        levels: L, code levels (TIGER: 3).
        codebook_size: K, codes per level (TIGER: 256).
        balanced: give the fitted items last-level codes that never collide within a prefix
            (:mod:`rqvae.balance`); ``encode`` of new items still takes the nearest code.
    Model:
        hidden_dims, latent_dim: the encoder is D -> hidden_dims -> latent_dim (TIGER: 512, 256, 128 -> 32);
            the decoder mirrors it.
        dropout: dropout after each hidden layer of encoder and decoder.
        commitment_weight: beta of the commitment loss ||z - sg(q)||^2 (VQ-VAE; TIGER: 0.25).
        kmeans_init, kmeans_iters: initialise each codebook with k-means on its first input (fitting feeds it
            the whole item set), as TIGER does.
        threshold_ema_dead_code: a code whose EMA usage count per batch falls below this is replaced by a random
            input of the batch (Jukebox, Dhariwal et al. 2020); 0 disables it.
        rotation_trick: pass gradients through the quantizer with the rotation trick (Fifty et al., 2024)
            instead of the straight-through estimator.
        decay: EMA decay of the codebooks (VQ-VAE-2, Razavi et al. 2019).
    Fitting:
        lr, weight_decay: AdamW.
        batch_size: items per step.
        max_epochs, patience, min_delta: stop when the reconstruction loss (the training epoch's mean) has not
            improved by ``min_delta`` for ``patience`` epochs, or after ``max_epochs``.
        seed: seeds everything (weights, k-means, batches, dead-code samples).
        accelerator: Lightning accelerator; "cpu" (deterministic) by default.
        num_threads: CPU threads while fitting (restored after); 1 by default, which is fastest on a shared CPU
            for a model this small (see :func:`rqvae._checks.limit_threads`); None leaves torch's setting.
    """

    levels: int = 3
    codebook_size: int = 256
    balanced: bool = False
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    dropout: float = 0.0
    commitment_weight: float = 0.25
    kmeans_init: bool = True
    kmeans_iters: int = 20
    threshold_ema_dead_code: float = 2.0
    rotation_trick: bool = True
    decay: float = 0.8
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    max_epochs: int = 50
    patience: int = 10
    min_delta: float = 1e-4
    seed: int = 0
    accelerator: str = "cpu"
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", check_levels(self.levels))
        object.__setattr__(self, "codebook_size", check_codebook_size(self.codebook_size))
        # every value kept as a plain Python one (numpy's scalars converted): a quantizer file holds the config and
        # loads only Python's types
        object.__setattr__(self, "hidden_dims", tuple(check_positive(f"hidden_dims[{i}]", h, integer=True)
                                                      for i, h in enumerate(self.hidden_dims)))
        for name in ("latent_dim", "kmeans_iters", "batch_size", "max_epochs"):
            object.__setattr__(self, name, check_positive(name, getattr(self, name), integer=True))
        for name in ("patience", "seed"):
            object.__setattr__(self, name, check_positive(name, getattr(self, name), integer=True, allow_zero=True))
        object.__setattr__(self, "lr", check_positive("lr", self.lr))
        for name in ("commitment_weight", "threshold_ema_dead_code", "weight_decay", "min_delta", "dropout", "decay"):
            object.__setattr__(self, name, check_positive(name, getattr(self, name), allow_zero=True))
        for name in ("balanced", "kmeans_init", "rotation_trick"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {self.decay!r}")
        object.__setattr__(self, "num_threads", check_num_threads(self.num_threads))
        if not isinstance(self.accelerator, str):
            raise ValueError(f"`accelerator` must be a string such as 'cpu', got {self.accelerator!r}")
        object.__setattr__(self, "accelerator", str(self.accelerator))  # (numpy's str_ too)
        if not self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), for JSON and ``weights_only`` checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RQVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RQVAEConfig fields {sorted(unknown)}")
        return cls(**d)


class RQVAEOutput(NamedTuple):
    """What one forward pass gives.

    recon: FloatTensor (B, D), the reconstruction in input space.
    codes: LongTensor (B, L) in [0, K).
    recon_loss: scalar, mean squared error in standardised space.
    commit_loss: scalar, the weighted commitment loss summed over levels (0 in eval mode).
    loss: scalar, recon_loss + commit_loss.
    """

    recon: torch.Tensor
    codes: torch.Tensor
    recon_loss: torch.Tensor
    commit_loss: torch.Tensor
    loss: torch.Tensor


def _mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """Linear layers with ReLU (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Residual-quantized autoencoder over item embeddings.

    Args:
        config: the architecture and quantizer options.
        input_dim: D, the embedding dimension.
    """

    def __init__(self, config: RQVAEConfig, input_dim: int) -> None:
        super().__init__()
        check_positive("input_dim", input_dim, integer=True)
        self.config = config
        self.input_dim = int(input_dim)
        c = config
        self.register_buffer("mean", torch.zeros(input_dim))  # (D,)
        self.register_buffer("scale", torch.ones(input_dim))  # (D,)
        self.encoder = _mlp([input_dim, *c.hidden_dims, c.latent_dim], c.dropout)
        self.decoder = _mlp([c.latent_dim, *reversed(c.hidden_dims), input_dim], c.dropout)
        self.quantizer = ResidualVQ(
            dim=c.latent_dim,
            num_quantizers=c.levels,
            codebook_size=c.codebook_size,
            shared_codebook=False,
            quantize_dropout=False,
            kmeans_init=c.kmeans_init,
            kmeans_iters=c.kmeans_iters,
            threshold_ema_dead_code=c.threshold_ema_dead_code,
            rotation_trick=c.rotation_trick,
            straight_through=False,
            decay=c.decay,
            ema_update=True,
            learnable_codebook=False,
            use_cosine_sim=False,
            stochastic_sample_codes=False,
            commitment_weight=c.commitment_weight,
            sync_codebook=False,
        )

    # ---- model -------------------------------------------------------------------------------------------------
    def set_standardization(self, mean: np.ndarray, scale: np.ndarray) -> None:
        """Set the input standardisation: mean (D,), scale (D,) > 0."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output z: x FloatTensor (B, D) -> FloatTensor (B, latent_dim)."""
        return self.encoder((x - self.mean) / self.scale)

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """x: FloatTensor (B, D) in input space. In training mode the codebooks update (EMA, dead codes)."""
        x_std = (x - self.mean) / self.scale  # (B, D)
        z = self.encoder(x_std)  # (B, latent)
        z_q, codes, commit = self.quantizer(z)  # (B, latent), (B, L), (L,)
        x_hat_std = self.decoder(z_q)  # (B, D)
        recon_loss = F.mse_loss(x_hat_std, x_std)
        commit_loss = commit.sum()
        return RQVAEOutput(
            x_hat_std * self.scale + self.mean, codes, recon_loss, commit_loss, recon_loss + commit_loss
        )

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor) -> None:
        """Run the quantizer's k-means initialisation (level after level, on the residuals) on x (N, D).

        Call it with the whole item set before training, so no codebook is seeded from one random batch.
        """
        was_training = self.training
        self.train()
        self.quantizer(self.latents(x))
        self.train(was_training)

    @property
    def is_fitted(self) -> bool:
        """Whether every codebook has been initialised (by k-means or from a checkpoint)."""
        return all(bool(layer._codebook.initted) for layer in self.quantizer.layers)

    @property
    def codebooks(self) -> torch.Tensor:
        """FloatTensor (L, K, latent_dim): the codes of each level, in latent space."""
        return self.quantizer.codebooks

    # ---- the array interface shared with ResidualKMeans ---------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("this RQVAE is not fitted yet: fit it with `rqvae.fit_codebooks` first")

    @torch.no_grad()
    def encode(self, embeddings: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
        """Nearest-code tuples of (new) items; the model is not changed.

        Args:
            embeddings: FloatArray (N, D), finite.

        Returns:
            codes: LongArray (N, L) in [0, K), nearest code at every level (also the last when ``balanced``).
        """
        self._check_fitted()
        x = check_embeddings(embeddings, dim=self.input_dim)
        was_training = self.training
        self.eval()
        device = self.mean.device
        out = [
            self.quantizer(self.latents(torch.from_numpy(x[i : i + batch_size]).to(device)))[1].cpu()
            for i in range(0, x.shape[0], batch_size)
        ]
        self.train(was_training)
        return torch.cat(out).numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Reconstruct embeddings from codes: LongArray (N, L) in [0, K) -> FloatArray (N, D) in input space."""
        self._check_fitted()
        codes = check_codes(codes, self.config.levels, self.config.codebook_size)
        was_training = self.training
        self.eval()
        z_q = self.quantizer.get_output_from_indices(
            torch.from_numpy(codes).to(self.mean.device)
        )  # (N, latent)
        x_hat = self.decoder(z_q) * self.scale + self.mean
        self.train(was_training)
        return x_hat.cpu().numpy()

    # ---- persistence -------------------------------------------------------------------------------------------
    def to_checkpoint(self) -> dict[str, Any]:
        """Plain dict (config, input dim, weights) for ``torch.save``; loadable with ``weights_only=True``."""
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {
            "method": METHOD,
            "config": self.config.to_dict(),
            "input_dim": self.input_dim,
            "state_dict": state,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> RQVAE:
        model = cls(RQVAEConfig.from_dict(ckpt["config"]), int(ckpt["input_dim"]))
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the quantizer file (atomically)."""
        save_checkpoint(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RQVAE:
        return cls.from_checkpoint(read_checkpoint(path, METHOD))
