"""Recommend: histories of item ids -> top-k items with scores, with any decoder of the registry over a trained run.

    run = load_any_run("runs/demo/run")
    recs = recommend(run, [[12, 45, 99]], k=10)             # default: beam search over the prefix tree
    recs[0].items, recs[0].scores    # best first; beam scores are item log-likelihoods (<= 0)

Every returned item is an item of the catalogue (checked); the k items of a history are distinct. Arguments are checked at this boundary: an empty history, an unknown item id, ``k`` larger than the
catalogue or ``num_beams < k`` each raise ``ValueError`` naming the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from generator.decoding import registry
from generator.decoding.protocol import check_decode_args
from generator.runs.batches import history_batches
from generator.runs.decoders import decoders_for
from generator.runs.folder import Run

log = logging.getLogger(__name__)

DEFAULT_BEAMS = 20


class Recommendation(NamedTuple):
    """Top-k for one history, best first. items: int64 (k,) item ids; scores: float32 (k,), descending."""

    items: np.ndarray
    scores: np.ndarray


def _check_histories(histories: Sequence[Sequence[int]], run: Run) -> list[np.ndarray]:
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence) or len(histories) == 0:
        raise ValueError(f"`histories` must be a non-empty list of item-id lists, got {histories!r}")
    out = []
    for i, h in enumerate(histories):
        arr = np.asarray(h)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"`histories[{i}]` must be a list of int item ids, got {h!r}")
        if arr.size == 0:
            raise ValueError(f"`histories[{i}]` is empty: a history needs at least one item")
        out.append(arr.astype(np.int64))
    flat = np.concatenate(out)
    try:  # one binary search over all histories (not a full-catalogue np.isin per history)
        run.ids.rows_of(flat)
    except ValueError:
        known = run.ids.item_ids
        pos = np.clip(np.searchsorted(known, flat), 0, len(known) - 1)
        first = int(np.flatnonzero(known[pos] != flat)[0])
        i = int(np.searchsorted(np.cumsum([len(a) for a in out]), first, side="right"))
        raise ValueError(
            f"`histories[{i}]` holds unknown item id {int(flat[first])!r}: the catalogue has ids "
            f"{int(known.min())}..{int(known.max())}"
        ) from None
    return out


def recommend(
    run: Run,
    histories: Sequence[Sequence[int]],
    *,
    k: int = 10,
    num_beams: int | None = None,
    user_ids: Sequence[int] | None = None,
    decoder: str = "auto",
    batch_size: int = 64,
    alpha: float | None = None,
) -> list[Recommendation]:
    """Top-k items for each history (item ids, oldest first).

    Args:
        run: a loaded run (``generator.runs.load.load_any_run``, or ``generator.runs.folder.load_run``).
        histories: B non-empty sequences of known item ids; only the last ``max_history`` items are used.
        k: items per history, at most the catalogue size.
        num_beams: M >= k beams (default max(k, 20), capped at the catalogue size).
        user_ids: B user ids to hash into user tokens where the run was trained with them (T5 runs); None leaves the
            user token out (an anonymous history).
        decoder: a name of ``generator.decoding.registry`` for this run ("auto": its beam search). Scores are what
            the decoder's ``score`` says: log-likelihoods for beam, generate and exact, inner products for dense, the
            fused score for hybrid (its fusion: ``alpha``, default the one chosen on validation, RUN/hybrid.json).
    Returns:
        B :class:`Recommendation`, in the order of ``histories``.
    """
    name = registry.resolve(run.design, decoder)
    if num_beams is None:
        num_beams = max(k, min(DEFAULT_BEAMS, run.ids.num_items)) if isinstance(k, int) else DEFAULT_BEAMS
    check_decode_args(k, num_beams, run.ids.num_items)
    hist = _check_histories(histories, run)
    if user_ids is not None:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        if user_ids.shape != (len(hist),):
            raise ValueError(f"`user_ids` must hold one id per history ({len(hist)}), got shape {user_ids.shape}")
        if not run.use_user_tokens:
            log.info("this run has no user tokens; `user_ids` are ignored")
            user_ids = None
    elif run.use_user_tokens:
        log.warning(
            "this run was trained with user tokens (%d buckets) but no `user_ids` were given: the inputs differ from "
            "training (no user token), which can lower quality; pass the users' ids (`semid recommend --user ID`)",
            run.layout.num_user_tokens,
        )
    dec = decoders_for(run, [name], alpha=alpha, num_beams=num_beams)[name]
    device = next(run.model.parameters()).device
    run.model.eval()
    items = np.empty((len(hist), k), dtype=np.int64)
    scores = np.empty((len(hist), k), dtype=np.float32)
    lo = 0
    for b in history_batches(run, hist, user_ids, batch_size):  # loop over batches of histories
        res = dec(b.to(device), k)
        n = res.items.shape[0]
        items[lo : lo + n] = res.items.cpu().numpy()
        scores[lo : lo + n] = res.scores.float().cpu().numpy()
        lo += n
    _check_outside(items, run, name)
    return [Recommendation(i, s) for i, s in zip(items, scores, strict=True)]


def _check_outside(items: np.ndarray, run: Run, decoder: str) -> None:
    outside = int((~np.isin(items, run.ids.item_ids)).sum())
    if outside:  # a real check, not an assert (which `python -O` strips)
        raise RuntimeError(f"the {decoder!r} decoder returned {outside} items outside the catalogue")
