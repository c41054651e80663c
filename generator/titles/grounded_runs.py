"""``codes-grounded`` on a causal semantic-ID run: evaluation and recommendation (``generator.evaluate`` and
``generator.recommend`` hand these calls here), in the same format as every other decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from generator.causal.data import history_batch
from generator.causal.runs import rank_split
from generator.titles.grounding import CODES_GROUNDED, GroundedCodeDecoders, GroundingStats
from semid.data import Split


def grounded_code_decoders(run: Any, *, num_beams: int) -> GroundedCodeDecoders:
    return GroundedCodeDecoders(run.model, run.tree, torch.from_numpy(run.ids.item_ids), num_beams=num_beams).refresh()


def _states(run: Any, histories: torch.Tensor, lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return run.model.last_hidden(histories.to(device), lengths.to(device))


def evaluate_grounded_codes(run: Any, split: Split, which: str, *, ks: Sequence[int], num_beams: int, max_users: int | None,
                            seed: int, batch_size: int, device: torch.device
                            ) -> tuple[str, dict[str, float], int, int, int, float, GroundingStats]:
    """(decoder name, metrics, users, invalid items, duplicate items, seconds, grounding stats)."""
    run.model.to(device).eval()
    run.tree = run.tree.to(device)
    dec = grounded_code_decoders(run, num_beams=num_beams)
    ranked = rank_split(run, split, which, lambda h: dec.decode(CODES_GROUNDED, h, k=ks[-1]).items, ks=ks,
                        max_users=max_users, seed=seed, batch_size=batch_size, device=device)
    return f"causal.{CODES_GROUNDED}", *ranked, dec.stats


def recommend_grounded_codes(run: Any, histories: list[np.ndarray], *, k: int, num_beams: int, batch_size: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    dec = grounded_code_decoders(run, num_beams=num_beams)
    device = next(run.model.parameters()).device
    run.model.eval()
    items = np.empty((len(histories), k), dtype=np.int64)
    scores = np.empty((len(histories), k), dtype=np.float32)
    for lo in range(0, len(histories), batch_size):  # loop over batches of histories
        b = history_batch(histories[lo : lo + batch_size], np.full(min(batch_size, len(histories) - lo), -1), run.ids, run.max_history)
        res = dec.decode(CODES_GROUNDED, _states(run, b.histories, b.lengths, device), k=k)
        items[lo : lo + len(b.lengths)] = res.items.cpu().numpy()
        scores[lo : lo + len(b.lengths)] = res.scores.float().cpu().numpy()
    return items, scores
