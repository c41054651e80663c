"""The Lightning data modules of the designs: training batches (length-bucketed, sharded for DDP, resumable mid-epoch)
and a fixed, seeded sample of validation users, the same every validation, so checkpoints are compared on equal terms.

The featurisation itself (examples, windows, evaluation batches) is Lightning-free (``generator.training.examples``,
``t5_data``, ``causal_data``), so that serving a run never imports Lightning; only training reads this module.
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
from generator.training.examples import (
    MAX_HISTORY,
    BucketBatchSampler,
    Collator,
    ExampleDataset,
    Examples,
    padding_stats,
    training_examples,
)
from generator.training.resume import ResumableLoader
from generator.training.t5_data import eval_batches as t5_eval_batches
from generator.training.t5_data import sample_users, split_examples
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.split import Split

log = logging.getLogger(__name__)


class _Sharded(L.LightningDataModule):
    """What both data modules share: checked batch sizes, a seeded sample of validation users, and length-bucketed
    training batches sharded across the trainer's processes (``bucket_batches``: batches' worth of examples sorted
    by length together, see BucketBatchSampler)."""

    def __init__(self, split: Split, ids: SemanticIDs, *, batch_size: int, eval_batch_size: int, max_history: int,
                 val_users: int | None, seed: int, bucket_batches: int) -> None:
        super().__init__()
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        self.split, self.ids, self.max_history = split, ids, max_history
        self.batch_size, self.eval_batch_size, self.val_users = batch_size, eval_batch_size, val_users
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


class GeneratorDataModule(_Sharded):
    """Training and validation data for :class:`generator.training.t5_system.GeneratorSystem`.

    Args:
        split: the leave-one-out split (``semid.data.leave_one_out``).
        ids, layout: the semantic IDs and the token layout (user tokens on iff ``layout.num_user_tokens > 0``).
        batch_size: training examples per batch (per process); eval_batch_size: users per decoding batch.
        val_users: validation users sampled (seeded) for validation during training; None for all of them.
    """

    def __init__(
        self,
        split: Split,
        ids: SemanticIDs,
        layout: TokenLayout,
        *,
        batch_size: int = 256,
        eval_batch_size: int = 128,
        max_history: int = MAX_HISTORY,
        val_users: int | None = 1000,
        seed: int = 0,
        bucket_batches: int = 50,
        num_workers: int = 0,
    ) -> None:
        super().__init__(split, ids, batch_size=batch_size, eval_batch_size=eval_batch_size, max_history=max_history,
                         val_users=val_users, seed=seed, bucket_batches=bucket_batches)
        self.layout, self.num_workers = layout, num_workers
        self.use_user_tokens = layout.num_user_tokens > 0
        self.train_examples: Examples | None = None
        self.val_examples: Examples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is None:
            self.train_examples = training_examples(
                self.split.train, self.split.user_ids, self.ids, self.layout,
                max_history=self.max_history, use_user_tokens=self.use_user_tokens,
            )
            if len(self.train_examples) == 0:
                raise ValueError("no training examples: every user's training prefix has a single item")
            self.val_examples = split_examples(
                self.split, self.ids, self.layout, "valid", rows=self._val_rows(),
                max_history=self.max_history, use_user_tokens=self.use_user_tokens,
            )
            stats = self.padding_stats()
            log.info(
                "%d training examples, %d validation users; padded share of encoder tokens %.1f%% (unbucketed %.1f%%)",
                len(self.train_examples), len(self.val_examples), 100 * stats.padded_share,
                100 * self.padding_stats(bucket_batches=1).padded_share,
            )

    def train_sampler(self, bucket_batches: int | None = None) -> BucketBatchSampler:
        assert self.train_examples is not None, "call setup() first"
        return self._sampler(self.train_examples.input_lengths, bucket_batches)

    def padding_share(self) -> float:
        """Padded share of the encoder tokens of one epoch's training batches."""
        return self.padding_stats().padded_share

    @property
    def num_targets(self) -> int:
        assert self.train_examples is not None, "call setup() first"
        return len(self.train_examples)

    def padding_stats(self, bucket_batches: int | None = None):
        """Padded share of the encoder tokens of one epoch's training batches."""
        assert self.train_examples is not None, "call setup() first"
        return padding_stats(self.train_examples.input_lengths, self.train_sampler(bucket_batches).batches())

    def train_dataloader(self) -> DataLoader:
        assert self.train_examples is not None, "call setup() first"
        # resumable mid-epoch (generator.training.resume): Lightning saves and restores how many batches it served
        return ResumableLoader(
            ExampleDataset(self.train_examples), batch_sampler=self.train_sampler(),
            collate_fn=Collator(self.train_examples, self.layout.pad_token_id), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_examples is not None, "call setup() first"
        world, rank = self._world()
        batches = t5_eval_batches(self.val_examples.input_lengths, self.eval_batch_size, rank, world)
        return DataLoader(
            ExampleDataset(self.val_examples), batch_sampler=batches,
            collate_fn=Collator(self.val_examples, self.layout.pad_token_id), num_workers=0,
        )


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


class CausalDataModule(_Sharded):
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
