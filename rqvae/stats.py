"""Code statistics: how the codes of each level are used, how often full code tuples collide, and how well the
codes reconstruct the embeddings. Plain numpy, no model."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LevelStats(NamedTuple):
    """Usage of one level's codebook."""

    level: int
    codes_used: int  # distinct codes that at least one item takes
    codebook_size: int
    perplexity: float  # exp(entropy) of the code distribution; = codebook_size when usage is uniform


class CodeStats(NamedTuple):
    """Per-level usage and collisions of an (N, L) code array (before any extra disambiguation level)."""

    num_items: int
    levels: list[LevelStats]
    items_colliding: int  # items that share their L-code tuple with at least one other item
    fraction_colliding: float
    largest_group: int  # most items sharing one tuple (the extra level needs this many values)
    reconstruction_mse: float  # mean over items of ||x - x_hat||^2 (NaN when not measured)
    reconstruction_rel: (
        float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2: 0 is exact, 1 is "predict the mean"
    )

    def to_dict(self) -> dict:
        """JSON-ready form (levels as a list of dicts)."""
        out = self._asdict()
        out["levels"] = [lvl._asdict() for lvl in self.levels]
        return out


def code_stats(
    codes: np.ndarray,
    codebook_size: int,
    embeddings: np.ndarray | None = None,
    reconstruction: np.ndarray | None = None,
) -> CodeStats:
    """Statistics of codes (and, when both arrays are given, of the reconstruction they give).

    Args:
        codes: LongArray (N, L) in [0, codebook_size).
        codebook_size: K.
        embeddings: FloatArray (N, D), the inputs; optional.
        reconstruction: FloatArray (N, D), what the quantizer decodes ``codes`` to; optional.
    """
    codes = np.asarray(codes)
    assert codes.ndim == 2 and codes.shape[0] > 0, (
        f"codes must be a non-empty (N, L) array, got {codes.shape}"
    )
    n = codes.shape[0]
    levels = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / n
        levels.append(
            LevelStats(
                level, int((counts > 0).sum()), int(codebook_size), float(np.exp(-(p * np.log(p)).sum()))
            )
        )
    _, inverse, group_sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    per_item = group_sizes[inverse.reshape(-1)]
    colliding = int((per_item > 1).sum())
    mse = rel = float("nan")
    if embeddings is not None and reconstruction is not None:
        x = np.asarray(embeddings, dtype=np.float64)
        err = ((x - np.asarray(reconstruction, dtype=np.float64)) ** 2).sum(axis=1)
        mse = float(err.mean())
        spread = float(((x - x.mean(axis=0)) ** 2).sum())  # (no absolute floor: tiny-scaled embeddings read 0.000)
        rel = float(err.sum() / spread) if spread > 0 else (0.0 if float(err.sum()) == 0 else float("inf"))
    return CodeStats(
        num_items=n,
        levels=levels,
        items_colliding=colliding,
        fraction_colliding=colliding / n,
        largest_group=int(group_sizes.max()),
        reconstruction_mse=mse,
        reconstruction_rel=rel,
    )
