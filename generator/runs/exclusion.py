"""A call that leaves the user's history out of its ranking: the decoder is asked for k plus the history's distinct
items (with beams and candidates for that many), the history's items are dropped after, the first k of the rest kept.
``Recommender.recommend``, the service's batcher and ``evaluate --exclude-history`` make such calls alike."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from generator.decoding.cold import ColdStartBeam
from generator.decoding.protocol import Decoder


def distinct_counts(histories: Sequence[np.ndarray]) -> np.ndarray:
    """int64 (B,): how many distinct items each history holds (what ``exclude_history`` may drop from a ranking):
    the distinct (row, item) keys of all histories at once (one sort), counted per row."""
    flat, row = _flat(histories)
    span = int(flat.max(initial=0)) + 1
    keys = np.unique(row * span + flat)
    return np.bincount(keys // span, minlength=len(histories)).astype(np.int64)


def _flat(histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All histories' items (int64) and the row each came from."""
    lengths = np.fromiter(map(len, histories), np.int64, len(histories))
    flat = np.concatenate(histories).astype(np.int64, copy=False) if lengths.sum() else np.empty(0, np.int64)
    return flat, np.repeat(np.arange(len(histories), dtype=np.int64), lengths)


def drop_history(items: np.ndarray, scores: np.ndarray, histories: Sequence[np.ndarray], k: int,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The first k entries of each ranking (items, scores (B, n), best first) whose item is not in its history
    (``histories[b]``, item ids; empty: nothing dropped), the rest keeping their order: ((B, k), (B, k)). One
    membership test over all (row, item) pairs and one stable sort; ``n`` must leave k per row (a decoder asked for
    k plus the history's distinct items, :func:`distinct_counts`). An empty slot (-1) is never in a history."""
    flat, owner = _flat(histories)
    span = int(max(items.max(initial=0), flat.max(initial=0))) + 1  # (row, item) -> row * span + item, one key per pair
    row = np.arange(len(histories), dtype=np.int64)
    seen = np.isin(row[:, None] * span + items, owner * span + flat) & (items >= 0)  # (B, n)
    order = np.argsort(seen, axis=1, kind="stable")[:, :k]  # the rest first, in their order
    return np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)


def with_beams(dec: Decoder, num_beams: int, *, candidates: bool = False) -> Decoder:
    """``dec`` with ``num_beams`` beams and, with ``candidates`` (the hybrids), at least ``num_beams`` candidates per
    list: itself where it has them, else a shallow copy (the built tables are shared)."""
    if isinstance(dec, ColdStartBeam):  # around a beam decoder, whose beams are its (it kept its build's in silence)
        if dec.beam.num_beams == num_beams:
            return dec
        out = copy.copy(dec)
        out.beam = with_beams(dec.beam, num_beams)
        return out
    out = dec
    if getattr(dec, "num_beams", num_beams) != num_beams:
        out = copy.copy(dec)
        out.num_beams = num_beams
    owner = getattr(out, "shared", out)  # a causal decoder keeps C in the CausalDecoders it shares
    if candidates and owner.num_candidates < num_beams:
        out = copy.copy(out) if out is dec else out
        if hasattr(out, "shared"):
            out.shared = copy.copy(out.shared)
            out.shared.num_candidates = num_beams
        else:
            out.num_candidates = num_beams
    return out


def with_cold_cap(dec: Decoder, k: int) -> Decoder:
    """``dec`` for a call that keeps k of the longer list it asks for: a cold-start decoder caps its cold items at
    k's share (``ColdStartBeam.max_cold(k)``), not the longer list's (a copy); any other decoder as it is."""
    if not isinstance(dec, ColdStartBeam):
        return dec
    out = copy.copy(dec)
    out.cold_cap = dec.max_cold(k)
    return out
