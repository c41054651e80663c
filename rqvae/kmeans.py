"""Residual k-means: the strong simple baseline for semantic IDs.

Level 1 clusters the (standardised) embeddings with k-means; level l clusters what the levels before it left over
(the residuals). An item's code tuple is its cluster at each level; its reconstruction is the sum of its clusters'
centres. scikit-learn's ``KMeans`` (Lloyd, k-means++ seeding) does the clustering.

For large catalogues (millions of items) the centres can be fitted on a seeded sample (``fit_sample``) and/or with
``MiniBatchKMeans`` (``minibatch``); every item is then assigned to its nearest centre in chunks (the residuals of all
items, never an items x items or items x K float64 matrix larger than a chunk's).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import NotFittedError

from rqvae._checkpoint import read_checkpoint, save_checkpoint
from rqvae._checks import (
    check_bool,
    check_codebook_size,
    check_codes,
    check_embeddings,
    check_levels,
    check_num_threads,
    check_positive,
    limit_threads,
    standardization,
    warn_unused_codes,
)
from rqvae.balance import balanced_last_level, nearest_codes

log = logging.getLogger(__name__)

METHOD = "rqkmeans"


@dataclass(frozen=True)
class RQKMeansConfig:
    """The options of :class:`ResidualKMeans` as a config for :func:`rqvae.fit_codebooks` (same names)."""

    levels: int = 3
    codebook_size: int = 256
    balanced: bool = False
    standardize: bool = True
    max_iter: int = 100
    n_init: int = 1
    tol: float = 1e-4
    seed: int = 0
    num_threads: int | None = 1
    fit_sample: int | None = None
    minibatch: bool = False

    def __post_init__(self) -> None:
        checked = ResidualKMeans(**asdict(self))
        checked._check_params()
        for f in fields(self):  # the checked values: plain Python types (numpy's scalars converted)
            object.__setattr__(self, f.name, getattr(checked, f.name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResidualKMeans:
    """Residual k-means quantizer with the scikit-learn estimator contract.

    Args:
        levels: L, code levels (>= 1).
        codebook_size: K, codes per level (>= 2).
        balanced: give the fitted items last-level codes that never collide within a prefix (see
            :mod:`rqvae.balance`); :meth:`encode` of new items still takes the nearest code.
        standardize: scale each input dimension to zero mean and unit variance first.
        max_iter: Lloyd iterations per level at most.
        n_init: k-means++ restarts per level (the best inertia is kept).
        tol: relative tolerance of the Lloyd iterations.
        seed: seeds every level's k-means (level l uses ``seed + l``).
        num_threads: CPU threads while fitting (restored after); 1 by default, which is fastest on a shared CPU
            (see :func:`rqvae._checks.limit_threads`); None leaves scikit-learn's choice.
        fit_sample: fit each level's centres on a seeded random sample of at most this many items (>= K); every item
            is still assigned its nearest centre. None (the default) fits on all items.
        minibatch: fit with ``MiniBatchKMeans`` (batches of 4096, ``max_iter`` passes at most) instead of Lloyd.

    Fitted attributes:
        mean_, scale_: FloatArray (D,), the standardisation (identity when ``standardize`` is False).
        cluster_centers_: FloatArray (L, K, D), the codebooks, in standardised space.
        codes_: LongArray (N, L) in [0, K), the fitted items' codes (balanced last level if asked).
        inertia_: list of L floats, each level's sum of squared distances to the nearest centre.
        n_features_in_: D.
    """

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        *,
        balanced: bool = False,
        standardize: bool = True,
        max_iter: int = 100,
        n_init: int = 1,
        tol: float = 1e-4,
        seed: int = 0,
        num_threads: int | None = 1,
        fit_sample: int | None = None,
        minibatch: bool = False,
    ) -> None:
        self.levels = levels
        self.codebook_size = codebook_size
        self.balanced = balanced
        self.standardize = standardize
        self.max_iter = max_iter
        self.n_init = n_init
        self.tol = tol
        self.seed = seed
        self.num_threads = num_threads
        self.fit_sample = fit_sample
        self.minibatch = minibatch

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments."""
        return {f.name: getattr(self, f.name) for f in fields(RQKMeansConfig)}

    def _check_params(self) -> None:
        """Check every parameter and keep it as a plain Python value (numpy's scalars converted: a quantizer file
        holds its parameters and loads only Python's types)."""
        self.levels = check_levels(self.levels)
        self.codebook_size = check_codebook_size(self.codebook_size)
        self.max_iter = check_positive("max_iter", self.max_iter, integer=True)
        self.n_init = check_positive("n_init", self.n_init, integer=True)
        self.tol = check_positive("tol", self.tol, allow_zero=True)
        self.seed = check_positive("seed", self.seed, integer=True, allow_zero=True)
        if self.seed + self.levels - 1 >= 2**32:  # level l's k-means is seeded with seed + l (scikit-learn: < 2^32)
            raise ValueError(f"`seed` must be below 2^32 - levels ({2**32 - self.levels}): level l's k-means takes "
                             f"seed + l; got {self.seed}")
        self.num_threads = check_num_threads(self.num_threads)
        if self.fit_sample is not None:
            v = self.fit_sample
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < self.codebook_size:
                raise ValueError(f"`fit_sample` must be None or an int >= codebook_size ({self.codebook_size}), got {v!r}")
            self.fit_sample = int(v)
        self.balanced = check_bool("balanced", self.balanced)
        self.standardize = check_bool("standardize", self.standardize)
        self.minibatch = check_bool("minibatch", self.minibatch)

    # ---- fit ---------------------------------------------------------------------------------------------------
    def fit(self, embeddings: np.ndarray) -> ResidualKMeans:
        """Fit L codebooks, level after level, on the residuals.

        Args:
            embeddings: FloatArray (N, D), finite, N >= K.

        Returns:
            self, fitted.
        """
        self._check_params()
        x = check_embeddings(embeddings, min_rows=self.codebook_size)
        with limit_threads(self.num_threads):
            self._fit(x)
        return self

    def _fit(self, x: np.ndarray) -> None:
        L, K = self.levels, self.codebook_size
        if self.standardize:
            self.mean_, self.scale_ = standardization(x)
        else:
            self.mean_, self.scale_ = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
        residual = (x - self.mean_) / self.scale_  # (N, D)
        centers = np.empty((L, K, x.shape[1]), dtype=np.float32)
        codes = np.empty((x.shape[0], L), dtype=np.int64)
        self.inertia_ = []
        sample = None
        if self.fit_sample is not None and x.shape[0] > self.fit_sample:
            rng = np.random.default_rng(self.seed)
            sample = np.sort(rng.choice(x.shape[0], self.fit_sample, replace=False))
        for level in range(L):
            km = self._estimator(level)
            with warnings.catch_warnings():  # a duplicate-point warning is re-raised below as codes used < K
                warnings.filterwarnings("ignore", message="Number of distinct clusters")
                km.fit(residual if sample is None else residual[sample])
            centers[level] = km.cluster_centers_
            codes[:, level] = nearest_codes(residual, centers[level])  # exactly what `encode` computes, in chunks
            if level == L - 1 and self.balanced:
                codes[:, level] = balanced_last_level(codes[:, :level], residual, centers[level])
            residual = residual - centers[level][codes[:, level]]
            inertia = float(km.inertia_) if sample is None and not self.minibatch else float((residual**2).sum())
            self.inertia_.append(inertia)
            log.info("rqkmeans level %d: inertia %.4g, %d codes used", level, inertia, np.unique(codes[:, level]).size)
        self.cluster_centers_ = centers
        self.codes_ = codes
        self.n_features_in_ = x.shape[1]
        warn_unused_codes(codes, K, stacklevel=4)  # points at the caller of `fit`

    def _estimator(self, level: int) -> KMeans | MiniBatchKMeans:
        if self.minibatch:
            return MiniBatchKMeans(n_clusters=self.codebook_size, batch_size=4096, n_init=self.n_init,
                                   max_iter=self.max_iter, tol=self.tol, random_state=self.seed + level)
        return KMeans(n_clusters=self.codebook_size, n_init=self.n_init, max_iter=self.max_iter, tol=self.tol,
                      random_state=self.seed + level)

    # ---- use ---------------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise NotFittedError(
                "this ResidualKMeans is not fitted yet: call `fit` (or `fit_codebooks`) first"
            )

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """Nearest-code tuples of (new) items.

        Args:
            embeddings: FloatArray (N, D), finite.

        Returns:
            codes: LongArray (N, L) in [0, K). Plain nearest-code assignment at every level, also the last when
            ``balanced`` (so a fitted item may get a tuple that differs from ``codes_`` in its last code).
        """
        self._check_fitted()
        x = check_embeddings(embeddings, dim=self.n_features_in_)
        residual = (x - self.mean_) / self.scale_
        codes = np.empty((x.shape[0], self.cluster_centers_.shape[0]), dtype=np.int64)
        for level, centers in enumerate(self.cluster_centers_):
            codes[:, level] = nearest_codes(residual, centers)
            residual = residual - centers[codes[:, level]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruct embeddings from codes.

        Args:
            codes: LongArray (N, L) in [0, K).

        Returns:
            FloatArray (N, D), the sum of the codes' centres, mapped back to input space.
        """
        self._check_fitted()
        codes = check_codes(codes, *self.cluster_centers_.shape[:2])
        z = sum(self.cluster_centers_[level][codes[:, level]] for level in range(codes.shape[1]))
        return z * self.scale_ + self.mean_

    # ---- persistence -------------------------------------------------------------------------------------------
    def to_checkpoint(self) -> dict[str, Any]:
        """Plain dict (parameters + fitted tensors) for ``torch.save``; loadable with ``weights_only=True``."""
        self._check_fitted()
        return {
            "method": METHOD,
            "params": self.get_params(),
            "mean": torch.from_numpy(self.mean_),
            "scale": torch.from_numpy(self.scale_),
            "cluster_centers": torch.from_numpy(self.cluster_centers_),
            "inertia": list(self.inertia_),
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> ResidualKMeans:
        """Rebuild a fitted quantizer from :meth:`to_checkpoint`'s dict (``codes_`` is not kept)."""
        est = cls(**ckpt["params"])
        est.mean_ = ckpt["mean"].numpy()
        est.scale_ = ckpt["scale"].numpy()
        est.cluster_centers_ = ckpt["cluster_centers"].numpy()
        est.inertia_ = list(ckpt["inertia"])
        est.n_features_in_ = int(est.mean_.shape[0])
        return est

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the quantizer file (atomically)."""
        save_checkpoint(self.to_checkpoint(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ResidualKMeans:
        return cls.from_checkpoint(read_checkpoint(path, METHOD))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ResidualKMeans({args})"
