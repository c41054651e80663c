"""Recommend: histories of item ids -> top-k items with scores, with any decoder of the registry over a trained run.

    run = load_run("runs/demo/run")
    recs = recommend(run, [[12, 45, 99]], k=10)             # default: beam search over the prefix tree
    recs[0].items, recs[0].scores    # best first; beam scores are item log-likelihoods (<= 0)

A one-off call: it builds a :class:`~generator.runs.recommender.Recommender` for the one decoder asked for, decodes
and drops it. To serve many calls, load once with ``Recommender.from_run`` and call its ``recommend``.

Every returned item is an item of the catalogue (checked); the k items of a history are distinct. Arguments are
checked at this boundary: an empty history, an unknown item id, ``k`` larger than the catalogue or ``num_beams < k``
each raise ``ValueError`` naming the problem.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from generator.decoding import registry
from generator.decoding.protocol import as_int, check_decode_args, check_k
from generator.runs.folder import Run
from generator.runs.recommender import DEFAULT_BEAMS, Recommendation, Recommender

__all__ = ["DEFAULT_BEAMS", "Recommendation", "recommend"]


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
    exclude_history: bool = True,
) -> list[Recommendation]:
    """Top-k items for each history (item ids, oldest first).

    Args:
        run: a loaded run (``generator.runs.folder.load_run``); left as it was.
        histories: B non-empty sequences of known item ids; only the last ``max_history`` items are used.
        k: items per history, at most the catalogue size.
        num_beams: beams, at least k (plus the history's distinct items with ``exclude_history``); default: 20 (capped at
            the catalogue size) doubled until they hold what a history asks for (``protocol.call_beams``).
        user_ids: B user ids to hash into user tokens where the run was trained with them (T5 runs); None leaves the
            user token out (an anonymous history).
        decoder: a name of ``generator.decoding.registry`` for this run ("auto": its beam search). Scores are what
            the decoder's ``score`` says: log-likelihoods for beam, generate and exact, inner products for dense, the
            fused score for hybrid (its fusion: ``alpha``, default the one stored in RUN/hybrid.json by
            ``semid choose-fusion`` or ``semid train``).
        exclude_history: leave the history's items out of the k (default; False ranks every item).
    Returns:
        B :class:`Recommendation`, in the order of ``histories``.
    """
    name = registry.resolve(run.design, decoder)
    N = run.ids.num_items
    k, num_beams = as_int(k), as_int(num_beams)  # (numpy's ints too)
    if num_beams is None:  # the call's beams: protocol.call_beams of what each history asks for (Recommender.recommend)
        check_k(k, N, "the catalogue size")
    else:
        check_decode_args(k, num_beams, N)
    loaded = min(DEFAULT_BEAMS, N) if num_beams is None else num_beams
    rec = Recommender(run, decoder=name, decoders=[name], num_beams=loaded, alpha=alpha, maps=False)
    return rec.recommend(histories, k, exclude_history=exclude_history, num_beams=num_beams,
                         user_ids=None if user_ids is None else np.asarray(user_ids), batch_size=batch_size)
