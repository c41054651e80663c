"""The T5 design's featurisation: histories of code tokens -> the next item's code tokens (training and evaluation
examples, their collate, the evaluation examples of a leave-one-out split and their batches).

An example is a slice of one user's item sequence (the history, oldest first, at most ``max_history`` items) and
the item that follows it (the target). Examples are stored as index ranges into one flat array of every
position's code tokens, so building ~130k Beauty examples is a few vectorised numpy calls, and a batch is one
gather in the collate function::

    tokens   LongTensor (P, L)  code tokens of every position of every (kept) sequence, concatenated
    start    LongTensor (E,)    history of example e is tokens[start[e] : stop[e]]  (stop - start <= max_history)
    stop     LongTensor (E,)
    target   LongTensor (E,)    item id of the target (the item at position ``stop[e]`` for training examples)
    labels   LongTensor (E, L+1) the target's code tokens then eos; -100 (ignored) where the target is unknown
    user     LongTensor (E,)    user token of the example's user, or -1 without user tokens

Training examples come from each user's *training* prefix only (``Split.train``: everything but the last two
items), one per position t >= 1; validation and test examples are one per user, with the histories of the
leave-one-out protocol. So validation and test targets can never leak into training.

Encoder input: ``[user token] + tokens of the history items, oldest first`` (right-padded with pad in a batch).
Decoder labels: the target's L code tokens, then eos.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.safe_read import is_int
from semid.split import Split

log = logging.getLogger(__name__)

MAX_HISTORY = 20  # items, as in TIGER


class Batch(NamedTuple):
    """One padded batch. S is the longest encoder input in the batch, L the number of code levels."""

    input_ids: torch.Tensor  # LongTensor (B, S), right-padded with pad
    attention_mask: torch.Tensor  # LongTensor (B, S), 1 for real tokens
    labels: torch.Tensor  # LongTensor (B, L + 1): target code tokens, then eos
    target: torch.Tensor  # LongTensor (B,) target item ids


@dataclass(frozen=True)
class Examples:
    """A set of examples as index ranges into one flat token array (see the module docstring)."""

    tokens: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    user: torch.Tensor

    def __len__(self) -> int:
        return int(self.start.numel())

    @property
    def num_levels(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def input_lengths(self) -> np.ndarray:
        """Encoder input length of every example (user token included): int64 (E,)."""
        lengths = (self.stop - self.start) * self.num_levels + (self.user >= 0).long()
        return lengths.numpy()


def _item_tokens(ids: SemanticIDs, layout: TokenLayout, items: np.ndarray) -> torch.Tensor:
    """Code tokens of item ids (P,) -> LongTensor (P, L)."""
    return torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes_of(items)), dtype=np.int64))


def _labels(target_tokens: torch.Tensor, known: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(E, L) target code tokens -> (E, L + 1) labels with eos; rows where ``known`` is False are all -100."""
    eos = torch.full((target_tokens.shape[0], 1), layout.eos_token_id, dtype=torch.long)
    return torch.cat([target_tokens, eos], dim=1).masked_fill(~known[:, None], -100)


def _user_tokens(layout: TokenLayout, user_ids: np.ndarray, use_user_tokens: bool) -> torch.Tensor:
    if not use_user_tokens:
        return torch.full((len(user_ids),), -1, dtype=torch.long)
    return torch.from_numpy(np.asarray(layout.user_tokens(np.asarray(user_ids, dtype=np.int64)), dtype=np.int64))


def _check_max_history(max_history: int) -> int:
    """``max_history`` as a Python int (a numpy uint64 would turn int64 arithmetic into float64), or a ValueError."""
    if not is_int(max_history) or max_history < 1:
        raise ValueError(f"`max_history` must be a positive int, got {max_history!r}")
    return int(max_history)


def training_examples(
    sequences: Sequence[np.ndarray],
    user_ids: np.ndarray,
    ids: SemanticIDs,
    layout: TokenLayout,
    *,
    max_history: int = MAX_HISTORY,
    use_user_tokens: bool = True,
) -> Examples:
    """One example per position t >= 1 of each sequence: history ``seq[max(0, t - max_history):t]``, target ``seq[t]``.

    Args:
        sequences: U training sequences (``Split.train``), item ids oldest first; sequences of length 1 give none.
        user_ids: int (U,), the user of each sequence (hashed into user tokens when ``use_user_tokens``).
    """
    max_history = _check_max_history(max_history)
    if len(sequences) != len(user_ids):
        raise ValueError(f"`user_ids` must have one entry per sequence ({len(sequences)}), got {len(user_ids)}")
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = np.concatenate(sequences) if len(sequences) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # positions t >= 1 of every sequence, as global indices into `flat`
    per_user = np.maximum(lengths - 1, 0)
    owner = np.repeat(np.arange(len(sequences)), per_user)  # (E,)
    t = np.arange(per_user.sum()) - np.repeat(np.cumsum(per_user) - per_user, per_user) + 1  # (E,) in [1, len)
    stop = offsets[owner] + t
    start = np.maximum(offsets[owner], stop - max_history)
    users = _user_tokens(layout, user_ids, use_user_tokens)
    tokens = _item_tokens(ids, layout, flat)
    target = torch.from_numpy(flat[stop])
    return Examples(
        tokens=tokens,
        start=torch.from_numpy(start),
        stop=torch.from_numpy(stop),
        target=target,
        labels=_labels(tokens[torch.from_numpy(stop)], torch.ones_like(target, dtype=torch.bool), layout),
        user=users[torch.from_numpy(owner)],
    )


