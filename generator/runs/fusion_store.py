"""The hybrid's fusion, chosen on validation users of a run and stored in ``RUN/hybrid.json``: one schema for every
design.

:func:`choose_fusion` fits every fusion a design's hybrid can use (``generator.decoding.fusion``) on one seeded
sample of validation users and chooses one on a second, disjoint one (user order is not random in Beauty: the
sample is shuffled before it is halved); never test users. The file::

    {"fusion": kind, "params": {...}, "metric": "ndcg@10", "table": {kind: {"params", "fit_ndcg@10",
     "select_ndcg@10"}}, "validation_users": {"fit": n, "select": n}, "num_candidates": C,
     "checkpoint": path, "checkpoint_sha256": ..., "ids_sha256": ..., "pool": "union"}

A stored choice is reused only for the same checkpoint (path and sha256), semantic IDs (digest), candidate count
and pool; anything else is chosen again. T5 runs of earlier versions stored the pool blend's weight alone
(``{"alpha": a, ...}`` with the same key): it is read as the fusion ``("blend", {"alpha": a})``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding import registry
from generator.decoding.fusion import FUSIONS, POOL_FUSIONS, FusionChoice, Parts, cat_parts, check_fusion
from generator.decoding.fusion import choose_fusion as fit_and_choose
from generator.decoding.protocol import Histories
from generator.models.checkpoint import ids_digest
from generator.runs.batches import split_batches
from generator.runs.folder import HYBRID_FILE
from generator.training.sampling import sample_users
from semid.io import file_sha256, write_json
from semid.safe_read import is_int
from semid.split import Split

log = logging.getLogger(__name__)

POOL = "union"  # the candidate pool a fusion was chosen for: generative top-C plus dense top-C
DEFAULT_CANDIDATES = 50  # C per list where no stored fusion names another


def choice_key(run: Any) -> dict[str, str]:
    """What a stored choice depends on besides the candidate count: the exact checkpoint (its path inside the run
    folder, so a copied or moved folder keeps its choice, and its content), the IDs and the candidate pool (an alpha
    chosen for the beam-only pool of older versions, which has no "pool", is stale)."""
    ckpt, folder = Path(run.checkpoint).resolve(), Path(run.path).resolve()
    where = ckpt.relative_to(folder).as_posix() if ckpt.is_relative_to(folder) else str(ckpt)
    return {"checkpoint": where, "checkpoint_sha256": file_sha256(Path(run.checkpoint)),
            "ids_sha256": ids_digest(run.ids), "pool": POOL}


def _same(name: str, stored: Any, value: str) -> bool:
    """A stored key value matches; an absolute checkpoint path stored by earlier versions matches its place inside
    the folder (the content is checked by its sha256 beside it)."""
    if stored == value:
        return True
    return name == "checkpoint" and isinstance(stored, str) and not Path(value).is_absolute() and \
        Path(stored).is_absolute() and Path(stored).as_posix().endswith("/" + value)


def _corrupt(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: corrupt hybrid fusion file ({type(e).__name__}: {e}); delete it and choose the fusion "
                      "again (`semid choose-fusion --run RUN`), or give a blend weight (`--alpha A`; `alpha=` in Python)")


def _read(run: Any) -> dict[str, Any] | None:
    """RUN/hybrid.json as a dict (None where there is none), or the ValueError of :func:`_corrupt`."""
    path = Path(run.path) / HYBRID_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise TypeError(f"a JSON object expected, got {type(stored).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise _corrupt(path, e) from e
    return stored


def _stale(stored: dict[str, Any], key: dict[str, str]) -> list[str]:
    """What a stored choice was made for that this checkpoint, IDs and pool (``key``) are not."""
    return [name for name, value in key.items() if not _same(name, stored.get(name), value)]


def stored_candidates(run: Any, key: dict[str, str] | None = None) -> int:
    """C, the candidates per list a hybrid is served with: the count RUN/hybrid.json's fusion was chosen for
    (``semid choose-fusion --num-candidates``) where it was chosen for this checkpoint and IDs (``key``:
    :func:`choice_key`), else :data:`DEFAULT_CANDIDATES` (no file or a stale one; a corrupt file is reported where
    its fusion is read)."""
    try:
        stored = _read(run)
    except ValueError:
        return DEFAULT_CANDIDATES
    if stored is None or _stale(stored, choice_key(run) if key is None else key):
        return DEFAULT_CANDIDATES
    c = stored.get("num_candidates")
    return int(c) if is_int(c) and c >= 1 else DEFAULT_CANDIDATES


def stored_fusion(run: Any, num_candidates: int, key: dict[str, str] | None = None) -> tuple[str, dict] | None:
    """The fusion (kind, params) in RUN/hybrid.json if it was chosen for this checkpoint (path and content), IDs and
    candidate count (``key``: :func:`choice_key` of the run, when the caller has it); None if none was."""
    path, stored = Path(run.path) / HYBRID_FILE, _read(run)
    if stored is None:
        return None
    stale = _stale(stored, choice_key(run) if key is None else key)
    if stored.get("num_candidates") != num_candidates:
        stale.append("num_candidates")
    # the blend weight alone, as a pool hybrid's (T5's) was stored by an earlier semid
    earlier_t5 = "fusion" not in stored and "alpha" in stored and registry.BACKBONES[run.design].fusions == POOL_FUSIONS
    if "fusion" not in stored and not earlier_t5:
        stale.append("fusion (a blend weight stored by an earlier semid)")
    if stale:
        log.info("%s was chosen for another %s", path, ", ".join(stale))
        return None
    try:
        kind, params = ("blend", {"alpha": float(stored["alpha"])}) if earlier_t5 else (stored["fusion"], stored["params"])
        check_fusion(kind, params)
        if kind == "levels" and len(params["weights"]) != run.ids.num_levels:  # else found only when it scores
            raise ValueError(f"fusion 'levels' has {len(params['weights'])} weights for IDs of {run.ids.num_levels} "
                             "code levels")
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, e) from e
    return kind, params


def validation_parts(run: Any, parts_of: Callable[[Histories], Parts], split: Split, rows: np.ndarray, *,
                     batch_size: int) -> tuple[Parts, torch.Tensor]:
    """(parts, target rows) of the given validation users (CPU tensors); ``parts_of``: the hybrid's parts of a batch."""
    device = next(run.model.parameters()).device
    parts, tgts = [], []
    for b in split_batches(run, split, "valid", rows, batch_size):  # loop over batches of users
        with torch.inference_mode():
            p = parts_of(b.histories.to(device))
        parts.append(Parts(*(None if t is None else t.cpu() for t in p)))
        tgts.append(b.targets)
    return cat_parts(parts), torch.from_numpy(run.ids.rows_of(torch.cat(tgts).numpy()))


