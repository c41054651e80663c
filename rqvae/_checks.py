"""Argument checks shared by the public entry points of `rqvae` (validation happens once, at the boundary)."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits


def check_levels(levels: object) -> int:
    """`levels` as an int >= 1, or a ValueError naming it."""
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
        raise ValueError(f"`levels` must be an int >= 1, got {levels!r}")
    return int(levels)


def check_codebook_size(codebook_size: object) -> int:
    """`codebook_size` as an int >= 2, or a ValueError naming it."""
    if (
        isinstance(codebook_size, bool)
        or not isinstance(codebook_size, numbers.Integral)
        or codebook_size < 2
    ):
        raise ValueError(f"`codebook_size` must be an int >= 2, got {codebook_size!r}")
    return int(codebook_size)


def check_positive(name: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> Any:
    """``value`` as a plain int (``integer``) or float, or a ValueError unless it is a (non-negative if
    ``allow_zero``) positive number. Plain: numpy's scalars are accepted but never kept, as a quantizer file loads
    only Python's types (``weights_only``)."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an int" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be {what} {bound}, got {value!r}")
    return int(value) if integer else float(value)


def check_bool(name: str, value: object) -> bool:
    """``value`` as a plain bool (numpy's too), or a ValueError naming it (a string such as "no" is not one)."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")
    return bool(value)


def check_num_threads(num_threads: object) -> int | None:
    """`num_threads` as None or a plain int >= 1."""
    return None if num_threads is None else check_positive("num_threads", num_threads, integer=True)


def check_embeddings(
    embeddings: object, *, min_rows: int = 1, dim: int | None = None, name: str = "embeddings"
) -> np.ndarray:
    """Validate an item embedding matrix and return it as float32.

    Args:
        embeddings: array-like or tensor (N, D), real, finite.
        min_rows: the least N accepted: K, the codebook size, when fitting (every code needs an item).
        dim: the D a fitted quantizer expects, if any.

    Returns:
        FloatArray (N, D), float32, C-contiguous (a copy only where a conversion is needed).
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (N, D), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"`{name}` must hold real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[1] == 0:
        raise ValueError(f"`{name}` must have at least one column, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"`{name}` must have D = {dim} columns (the dimension the quantizer was fitted on), got {x.shape[1]}"
        )
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"`{name}` row {int(bad[0])} is not finite (NaN or inf); {bad.size} such row(s) in all: {bad[:5].tolist()}"
        )
    if x.shape[0] < min_rows:
        raise ValueError(
            f"`{name}` has {x.shape[0]} rows, fewer than `codebook_size` = {min_rows}: every code of a level "
            "needs at least one item to fit"
        )
    return x


def standardization(x: np.ndarray, rel_eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale of x (N, D).

    A dimension whose std is below ``rel_eps`` times the largest std is (numerically) constant: its scale is 1, so
    it stays near zero instead of being blown up into noise. (all-MiniLM-L6-v2 has three such dimensions.)

    Returns:
        mean: FloatArray (D,); scale: FloatArray (D,), > 0.
    """
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    scale = np.where((std > rel_eps * float(std.max())) & (std > 0), std, 1.0)  # (relative only: embeddings of any
    # scale are standardised alike; an absolute floor made all of 1e-18-scaled ones "constant", one degenerate code)
    return mean.astype(np.float32), scale.astype(np.float32)


def check_codes(codes: object, levels: int, codebook_size: int) -> np.ndarray:
    """Codes (N, L) as int64 in [0, K), or a ValueError naming `codes`."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != levels or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(
            f"`codes` must be an integer array (N, {levels}), got shape {codes.shape} dtype {codes.dtype}"
        )
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(
            f"`codes` must lie in [0, {codebook_size}), got values in [{codes.min()}, {codes.max()}]"
        )
    return codes.astype(np.int64)


def warn_unused_codes(codes: np.ndarray, codebook_size: int, stacklevel: int = 3) -> None:
    """Warn (a legal but degenerate outcome) when a level leaves codes unused on the fitted items."""
    for level in range(codes.shape[1]):
        used = np.unique(codes[:, level]).size
        if used < codebook_size:
            warnings.warn(
                f"level {level} uses {used} of its {codebook_size} codes on the fitted items "
                "(too few distinct items, or a codebook larger than the data needs)",
                stacklevel=stacklevel,
            )


@contextmanager
def limit_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with at most ``num_threads`` CPU threads in torch and in OpenMP/BLAS pools (scikit-learn's
    k-means), restoring both afterwards; ``None`` leaves them alone.

    Why one thread is the default for fitting: the models and batches here are small, and on a CPU shared with
    other processes OpenMP threads stall at every barrier waiting for a descheduled sibling. Measured on the
    2-core machine under a load of ~4: one k-means level on Beauty took 2.5 s with 1 thread and 27-31 s with 2,
    an RQ-VAE epoch 0.73 s with 1 thread and 11 s with 2.
    """
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with threadpool_limits(num_threads):
            yield
    finally:
        torch.set_num_threads(before)
