"""The T5 design's Lightning data module: training examples in length-bucketed batches (the shared sampler of
``generator.training.datamodules.ShardedDataModule``) and a seeded sample of validation users' examples."""

from __future__ import annotations

import logging

from torch.utils.data import DataLoader

from generator.t5.data import (
    MAX_HISTORY,
    Collator,
    ExampleDataset,
    Examples,
    eval_batches,
    split_examples,
    training_examples,
)
from generator.training.datamodules import ShardedDataModule
from generator.training.resume import ResumableLoader
from generator.training.sampling import BucketBatchSampler, padding_stats
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.split import Split

log = logging.getLogger(__name__)


class GeneratorDataModule(ShardedDataModule):
    """Training and validation data for :class:`generator.t5.system.GeneratorSystem`.

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
        batches = eval_batches(self.val_examples.input_lengths, self.eval_batch_size, rank, world)
        return DataLoader(
            ExampleDataset(self.val_examples), batch_sampler=batches,
            collate_fn=Collator(self.val_examples, self.layout.pad_token_id), num_workers=0,
        )
