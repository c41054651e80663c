"""The Lightning data modules: what every design's shares (:class:`ShardedDataModule`: training batches,
length-bucketed, sharded for DDP, resumable mid-epoch, and a fixed, seeded sample of validation users, the same every
validation, so checkpoints are compared on equal terms) and the causal design's (the T5 plug-in's is
``generator.t5.datamodule``).

The featurisation itself (windows, evaluation batches) is Lightning-free (``causal_data``), so that serving a run never
imports Lightning; only training reads this module.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from generator.training.causal_data import (
    SeqBatch,
    Windows,
    collate_windows,
    eval_batches,
    split_histories,
    training_windows,
)
from generator.training.resume import ResumableLoader
from generator.training.sampling import BucketBatchSampler, sample_users
from semid.ids import SemanticIDs
from semid.safe_read import is_int
from semid.split import Split

log = logging.getLogger(__name__)


class ShardedDataModule(L.LightningDataModule):
    """What both data modules share: checked batch sizes, a seeded sample of validation users, and length-bucketed
    training batches sharded across the trainer's processes (``bucket_batches``: batches' worth of examples sorted
    by length together, see BucketBatchSampler)."""

    def __init__(self, split: Split, ids: SemanticIDs, *, batch_size: int, eval_batch_size: int, max_history: int,
                 val_users: int | None, seed: int, bucket_batches: int) -> None:
        super().__init__()
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not is_int(v) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        self.split, self.ids, self.max_history = split, ids, max_history
        self.batch_size, self.eval_batch_size, self.val_users = int(batch_size), int(eval_batch_size), val_users
        self.seed, self.bucket_batches = seed, bucket_batches

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _sampler(self, lengths: Any, bucket_batches: int | None = None) -> BucketBatchSampler:
        world, rank = self._world()
        return BucketBatchSampler(lengths, self.batch_size, seed=self.seed, num_replicas=world, rank=rank,
                                  bucket_batches=self.bucket_batches if bucket_batches is None else bucket_batches)

    def _val_rows(self) -> Any:
        return sample_users(self.split.num_users, self.val_users, self.seed)


class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Collate:
    def __init__(self, windows: Windows) -> None:
        self.windows = windows

    def __call__(self, index: list[int]) -> SeqBatch:
        return collate_windows(self.windows, index)


class CausalDataModule(ShardedDataModule):
    """Training windows (length-bucketed batches of ``batch_size`` windows) and a seeded validation sample."""

    def __init__(
        self, split: Split, ids: SemanticIDs, *, max_history: int, batch_size: int = 128, eval_batch_size: int = 256,
        val_users: int | None = 1000, seed: int = 0, bucket_batches: int = 50,
    ) -> None:
        super().__init__(split, ids, batch_size=batch_size, eval_batch_size=eval_batch_size, max_history=max_history,
                         val_users=val_users, seed=seed, bucket_batches=bucket_batches)
        self.windows: Windows | None = None
        self.val: list[SeqBatch] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.windows is None:
            self.windows = training_windows(self.split.train, self.ids, self.max_history)
            if self.windows.start.numel() == 0:
                raise ValueError("no training examples: every user's training prefix has a single item")
            hist, tgt = split_histories(self.split, "valid", self._val_rows())
            self.val = eval_batches(hist, tgt, self.ids, self.max_history, self.eval_batch_size)

    @property
    def num_targets(self) -> int:
        assert self.windows is not None, "call setup() first"
        return int((self.windows.targets >= 0).sum())

    def train_sampler(self) -> BucketBatchSampler:
        assert self.windows is not None, "call setup() first"
        return self._sampler(self.windows.lengths)

    def padding_share(self) -> float:
        lengths = self.windows.lengths
        batches = self.train_sampler().batches()
        padded = sum(int(lengths[b].max()) * len(b) for b in batches)
        return 1.0 - float(lengths.sum()) / max(padded, 1)

    def train_dataloader(self) -> DataLoader:
        # resumable mid-epoch (generator.training.resume): Lightning saves and restores how many batches it served
        return ResumableLoader(_Indices(int(self.windows.start.numel())), batch_sampler=self.train_sampler(), collate_fn=_Collate(self.windows))

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None, "call setup() first"
        world, rank = self._world()
        mine = self.val[rank::world]
        return DataLoader(mine, batch_size=None, shuffle=False)
