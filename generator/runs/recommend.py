"""Recommend: histories of item ids -> top-k items with scores, by constrained beam search over a trained run.

    run = load_run("runs/tiger")
    recs = recommend(run, [[12, 45, 99]], k=10)
    recs[0].items, recs[0].scores    # best first; scores are sums of code log-probabilities (<= 0)

Every returned item is a leaf of the prefix tree, so an item of the catalogue; the k items of a history are
distinct. Arguments are checked at this boundary: an empty history, an unknown item id, ``k`` larger than the
catalogue or ``num_beams < k`` each raise ``ValueError`` naming the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from generator.decoding.t5_generate import check_beam_args
from generator.training.examples import collate, history_examples
from generator.decoding.t5_hybrid import build_decoder
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
        run: a loaded run (``generator.runs.folder.load_run``).
        histories: B non-empty sequences of known item ids; only the last ``max_history`` items are used.
        k: items per history, at most the catalogue size.
        num_beams: M >= k beams (default max(k, 20), capped at the catalogue size).
        user_ids: B user ids to hash into user tokens where the run was trained with them; None leaves the user
            token out (an anonymous history).
        decoder: "auto" | "beam" | "generate" (see ``generator.decoding.t5_generate.get_decoder``), or "dense" (MIPS over the
            dense head's item vectors; scores are inner products) or "hybrid" (beam candidates re-ranked with the
            blend weight ``alpha``, default the one chosen on validation, RUN/hybrid.json).
    Returns:
        B :class:`Recommendation`, in the order of ``histories``.
    """
    if num_beams is None:
        num_beams = max(k, min(DEFAULT_BEAMS, run.ids.num_items)) if isinstance(k, int) else DEFAULT_BEAMS
    check_beam_args(k, num_beams, run.ids.num_items)
    from generator.runs.titles import handles, recommend_generated

    if handles(run, decoder):  # title runs, and free codes + grounding (generator.titles)
        items, scores = recommend_generated(run, _check_histories(histories, run), k=k, num_beams=num_beams, decoder=decoder,
                                            batch_size=batch_size)
        _check_outside(items, run, decoder)
        return [Recommendation(i, s) for i, s in zip(items, scores, strict=True)]
    if run.design == "causal":
        from generator.runs.causal import recommend_causal

        hist = _check_histories(histories, run)
        if user_ids is not None:
            log.info("the causal design has no user tokens; `user_ids` are ignored")
        items, scores = recommend_causal(run, hist, k=k, num_beams=num_beams, decoder=decoder, batch_size=batch_size, alpha=alpha)
        _check_outside(items, run, decoder)
        return [Recommendation(i, s) for i, s in zip(items, scores, strict=True)]
    decode = build_decoder(run, decoder, alpha=alpha, num_beams=num_beams)
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
    examples = history_examples(
        hist, np.full(len(hist), -1), user_ids, run.ids, run.layout, max_history=run.max_history
    )
    device = next(run.model.parameters()).device
    tree = run.tree.to(device)
    run.model.eval()
    items = np.empty((len(hist), k), dtype=np.int64)
    scores = np.empty((len(hist), k), dtype=np.float32)
    for lo in range(0, len(hist), batch_size):
        index = torch.arange(lo, min(lo + batch_size, len(hist)))
        b = collate(examples, index, run.layout.pad_token_id)
        res = decode(run.model, b.input_ids.to(device), b.attention_mask.to(device), tree, run.layout, k=k, num_beams=num_beams)
        items[lo : lo + len(index)] = res.items.cpu().numpy()
        scores[lo : lo + len(index)] = res.scores.cpu().numpy()
    _check_outside(items, run, decoder)
    return [Recommendation(i, s) for i, s in zip(items, scores, strict=True)]


def _check_outside(items: np.ndarray, run: Run, decoder: str) -> None:
    outside = int((~np.isin(items, run.ids.item_ids)).sum())
    if outside:  # a real check, not an assert (which `python -O` strips)
        raise RuntimeError(f"the {decoder!r} decoder returned {outside} items outside the catalogue")
