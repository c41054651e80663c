"""The hybrid's fusion, chosen on validation users of a run and stored in ``RUN/hybrid.json``.

- T5 runs: the blend weight ``alpha`` of ``generator.decoding.t5_hybrid`` (its candidate pool: beam top-C plus dense
  top-C, teacher-forced), chosen by NDCG@10 on a seeded sample of validation users.
- Causal runs: one of the fusions of ``generator.decoding.fusion`` with its parameters, fitted on one seeded sample of
  validation users and chosen on a second, disjoint one (user order is not random in Beauty: the sample is shuffled
  before it is halved).

Never test users. A stored choice is reused only for the same checkpoint (path and sha256), semantic IDs (digest),
candidate count and pool; anything else is chosen again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding.causal import CausalDecoders
from generator.decoding.fusion import FusionChoice, Parts, check_fusion, choose_fusion
from generator.decoding.t5_hybrid import DEFAULT_GRID, AlphaChoice, HybridCandidates, T5Hybrid, choose_alpha
from generator.models.checkpoint import ids_digest
from generator.runs.batches import split_batches
from generator.runs.folder import HYBRID_FILE
from generator.training.t5_data import sample_users
from semid.io import write_json
from semid.split import Split

log = logging.getLogger(__name__)

POOL = "union"  # the T5 candidate pool an alpha was chosen for: beam top-C plus dense top-C, teacher-forced scores


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def choice_key(run: Any) -> dict[str, str]:
    """What a stored choice depends on besides the candidate count: the exact checkpoint (path and content), the IDs
    and the candidate pool (an alpha chosen for the beam-only pool of older versions, which has no "pool", is stale)."""
    return {"checkpoint": str(Path(run.checkpoint).resolve()), "checkpoint_sha256": _file_digest(Path(run.checkpoint)),
            "ids_sha256": ids_digest(run.ids), "pool": POOL}


def _read(path: Path, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise TypeError(f"a JSON object expected, got {type(stored).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path}: corrupt hybrid {what} file ({type(e).__name__}: {e}); delete it to choose the {what} "
                         "again, or pass `alpha`") from e
    return stored


def _stale(run: Any, stored: dict[str, Any], num_candidates: int, key: dict[str, str] | None) -> list[str]:
    key = choice_key(run) if key is None else key
    stale = [name for name, value in key.items() if stored.get(name) != value]
    if stored.get("num_candidates") != num_candidates:
        stale.append("num_candidates")
    return stale


# ---- T5 runs: the blend weight -----------------------------------------------------------------------------------
def stored_alpha(run: Any, num_candidates: int, key: dict[str, str] | None = None) -> float | None:
    """The alpha in RUN/hybrid.json if it was chosen for this checkpoint (path and content), IDs and candidate count
    (``key``: :func:`choice_key` of the run, when the caller has it)."""
    path = Path(run.path) / HYBRID_FILE
    stored = _read(path, "blend-weight")
    if stored is None:
        return None
    try:
        alpha = float(stored["alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt hybrid blend-weight file ({type(e).__name__}: {e}); delete it to choose alpha "
                         "again, or pass `alpha`") from e
    stale = _stale(run, stored, num_candidates, key)
    if stale:
        log.info("%s was chosen for another %s", path, ", ".join(stale))
        return None
    return alpha


def validation_candidates(run: Any, decoder: T5Hybrid, split: Split, *, max_users: int | None, batch_size: int,
                          seed: int) -> tuple[HybridCandidates, np.ndarray]:
    """Hybrid candidates (U, W) of a seeded sample of validation users, and their targets (U,)."""
    device = next(run.model.parameters()).device
    parts, targets = [], []
    for b in split_batches(run, split, "valid", sample_users(split.num_users, max_users, seed), batch_size):  # loop over batches
        parts.append(decoder.candidates(b.histories.to(device)))
        targets.append(b.targets.numpy())
    cands = HybridCandidates(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in HybridCandidates._fields))
    return cands, np.concatenate(targets)


def choose_t5_alpha(run: Any, decoder: T5Hybrid, split: Split, *, max_users: int | None = 2000, batch_size: int = 64,
                    seed: int = 0, metric: str = "ndcg@10") -> AlphaChoice:
    """Choose the blend weight on validation users and store it in ``RUN/hybrid.json``."""
    cands, targets = validation_candidates(run, decoder, split, max_users=max_users, batch_size=batch_size, seed=seed)
    choice = choose_alpha(cands, torch.from_numpy(targets), DEFAULT_GRID, metric)
    write_json(
        Path(run.path) / HYBRID_FILE,
        {"alpha": choice.alpha, "metric": metric, "table": {str(a): v for a, v in choice.table.items()},
         "validation_users": int(targets.size), "num_candidates": decoder.num_candidates, **choice_key(run)},
    )
    log.info("hybrid: alpha %.2f chosen on %d validation users (%s by alpha: %s)", choice.alpha, targets.size, metric, choice.table)
    return choice


# ---- causal runs: the fusion ---------------------------------------------------------------------------------------
def stored_fusion(run: Any, num_candidates: int, key: dict[str, str] | None = None) -> tuple[str, dict] | None:
    """The fusion in RUN/hybrid.json if it was chosen for this checkpoint (path and content), IDs and candidate count
    (``key``: :func:`choice_key` of the run, when the caller has it)."""
    path = Path(run.path) / HYBRID_FILE
    stored = _read(path, "fusion")
    if stored is None:
        return None
    stale = _stale(run, stored, num_candidates, key)
    if "fusion" not in stored:
        stale.append("fusion (a blend weight stored by an earlier semid)")
    if stale:
        log.info("%s was chosen for another %s", path, ", ".join(stale))
        return None
    try:
        kind, params = stored["fusion"], stored["params"]
        check_fusion(kind, params)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt hybrid fusion file ({type(e).__name__}: {e}); delete it to choose the fusion "
                         "again, or pass `alpha`") from e
    return kind, params


def validation_parts(run: Any, dec: CausalDecoders, split: Split, rows: np.ndarray, *, batch_size: int) -> tuple[Parts, torch.Tensor]:
    """(parts, target rows) of the given validation users (CPU tensors)."""
    device = next(run.model.parameters()).device
    parts, tgts = [], []
    for b in split_batches(run, split, "valid", rows, batch_size):  # loop over batches of users
        with torch.inference_mode():
            h = run.model.last_hidden(b.histories.tokens.to(device), b.histories.lengths.to(device))
            parts.append(Parts(*(t.cpu() for t in dec.parts(h))))
        tgts.append(b.targets)
    out = Parts(*(torch.cat([getattr(p, f) for p in parts]) for f in ("exact", "dense", "gen_rows")), parts[0].cold_rows)
    return out, torch.from_numpy(run.ids.rows_of(torch.cat(tgts).numpy()))


def choose_causal_fusion(run: Any, dec: CausalDecoders, split: Split, *, max_users: int | None, batch_size: int,
                         seed: int) -> FusionChoice:
    """Fit every fusion on a seeded sample of validation users and choose one on as many other validation users;
    store the choice in RUN/hybrid.json."""
    n = split.num_users if max_users is None else min(2 * max_users, split.num_users)
    if n < 2:
        raise ValueError(f"the hybrid's fusion is fitted on validation users and chosen on others, but the split has "
                         f"{split.num_users} validation user(s) (max_users {max_users}): pass `alpha` instead")
    rows = np.random.default_rng(seed).permutation(sample_users(split.num_users, n, seed))  # user order is not random
    fit_rows, select_rows = np.sort(rows[: n // 2]), np.sort(rows[n // 2 :])
    fit, fit_t = validation_parts(run, dec, split, fit_rows, batch_size=batch_size)
    sel, sel_t = validation_parts(run, dec, split, select_rows, batch_size=batch_size)
    choice = choose_fusion(fit, fit_t, sel, sel_t)
    write_json(Path(run.path) / HYBRID_FILE, {
        "fusion": choice.kind, "params": choice.params, "metric": "ndcg@10", "table": choice.table,
        "validation_users": {"fit": int(fit_rows.size), "select": int(select_rows.size)},
        "num_candidates": dec.num_candidates, **choice_key(run)})
    log.info("hybrid: fusion %s %s chosen on %d + %d validation users (%s)", choice.kind, choice.params,
             fit_rows.size, select_rows.size, {k: round(v["select_ndcg@10"], 4) for k, v in choice.table.items()})
    return choice
