"""A run's users and histories as batches of :class:`~generator.decoding.protocol.Histories`, per backbone.

T5 runs read encoder tokens (user token, code tokens of each history item; ``generator.training.examples``), the
item-level runs (causal, title) one position per item (``generator.training.causal_data``). Both batch evaluation
users by history length, in a deterministic order, so little is padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from generator.decoding.protocol import Histories
from generator.training import causal_data
from generator.training.examples import collate, history_examples
from generator.training.t5_data import eval_batches, split_examples
from semid.split import Split


class Labelled(NamedTuple):
    """One batch of evaluation users: their histories and held-out items (LongTensor (B,) item ids)."""

    histories: Histories
    targets: torch.Tensor


def _positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < lengths[:, None]  # (B, S) True at real positions


def split_batches(run: Any, split: Split, which: str, rows: np.ndarray, batch_size: int) -> list[Labelled]:
    """The ``which`` ("valid" | "test") users ``rows`` of ``split`` in batches of up to ``batch_size``."""
    if run.design == "t5":
        ex = split_examples(split, run.ids, run.layout, which, rows=rows, max_history=run.max_history,
                            use_user_tokens=run.use_user_tokens)
        out = []
        for index in eval_batches(ex.input_lengths, batch_size):  # loop over batches of users
            b = collate(ex, index, run.layout.pad_token_id)
            out.append(Labelled(Histories(b.input_ids, b.attention_mask.bool()), b.target))
        return out
    hist, targets = causal_data.split_histories(split, which, rows)
    return [Labelled(Histories(b.histories, _positions(b.lengths, b.histories.shape[1])), b.targets)
            for b in causal_data.eval_batches(hist, targets, run.ids, run.max_history, batch_size)]


def history_batches(run: Any, histories: list[np.ndarray], user_ids: np.ndarray | None, batch_size: int) -> list[Histories]:
    """Histories of known item ids (oldest first), in their order, in batches of up to ``batch_size``."""
    if run.design == "t5":
        ex = history_examples(histories, np.full(len(histories), -1), user_ids, run.ids, run.layout, max_history=run.max_history)
        out = []
        for lo in range(0, len(histories), batch_size):  # loop over batches of histories
            b = collate(ex, torch.arange(lo, min(lo + batch_size, len(histories))), run.layout.pad_token_id)
            out.append(Histories(b.input_ids, b.attention_mask.bool()))
        return out
    out = []
    for lo in range(0, len(histories), batch_size):  # loop over batches of histories
        part: Sequence[np.ndarray] = histories[lo : lo + batch_size]
        b = causal_data.history_batch(part, np.full(len(part), -1), run.ids, run.max_history)
        out.append(Histories(b.histories, _positions(b.lengths, b.histories.shape[1])))
    return out
