"""GeneratorDataModule: examples from a leave-one-out split, length-bucketed batches, sharded for DDP.

Training batches come from :class:`generator.training.examples.BucketBatchSampler`, which shards itself across processes
(so the trainer runs with ``use_distributed_sampler=False``). Validation uses a fixed, seeded sample of validation
users during training (``val_users``), the same users every time, so checkpoints are compared on equal terms.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from generator.training.examples import (
    MAX_HISTORY,
    BucketBatchSampler,
    Collator,
    ExampleDataset,
    Examples,
    history_examples,
    padding_stats,
    training_examples,
)
from generator.training.resume import ResumableLoader
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.split import Split

log = logging.getLogger(__name__)


def sample_users(num_users: int, max_users: int | None, seed: int) -> np.ndarray:
    """Sorted rows of a seeded random sample of ``max_users`` users (all of them when None or larger)."""
    if max_users is not None and (not isinstance(max_users, int) or max_users < 1):
        raise ValueError(f"`max_users` must be a positive int or None, got {max_users!r}")
    if max_users is None or max_users >= num_users:
        return np.arange(num_users)
    return np.sort(np.random.default_rng(seed).choice(num_users, size=max_users, replace=False))


def split_examples(
    split: Split,
    ids: SemanticIDs,
    layout: TokenLayout,
    which: str,
    *,
    rows: np.ndarray | None = None,
    max_history: int = MAX_HISTORY,
    use_user_tokens: bool = True,
) -> Examples:
    """The validation or test examples of ``split`` (one per user; ``rows`` picks users)."""
    if which not in ("valid", "test"):
        raise ValueError(f"`split` must be 'valid' or 'test', got {which!r}")
    rows = np.arange(split.num_users) if rows is None else np.asarray(rows)
    history = split.valid_history if which == "valid" else split.test_history
    targets = split.valid_targets if which == "valid" else split.test_targets
    return history_examples(
        [history(int(i)) for i in rows],
        targets[rows],
        split.user_ids[rows] if use_user_tokens else None,
        ids,
        layout,
        max_history=max_history,
    )


def eval_batches(lengths: np.ndarray, batch_size: int, rank: int = 0, num_replicas: int = 1) -> list[list[int]]:
    """This process's share of the examples, sorted by length, in batches of ``batch_size`` (deterministic)."""
    mine = np.arange(rank, len(lengths), num_replicas)
    mine = mine[np.argsort(lengths[mine], kind="stable")]
    return [mine[i : i + batch_size].tolist() for i in range(0, mine.size, batch_size)]


class GeneratorDataModule(L.LightningDataModule):
    """Training and validation data for :class:`generator.training.t5_system.GeneratorSystem`.

    Args:
        split: the leave-one-out split (``semid.data.leave_one_out``).
        ids, layout: the semantic IDs and the token layout (user tokens on iff ``layout.num_user_tokens > 0``).
        batch_size: training examples per batch (per process); eval_batch_size: users per decoding batch.
        val_users: validation users sampled (seeded) for validation during training; None for all of them.
        bucket_batches: batches' worth of examples sorted by length together (see BucketBatchSampler).
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
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be a positive int, got {eval_batch_size!r}")
        self.split, self.ids, self.layout = split, ids, layout
        self.batch_size, self.eval_batch_size, self.max_history = batch_size, eval_batch_size, max_history
        self.val_users, self.seed, self.bucket_batches, self.num_workers = val_users, seed, bucket_batches, num_workers
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
            rows = sample_users(self.split.num_users, self.val_users, self.seed)
            self.val_examples = split_examples(
                self.split, self.ids, self.layout, "valid", rows=rows,
                max_history=self.max_history, use_user_tokens=self.use_user_tokens,
            )
            stats = self.padding_stats()
            log.info(
                "%d training examples, %d validation users; padded share of encoder tokens %.1f%% (unbucketed %.1f%%)",
                len(self.train_examples), len(self.val_examples), 100 * stats.padded_share,
                100 * self.padding_stats(bucket_batches=1).padded_share,
            )

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_sampler(self, bucket_batches: int | None = None) -> BucketBatchSampler:
        assert self.train_examples is not None, "call setup() first"
        world, rank = self._world()
        return BucketBatchSampler(
            self.train_examples.input_lengths, self.batch_size, seed=self.seed,
            bucket_batches=self.bucket_batches if bucket_batches is None else bucket_batches,
            num_replicas=world, rank=rank,
        )

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
