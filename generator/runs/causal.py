"""Evaluation and recommendation for runs of the causal design (``generator.runs.evaluate`` and
``generator.runs.recommend`` hand causal runs to these functions).

Decoders: ``beam`` (default), ``exact``, ``dense`` and ``hybrid``; the hybrid's fusion is chosen on validation users
(never test users) and stored in ``RUN/hybrid.json`` keyed on the checkpoint, IDs and candidate count.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.training.causal_data import SeqBatch, eval_batches, history_batch, split_histories
from generator.decoding.causal import DECODERS, CausalDecoders
from generator.decoding.fusion import FusionChoice, Parts, check_fusion, choose_fusion
from generator.training.t5_data import sample_users
from generator.decoding.t5_hybrid import ALPHA_FILE, _alpha_key
from semid.data import Split
from semid.io import write_json
from semid.metrics import RankingMetrics
from semid.tree import PrefixTree

log = logging.getLogger(__name__)

AUTO = {"auto": "beam", "generate": "beam"}  # the T5 names that mean "the generative decoder" here


def resolve_decoder(name: str) -> str:
    name = AUTO.get(name, name)
    if name not in DECODERS:
        raise ValueError(f"`decoder` must be one of {['auto', *DECODERS]} for a causal run, got {name!r}")
    return name


def decoders_for(run: Any, name: str, *, split: Split | None = None, alpha: float | None = None, num_beams: int = 20,
                 num_candidates: int = 50, alpha_users: int | None = 5000, batch_size: int = 256, seed: int = 0) -> CausalDecoders:
    """The run's decoders, with the hybrid's fusion: the pool blend with a given ``alpha``, else the fusion stored for
    this checkpoint, else one chosen on validation users (``alpha_users`` to fit, as many others to choose)."""
    dec = CausalDecoders(run.model, run.tree, torch.from_numpy(run.ids.item_ids), num_beams=num_beams,
                         num_candidates=num_candidates, alpha=alpha, trained_tree=trained_tree(run)).refresh()
    if name == "hybrid" and dec.fusion is None:
        dec.fusion = stored_fusion(run, dec.num_candidates)
        if dec.fusion is None:
            if split is None:
                raise ValueError(
                    f"{run.path}: no fusion chosen yet: pass `alpha`, or run `semid evaluate --run {run.path} "
                    "--split test --decoder hybrid` once to choose it on validation users"
                )
            choice = choose_causal_fusion(run, dec, split, max_users=alpha_users, batch_size=batch_size, seed=seed)
            dec.fusion = (choice.kind, choice.params)
    return dec


def trained_tree(run: Any) -> PrefixTree | None:
    """The prefix tree of the items the run's model was trained with, when items were added since (else None)."""
    n0 = run.model.trained_items
    if n0 == run.ids.num_items:
        return None
    return PrefixTree.from_semantic_ids(run.ids.head(n0), run.layout).to(run.tree.device)


