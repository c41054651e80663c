"""What every design samples with: the seeded sample of evaluation users, the epoch permutation and the
length-bucketed batch sampler (sharded across processes), and the padded share of a set of batches.

Lightning-free; the data modules (``generator.training.datamodules``, the T5 plug-in's ``generator.t5.datamodule``)
build their batches with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from semid.safe_read import is_int


# ---- evaluation users, length-bucketed batches ------------------------------------------------------------------------------------
def sample_users(num_users: int, max_users: int | None, seed: int) -> np.ndarray:
    """Sorted rows of a seeded random sample of ``max_users`` users (all of them when None or larger)."""
    if max_users is not None and (not is_int(max_users) or max_users < 1):
        raise ValueError(f"`max_users` must be a positive int or None, got {max_users!r}")
    if not is_int(seed) or not 0 <= seed < 2**32:  # (numpy's ints too)
        raise ValueError(f"`seed` must be an int in [0, 2^32), got {seed!r}")
    if max_users is None or max_users >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, size=max_users, replace=False))


class EpochPermutation(Sampler[int]):
    """A seeded random permutation of range(n), new each epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator()).tolist())

    def __len__(self) -> int:
        return self.n


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of examples of similar input length, in random order; sharded across ``num_replicas`` processes.

    Each epoch: take the sampler's permutation, cut it into chunks of ``batch_size * bucket_batches`` examples,
    sort each chunk by input length, cut it into batches, shuffle all batches. Every replica gets the same number of
    batches (the list wraps around), as DDP needs.

    Args:
        lengths: int (E,) encoder input length of every example.
        batch_size: examples per batch (the last batch of a chunk may be smaller).
        bucket_batches: how many batches' worth of examples are sorted together (1 = no bucketing).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        bucket_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if not is_int(bucket_batches) or bucket_batches < 1:
            raise ValueError(f"`bucket_batches` must be a positive int, got {bucket_batches!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, {num_replicas}), got {rank!r}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("`lengths` must hold at least one example, got none")
        self.batch_size, self.bucket_batches = int(batch_size), int(bucket_batches)
        self.num_replicas, self.rank = num_replicas, rank
        self.sampler = EpochPermutation(self.lengths.size, seed)  # Lightning calls sampler.set_epoch

    def batches(self) -> list[np.ndarray]:
        """All batches of this epoch (every replica), in the order they are served."""
        perm = np.fromiter(iter(self.sampler), dtype=np.int64, count=self.lengths.size)
        chunk = self.batch_size * self.bucket_batches
        out: list[np.ndarray] = []
        for c in range(0, perm.size, chunk):
            part = perm[c : c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            out.extend(part[b : b + self.batch_size] for b in range(0, part.size, self.batch_size))
        order = torch.randperm(len(out), generator=self.sampler.generator()).tolist()
        return [out[i] for i in order]

    def num_batches(self) -> int:
        """Batches per epoch over all replicas (does not depend on the permutation)."""
        chunk = self.batch_size * self.bucket_batches
        sizes = np.minimum(chunk, self.lengths.size - np.arange(0, self.lengths.size, chunk))
        return int((-(-sizes // self.batch_size)).sum())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        for i in range(len(self)):
            yield batches[(self.rank + i * self.num_replicas) % len(batches)].tolist()

    def __len__(self) -> int:
        return -(-self.num_batches() // self.num_replicas)


class PaddingStats(NamedTuple):
    """Encoder tokens in an epoch's batches: real ones, padded ones, and the padded share."""

    real_tokens: int
    padded_tokens: int
    padded_share: float


def padding_stats(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> PaddingStats:
    """How much of the padded encoder input is padding, for the given batches of example indices."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(int(lengths[b].max()) * len(b) for b in batches)
    return PaddingStats(real, total - real, (total - real) / max(total, 1))
