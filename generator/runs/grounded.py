"""``codes-grounded`` on a causal semantic-ID run: evaluation and recommendation (``generator.runs.evaluate`` and
``generator.runs.recommend`` hand these calls here), in the same format as every other decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from generator.runs.causal import rank_split, recommend_batches
from generator.decoding.grounding import CODES_GROUNDED, GroundedCodeDecoders, GroundingStats
from semid.data import Split


def grounded_code_decoders(run: Any, *, num_beams: int) -> GroundedCodeDecoders:
    return GroundedCodeDecoders(run.model, run.tree, torch.from_numpy(run.ids.item_ids), num_beams=num_beams).refresh()


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
    return recommend_batches(run, histories, lambda h: dec.decode(CODES_GROUNDED, h, k=k), k=k, batch_size=batch_size)