def _warn_if_smaller(run: Any, num_candidates: int, fit: int, select: int) -> None:
    """Say so when a fusion chosen for the same checkpoint and IDs on more validation users is replaced."""
    path = Path(run.path) / HYBRID_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        before = (stored["validation_users"]["fit"], stored["validation_users"]["select"])
        current = all(_same(k, stored.get(k), v) for k, v in choice_key(run).items())
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: nothing to compare
        return
    if current and stored.get("num_candidates") == num_candidates and isinstance(before[0], int) and before[0] > fit:
        log.warning("%s: replacing a fusion chosen on %s + %s validation users with one chosen on %d + %d", path,
                    *before, fit, select)


def choose_fusion(run: Any, parts_of: Callable[[Histories], Parts], split: Split, *, num_candidates: int,
                  kinds: Sequence[str] = FUSIONS, max_users: int | None, batch_size: int, seed: int) -> FusionChoice:
    """Fit every fusion of ``kinds`` on a seeded sample of validation users and choose one on as many other validation
    users; store the choice in RUN/hybrid.json.

    Args:
        parts_of: the run's hybrid's :class:`Parts` of a batch of histories (on the model's device).
        num_candidates: C, the candidates per list the parts hold (recorded: a choice is reused for this C only).
        max_users: users to fit on (as many again to choose on); None: every validation user, halved.
    """
    n = split.num_users if max_users is None else min(2 * max_users, split.num_users)
    if n < 2:
        raise ValueError(f"the hybrid's fusion is fitted on validation users and chosen on others, but the split has "
                         f"{split.num_users} validation user(s) (max_users {max_users}): give a blend weight instead (`semid evaluate` "
                         "or `semid recommend --alpha A`; `Recommender.from_run(run, alpha=A)`)")
    rows = np.random.default_rng(seed).permutation(sample_users(split.num_users, n, seed))  # user order is not random
    fit_rows, select_rows = np.sort(rows[: n // 2]), np.sort(rows[n // 2 :])
    fit, fit_t = validation_parts(run, parts_of, split, fit_rows, batch_size=batch_size)
    sel, sel_t = validation_parts(run, parts_of, split, select_rows, batch_size=batch_size)
    choice = fit_and_choose(fit, fit_t, sel, sel_t, kinds)
    _warn_if_smaller(run, num_candidates, int(fit_rows.size), int(select_rows.size))
    write_json(Path(run.path) / HYBRID_FILE, {
        "fusion": choice.kind, "params": choice.params, "metric": "ndcg@10", "table": choice.table,
        "validation_users": {"fit": int(fit_rows.size), "select": int(select_rows.size)},
        "num_candidates": num_candidates, **choice_key(run)})
    log.info("hybrid: fusion %s %s chosen on %d + %d validation users (%s)", choice.kind, choice.params,
             fit_rows.size, select_rows.size, {k: round(v["select_ndcg@10"], 4) for k, v in choice.table.items()})
    retire_hybrid_metrics(Path(run.path))
    return choice


def retire_hybrid_metrics(run_dir: Path) -> list[str]:
    """Remove the metrics files of the hybrid measured with another stored fusion than ``run_dir``'s hybrid.json now
    (each records the file's sha256: ``evaluate_run``; one recording none was made before that was recorded, or with
    an ``alpha`` given, which the file says): they stayed under the same name, describing a fusion no longer served."""
    now = file_sha256(run_dir / HYBRID_FILE)
    gone = []
    for path in sorted(run_dir.glob("metrics_*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(record, dict) and str(record.get("decoder", "")).endswith("hybrid") and "alpha" not in record
                and record.get("hybrid_sha256") != now):
            path.unlink()
            gone.append(path.name)
    if gone:
        log.info("removed %s: measured with another fusion than the one chosen now", ", ".join(gone))
    return gone