def history_examples(
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    user_ids: np.ndarray | None,
    ids: SemanticIDs,
    layout: TokenLayout,
    *,
    max_history: int = MAX_HISTORY,
) -> Examples:
    """One example per history (validation, test, or a request): its last ``max_history`` items -> target.

    Args:
        histories: B non-empty arrays of item ids, oldest first.
        targets: int (B,) target item ids (-1 where unknown, e.g. for recommendations).
        user_ids: int (B,) users to hash into user tokens, or None for no user token.
    """
    max_history = _check_max_history(max_history)
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    if (lengths == 0).any():
        raise ValueError(f"history {int(np.flatnonzero(lengths == 0)[0])} is empty: every history needs at least one item")
    flat = np.concatenate(histories).astype(np.int64) if len(histories) else np.zeros(0, np.int64)
    stop = np.cumsum(lengths)
    start = np.maximum(stop - lengths, stop - max_history)
    users = (
        _user_tokens(layout, user_ids, True)
        if user_ids is not None
        else torch.full((len(histories),), -1, dtype=torch.long)
    )
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (len(histories),):
        raise ValueError(f"`targets` must have shape ({len(histories)},), got {targets.shape}")
    known = targets >= 0
    target_tokens = torch.zeros((len(histories), layout.num_levels), dtype=torch.long)
    target_tokens[torch.from_numpy(known)] = _item_tokens(ids, layout, targets[known])
    return Examples(
        tokens=_item_tokens(ids, layout, flat),
        start=torch.from_numpy(start),
        stop=torch.from_numpy(stop),
        target=torch.from_numpy(targets),
        labels=_labels(target_tokens, torch.from_numpy(known), layout),
        user=users,
    )


def collate(examples: Examples, index: Sequence[int] | torch.Tensor, pad_token_id: int) -> Batch:
    """Gather and right-pad a batch of examples to its own longest input (dynamic padding)."""
    index = torch.as_tensor(index, dtype=torch.long)
    B, L = index.numel(), examples.num_levels
    start, stop, user = examples.start[index], examples.stop[index], examples.user[index]
    n_items = stop - start  # (B,)
    T = int(n_items.max()) if B else 0
    pos = start[:, None] + torch.arange(T)  # (B, T) positions into tokens
    real = torch.arange(T)[None, :] < n_items[:, None]  # (B, T)
    hist = examples.tokens[pos.clamp_max(examples.tokens.shape[0] - 1)]  # (B, T, L)
    hist = hist.masked_fill(~real[:, :, None], pad_token_id).reshape(B, T * L)  # (B, T*L)
    has_user = user >= 0  # (B,)
    # one leading column for the user token; rows without one are shifted left so padding stays at the end
    input_ids = torch.cat([user.clamp_min(0)[:, None], hist], dim=1)  # (B, 1 + T*L)
    mask = torch.cat([has_user[:, None], real.repeat_interleave(L, dim=1)], dim=1)  # (B, 1 + T*L)
    if not bool(has_user.all()):
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
        input_ids, mask = input_ids.gather(1, order), mask.gather(1, order)
    S = int(mask.sum(1).max()) if B else 0
    input_ids = input_ids[:, :S].masked_fill(~mask[:, :S], pad_token_id)
    return Batch(input_ids, mask[:, :S].long(), examples.labels[index], examples.target[index])


class ExampleDataset(Dataset):
    """Indexes into an :class:`Examples`; the collate function (:class:`Collator`) does the gathering."""

    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> int:
        return i


class Collator:
    """``collate_fn`` for a DataLoader over an :class:`ExampleDataset` (picklable, for worker processes and DDP)."""

    def __init__(self, examples: Examples, pad_token_id: int) -> None:
        self.examples, self.pad_token_id = examples, pad_token_id

    def __call__(self, index: list[int]) -> Batch:
        return collate(self.examples, index, self.pad_token_id)


# ---- evaluation examples of a split ----------------------------------------------------------------------------
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
