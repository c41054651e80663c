"""One entry point for both methods: ``fit_codebooks(embeddings, config)`` -> the fitted quantizer, the items'
codes and their statistics; ``load_quantizer(path)`` reads either kind back."""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import numpy as np
import torch

from rqvae._checkpoint import read_checkpoint
from rqvae._checks import check_embeddings, limit_threads, warn_unused_codes
from rqvae.balance import balanced_last_level
from rqvae.kmeans import ResidualKMeans, RQKMeansConfig
from rqvae.model import RQVAE, RQVAEConfig
from rqvae.stats import CodeStats, code_stats

log = logging.getLogger(__name__)

Quantizer = RQVAE | ResidualKMeans


class FitResult(NamedTuple):
    """What :func:`fit_codebooks` gives.

    quantizer: the fitted quantizer; ``quantizer.encode(new_embeddings)`` codes items that come later.
    codes: LongArray (N, L) in [0, K), the fitted items' codes (balanced last level when the config asks).
    stats: per-level usage, collisions and reconstruction error of ``codes``.
    seconds: wall-clock time of the fit (the statistics excluded).
    """

    quantizer: Quantizer
    codes: np.ndarray
    stats: CodeStats
    seconds: float


def method_name(config: RQVAEConfig | RQKMeansConfig) -> str:
    """ "rqvae" or "rqkmeans"."""
    return "rqvae" if isinstance(config, RQVAEConfig) else "rqkmeans"


def fit_codebooks(
    embeddings: np.ndarray | torch.Tensor, config: RQVAEConfig | RQKMeansConfig, *, progress: bool = True
) -> FitResult:
    """Fit L codebooks of K codes on item embeddings and code every item.

    Args:
        embeddings: FloatArray (N, D), finite, N >= K; row i is item i.
        config: :class:`RQVAEConfig` (RQ-VAE, trained with Lightning) or :class:`RQKMeansConfig` (residual
            k-means with scikit-learn).
        progress: show a progress bar (RQ-VAE training).

    Returns:
        FitResult(quantizer, codes, stats, seconds).
    """
    if not isinstance(config, RQVAEConfig | RQKMeansConfig):
        raise TypeError(f"`config` must be an RQVAEConfig or an RQKMeansConfig, got {type(config).__name__}")
    x = check_embeddings(embeddings, min_rows=config.codebook_size)
    with limit_threads(config.num_threads):
        start = time.perf_counter()
        if isinstance(config, RQKMeansConfig):
            quantizer: Quantizer = ResidualKMeans(**config.to_dict()).fit(
                x
            )  # warns itself about unused codes
            codes = quantizer.codes_
        else:
            from rqvae.system import train_rqvae  # lightning is imported only when an RQ-VAE is fitted

            quantizer = train_rqvae(x, config, progress=progress)
            codes = quantizer.encode(x)
            if config.balanced:
                residuals = _last_residuals(quantizer, x, codes)
                codes[:, -1] = balanced_last_level(codes[:, :-1], residuals, quantizer.codebooks[-1].numpy())
            warn_unused_codes(codes, config.codebook_size)
        seconds = time.perf_counter() - start
        stats = code_stats(codes, config.codebook_size, x, quantizer.decode(codes))
    log.info(
        "%s: %.1f s, codes used per level %s, %.2f%% of items colliding, largest group %d",
        method_name(config),
        seconds,
        [lvl.codes_used for lvl in stats.levels],
        100 * stats.fraction_colliding,
        stats.largest_group,
    )
    return FitResult(quantizer, codes, stats, seconds)


@torch.no_grad()
def _last_residuals(model: RQVAE, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """What the last level quantizes: latents minus the codes of the levels before it. -> FloatArray (N, latent)."""
    z = torch.cat([model.latents(torch.from_numpy(x[i : i + 4096])) for i in range(0, x.shape[0], 4096)])
    books = model.codebooks  # (L, K, latent)
    for level in range(codes.shape[1] - 1):
        z = z - books[level][torch.from_numpy(codes[:, level])]
    return z.numpy()


def load_quantizer(path: str | os.PathLike[str]) -> Quantizer:
    """Read a quantizer file written by ``quantizer.save`` (either method), with ``weights_only=True``."""
    ckpt = read_checkpoint(path)
    if ckpt.get("method") == "rqvae":
        return RQVAE.from_checkpoint(ckpt)
    if ckpt.get("method") == "rqkmeans":
        return ResidualKMeans.from_checkpoint(ckpt)
    raise ValueError(f"{path}: unknown quantizer method {ckpt.get('method')!r}")
