"""Item-level data for the causal generator: one row per user window, every position a next-item target.

Training: each user's training sequence ``s`` (n items) gives inputs ``s[:-1]`` and targets ``s[1:]``, cut into
windows of at most ``max_history`` positions from the end backwards, so every training target is predicted once
per epoch, each with as much history as the window holds (SASRec keeps only the last window; nothing is dropped
here). Validation and test: the last ``max_history`` items of the history, and the held-out item.

Items travel as rows of the semantic IDs **plus one** (0 is padding); batches are right-padded, which a causal
model never attends to from a real position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from semid.ids import SemanticIDs
from semid.safe_read import is_int
from semid.split import Split


class Windows(NamedTuple):
    """Windows over one flat array of item rows + 1. Window w is ``inputs[start[w]:stop[w]]``, its targets the
    rows at the next positions (``targets`` shares the indexing; -1 where a window has no target)."""

    inputs: torch.Tensor  # LongTensor (F,) rows + 1
    targets: torch.Tensor  # LongTensor (F,) rows (0-based) of the next item
    start: torch.Tensor  # LongTensor (W,)
    stop: torch.Tensor  # LongTensor (W,)

    @property
    def lengths(self) -> np.ndarray:
        return (self.stop - self.start).numpy()


class SeqBatch(NamedTuple):
    """histories: LongTensor (B, T) rows + 1, right-padded with 0; lengths: (B,); targets: (B, T) rows, -1 = none
    (training) or (B,) the held-out item id (evaluation)."""

    histories: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor


def training_windows(sequences: Sequence[np.ndarray], ids: SemanticIDs, max_history: int) -> Windows:
    """All next-item targets of the training sequences, in windows of at most ``max_history`` positions."""
    if not is_int(max_history) or max_history < 1:
        raise ValueError(f"`max_history` must be a positive int, got {max_history!r}")
    max_history = int(max_history)  # (a numpy uint64 would turn int64 arithmetic into float64)
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
    if not seqs:
        return Windows(*(torch.zeros(0, dtype=torch.long) for _ in range(4)))
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = np.concatenate(seqs)
    rows = ids.rows_of(flat)  # raises on an item without a semantic ID
    seq_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # inputs are positions 0 .. n-2 of each sequence, targets 1 .. n-1: windows cut from the end of the inputs
    n_pos = lengths - 1
    n_win = -(-n_pos // max_history)
    owner = np.repeat(np.arange(len(seqs)), n_win)
    j = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window index from the end
    stop = seq_start[owner] + n_pos[owner] - j * max_history
    start = np.maximum(seq_start[owner], stop - max_history)
    targets = np.full(flat.shape, -1, dtype=np.int64)
    has_next = np.ones(flat.shape, dtype=bool)
    has_next[np.cumsum(lengths) - 1] = False  # a sequence's last item has no next item
    targets[has_next] = rows[np.flatnonzero(has_next) + 1]
    return Windows(torch.from_numpy(rows + 1), torch.from_numpy(targets), torch.from_numpy(start), torch.from_numpy(stop))


def collate_windows(w: Windows, index: Sequence[int] | torch.Tensor) -> SeqBatch:
    """Right-padded batch of windows ``index``; targets -1 at padding."""
    index = torch.as_tensor(index, dtype=torch.long)
    start, stop = w.start[index], w.stop[index]
    lengths = stop - start
    T = int(lengths.max())
    pos = start[:, None] + torch.arange(T)[None, :]  # (B, T)
    real = torch.arange(T)[None, :] < lengths[:, None]
    pos = torch.where(real, pos, 0)
    hist = torch.where(real, w.inputs[pos], 0)
    tgt = torch.where(real, w.targets[pos], -1)
    return SeqBatch(hist, lengths, tgt)


def history_batch(histories: Sequence[np.ndarray], targets: np.ndarray, ids: SemanticIDs, max_history: int) -> SeqBatch:
    """The last ``max_history`` items of each (non-empty) history, right-padded; targets are item ids (-1: none)."""
    cut = [np.asarray(h, dtype=np.int64)[-max_history:] for h in histories]
    if len(cut) == 1 and len(cut[0]):  # one history (a single user's call): no padding to lay out
        rows = torch.from_numpy(ids.rows_of(cut[0]) + 1)[None]
        return SeqBatch(rows, torch.tensor([rows.shape[1]]), torch.as_tensor(np.asarray(targets, dtype=np.int64)))
    lengths = torch.tensor([len(h) for h in cut], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError(f"history {int(torch.nonzero(lengths == 0)[0])} is empty: a history needs at least one item")
    T = int(lengths.max())
    flat_rows = torch.from_numpy(ids.rows_of(np.concatenate(cut)) + 1)
    start = torch.cumsum(lengths, 0) - lengths  # (B,) offset of each history in flat_rows
    pos = start[:, None] + torch.arange(T)[None, :]  # (B, T), laid out in one gather
    real = torch.arange(T)[None, :] < lengths[:, None]
    hist = torch.where(real, flat_rows[torch.where(real, pos, 0)], 0)
    return SeqBatch(hist, lengths, torch.as_tensor(np.asarray(targets, dtype=np.int64)))


def split_histories(split: Split, which: str, rows: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, targets) of the validation or test users ``rows`` (all by default)."""
    if which not in ("valid", "test"):
        raise ValueError(f"`split` must be 'valid' or 'test', got {which!r}")
    rows = np.arange(split.num_users) if rows is None else np.asarray(rows)
    history = split.valid_history if which == "valid" else split.test_history
    targets = split.valid_targets if which == "valid" else split.test_targets
    return [history(int(i)) for i in rows], targets[rows]


def eval_order(histories: Sequence[np.ndarray], max_history: int) -> np.ndarray:
    """The order :func:`eval_batches` takes the histories in: by the length read (at most ``max_history``), stable."""
    return np.argsort([min(len(h), max_history) for h in histories], kind="stable")


def eval_batches(histories: Sequence[np.ndarray], targets: np.ndarray, ids: SemanticIDs, max_history: int, batch_size: int) -> list[SeqBatch]:
    """Evaluation batches sorted by history length (little padding), in a deterministic order (:func:`eval_order`)."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    order = eval_order(histories, max_history)
    return [
        history_batch([histories[i] for i in order[lo : lo + batch_size]], np.asarray(targets)[order[lo : lo + batch_size]], ids, max_history)
        for lo in range(0, len(order), batch_size)
    ]
