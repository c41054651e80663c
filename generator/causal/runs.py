"""Evaluation and recommendation for runs of the causal design (``generator.evaluate`` and
``generator.recommend`` hand causal runs to these functions).

Decoders: ``beam`` (default), ``exact``, ``dense`` and ``hybrid``; the hybrid's blend weight is chosen on
validation users (never test users) and stored in ``RUN/hybrid.json`` keyed on the checkpoint, IDs and pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.causal.data import SeqBatch, eval_batches, history_batch, split_histories
from generator.causal.decode import DECODERS, CausalDecoders
from generator.datamodule import sample_users
from generator.hybrid import (
    ALPHA_FILE,
    DEFAULT_GRID,
    HybridCandidates,
    _alpha_key,
    _stored_alpha,
    choose_alpha,
)
from semid.data import Split
from semid.io import write_json
from semid.metrics import RankingMetrics

log = logging.getLogger(__name__)

AUTO = {"auto": "beam", "generate": "beam"}  # the T5 names that mean "the generative decoder" here


def resolve_decoder(name: str) -> str:
    name = AUTO.get(name, name)
    if name not in DECODERS:
        raise ValueError(f"`decoder` must be one of {['auto', *DECODERS]} for a causal run, got {name!r}")
    return name


def decoders_for(run: Any, name: str, *, split: Split | None = None, alpha: float | None = None, num_beams: int = 20,
                 num_candidates: int = 50, alpha_users: int | None = 2000, batch_size: int = 256, seed: int = 0) -> CausalDecoders:
    """The run's decoders, with the hybrid's alpha (given, stored for this checkpoint, or chosen on validation)."""
    dec = CausalDecoders(run.model, run.tree, torch.from_numpy(run.ids.item_ids), num_beams=num_beams,
                         num_candidates=num_candidates).refresh()
    if name == "hybrid":
        if alpha is None:
            alpha = _stored_alpha(run, dec.num_candidates)
        if alpha is None:
            if split is None:
                raise ValueError(
                    f"{run.path}: no blend weight chosen yet: pass `alpha`, or run `semid evaluate --run {run.path} "
                    "--split test --decoder hybrid` once to choose it on validation users"
                )
            alpha = choose_causal_alpha(run, dec, split, max_users=alpha_users, batch_size=batch_size, seed=seed)
        dec.alpha = float(alpha)
    return dec


def _states(run: Any, batch: SeqBatch, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return run.model.last_hidden(batch.histories.to(device), batch.lengths.to(device))


def choose_causal_alpha(run: Any, dec: CausalDecoders, split: Split, *, max_users: int | None, batch_size: int, seed: int,
                        metric: str = "ndcg@10") -> float:
    """Choose the blend weight on a seeded sample of validation users; store it in RUN/hybrid.json."""
    device = next(run.model.parameters()).device
    rows = sample_users(split.num_users, max_users, seed)
    hist, targets = split_histories(split, "valid", rows)
    parts, tgts = [], []
    for b in eval_batches(hist, targets, run.ids, run.max_history, batch_size):  # loop over batches of users
        with torch.inference_mode():
            parts.append(dec.hybrid_candidates(_states(run, b, device)))
        tgts.append(b.targets.numpy())
    cands = HybridCandidates(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in HybridCandidates._fields))
    choice = choose_alpha(cands, torch.from_numpy(np.concatenate(tgts)), DEFAULT_GRID, metric)
    write_json(Path(run.path) / ALPHA_FILE, {
        "alpha": choice.alpha, "metric": metric, "table": {str(a): v for a, v in choice.table.items()},
        "validation_users": int(rows.size), "num_candidates": dec.num_candidates, **_alpha_key(run)})
    log.info("hybrid: alpha %.2f chosen on %d validation users (%s by alpha: %s)", choice.alpha, rows.size, metric, choice.table)
    return choice.alpha


def evaluate_causal(run: Any, split: Split, which: str, *, ks: Sequence[int], num_beams: int, max_users: int | None, seed: int,
                    batch_size: int, decoder: str, device: torch.device, alpha: float | None) -> tuple[str, dict[str, float], int, int, int, float]:
    """(decoder name, metrics, users, invalid items, duplicate items, seconds) over the split's users."""
    name = resolve_decoder(decoder)
    run.model.to(device).eval()
    run.tree = run.tree.to(device)
    dec = decoders_for(run, name, split=split, alpha=alpha, num_beams=num_beams, batch_size=batch_size, seed=seed)
    rows = sample_users(split.num_users, max_users, seed)
    hist, targets = split_histories(split, which, rows)
    metrics = RankingMetrics(ks)
    known = torch.from_numpy(run.ids.item_ids)
    invalid = duplicates = 0
    start = time.perf_counter()
    for b in eval_batches(hist, targets, run.ids, run.max_history, batch_size):  # loop over batches of users
        res = dec.decode(name, _states(run, b, device), k=ks[-1])
        items = res.items.cpu()
        invalid += int((~torch.isin(items, known)).sum())
        duplicates += int((items.sort(1).values.diff(dim=1) == 0).sum())
        metrics.update(items, b.targets)
    return f"causal.{name}", metrics.compute(), metrics.count, invalid, duplicates, time.perf_counter() - start


def recommend_causal(run: Any, histories: list[np.ndarray], *, k: int, num_beams: int, decoder: str, batch_size: int,
                     alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(items (B, k), scores (B, k)) for histories of known item ids."""
    name = resolve_decoder(decoder)
    dec = decoders_for(run, name, alpha=alpha, num_beams=num_beams)
    device = next(run.model.parameters()).device
    run.model.eval()
    items = np.empty((len(histories), k), dtype=np.int64)
    scores = np.empty((len(histories), k), dtype=np.float32)
    for lo in range(0, len(histories), batch_size):  # loop over batches of histories
        b = history_batch(histories[lo : lo + batch_size], np.full(min(batch_size, len(histories) - lo), -1), run.ids, run.max_history)
        res = dec.decode(name, _states(run, b, device), k=k)
        items[lo : lo + len(b.lengths)] = res.items.cpu().numpy()
        scores[lo : lo + len(b.lengths)] = res.scores.float().cpu().numpy()
    return items, scores