def _states(run: Any, batch: SeqBatch, device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return run.model.last_hidden(batch.histories.to(device), batch.lengths.to(device))


def validation_parts(run: Any, dec: CausalDecoders, split: Split, rows: np.ndarray, *, batch_size: int) -> tuple[Parts, torch.Tensor]:
    """(parts, target rows) of the given validation users (CPU tensors)."""
    device = next(run.model.parameters()).device
    hist, targets = split_histories(split, "valid", rows)
    parts, tgts = [], []
    for b in eval_batches(hist, targets, run.ids, run.max_history, batch_size):  # loop over batches of users
        with torch.inference_mode():
            parts.append(Parts(*(t.cpu() for t in dec.parts(_states(run, b, device)))))
        tgts.append(b.targets)
    out = Parts(*(torch.cat([getattr(p, f) for p in parts]) for f in ("exact", "dense", "gen_rows")), parts[0].cold_rows)
    return out, torch.from_numpy(run.ids.rows_of(torch.cat(tgts).numpy()))


def choose_causal_fusion(run: Any, dec: CausalDecoders, split: Split, *, max_users: int | None, batch_size: int,
                         seed: int) -> FusionChoice:
    """Fit every fusion on a seeded sample of validation users and choose one on as many other validation users;
    store the choice in RUN/hybrid.json (keyed on the checkpoint, IDs and candidate count)."""
    n = split.num_users if max_users is None else min(2 * max_users, split.num_users)
    if n < 2:
        raise ValueError(f"the hybrid's fusion is fitted on validation users and chosen on others, but the split has "
                         f"{split.num_users} validation user(s) (max_users {max_users}): pass `alpha` instead")
    rows = np.random.default_rng(seed).permutation(sample_users(split.num_users, n, seed))  # user order is not random
    fit_rows, select_rows = np.sort(rows[: n // 2]), np.sort(rows[n // 2 :])
    fit, fit_t = validation_parts(run, dec, split, fit_rows, batch_size=batch_size)
    sel, sel_t = validation_parts(run, dec, split, select_rows, batch_size=batch_size)
    choice = choose_fusion(fit, fit_t, sel, sel_t)
    write_json(Path(run.path) / ALPHA_FILE, {
        "fusion": choice.kind, "params": choice.params, "metric": "ndcg@10", "table": choice.table,
        "validation_users": {"fit": int(fit_rows.size), "select": int(select_rows.size)},
        "num_candidates": dec.num_candidates, **_alpha_key(run)})
    log.info("hybrid: fusion %s %s chosen on %d + %d validation users (%s)", choice.kind, choice.params,
             fit_rows.size, select_rows.size, {k: round(v["select_ndcg@10"], 4) for k, v in choice.table.items()})
    return choice


def stored_fusion(run: Any, num_candidates: int) -> tuple[str, dict] | None:
    """The fusion in RUN/hybrid.json if it was chosen for this checkpoint (path and content), IDs and candidate count."""
    path = Path(run.path) / ALPHA_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise TypeError(f"a JSON object expected, got {type(stored).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path}: corrupt hybrid fusion file ({type(e).__name__}: {e}); delete it to choose the fusion "
                         "again, or pass `alpha`") from e
    stale = [name for name, value in _alpha_key(run).items() if stored.get(name) != value]
    if stored.get("num_candidates") != num_candidates:
        stale.append("num_candidates")
    if "fusion" not in stored:
        stale.append("fusion (a blend weight stored by an earlier semid)")
    if stale:
        log.info("%s was chosen for another %s; choosing the fusion again", path, ", ".join(stale))
        return None
    try:
        kind, params = stored["fusion"], stored["params"]
        check_fusion(kind, params)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt hybrid fusion file ({type(e).__name__}: {e}); delete it to choose the fusion "
                         "again, or pass `alpha`") from e
    return kind, params


def evaluate_causal(run: Any, split: Split, which: str, *, ks: Sequence[int], num_beams: int, max_users: int | None, seed: int,
                    batch_size: int, decoder: str, device: torch.device, alpha: float | None) -> tuple[str, dict[str, float], int, int, int, float]:
    """(decoder name, metrics, users, invalid items, duplicate items, seconds) over the split's users."""
    name = resolve_decoder(decoder)
    run.model.to(device).eval()
    run.tree = run.tree.to(device)
    dec = decoders_for(run, name, split=split, alpha=alpha, num_beams=num_beams, batch_size=batch_size, seed=seed)
    return (f"causal.{name}", *rank_split(run, split, which, lambda h: dec.decode(name, h, k=ks[-1]).items, ks=ks,
                                          max_users=max_users, seed=seed, batch_size=batch_size, device=device))


def rank_split(run: Any, split: Split, which: str, decode: Callable[[torch.Tensor], torch.Tensor], *, ks: Sequence[int],
               max_users: int | None, seed: int, batch_size: int, device: torch.device) -> tuple[dict[str, float], int, int, int, float]:
    """Rank for every (sampled) user of the split with ``decode``: states (B, D) -> item ids (B, max k), over the
    run's backbone states. Returns (metrics, users, invalid items, duplicate items, seconds)."""
    rows = sample_users(split.num_users, max_users, seed)
    hist, targets = split_histories(split, which, rows)
    metrics = RankingMetrics(ks)
    known = torch.from_numpy(run.ids.item_ids)
    invalid = duplicates = 0
    start = time.perf_counter()
    for b in eval_batches(hist, targets, run.ids, run.max_history, batch_size):  # loop over batches of users
        items = decode(_states(run, b, device)).cpu()
        invalid += int((~torch.isin(items, known)).sum())
        duplicates += int((items.sort(1).values.diff(dim=1) == 0).sum())
        metrics.update(items, b.targets)
    return metrics.compute(), metrics.count, invalid, duplicates, time.perf_counter() - start


def recommend_causal(run: Any, histories: list[np.ndarray], *, k: int, num_beams: int, decoder: str, batch_size: int,
                     alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(items (B, k), scores (B, k)) for histories of known item ids."""
    name = resolve_decoder(decoder)
    dec = decoders_for(run, name, alpha=alpha, num_beams=num_beams)
    return recommend_batches(run, histories, lambda h: dec.decode(name, h, k=k), k=k, batch_size=batch_size)


def recommend_batches(run: Any, histories: list[np.ndarray], decode: Callable[[torch.Tensor], Any], *, k: int,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(items (B, k), scores (B, k)) of ``decode``: backbone states (b, D) -> a result with items and scores (b, k),
    over the run's states of each batch of histories (known item ids)."""
    device = next(run.model.parameters()).device
    run.model.eval()
    items = np.empty((len(histories), k), dtype=np.int64)
    scores = np.empty((len(histories), k), dtype=np.float32)
    for lo in range(0, len(histories), batch_size):  # loop over batches of histories
        b = history_batch(histories[lo : lo + batch_size], np.full(min(batch_size, len(histories) - lo), -1), run.ids, run.max_history)
        res = decode(_states(run, b, device))
        items[lo : lo + len(b.lengths)] = res.items.cpu().numpy()
        scores[lo : lo + len(b.lengths)] = res.scores.float().cpu().numpy()
    return items, scores
