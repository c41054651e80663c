"""The one decoder contract: a batch of histories in, a ranking out.

Every decoder semid has (beam search, stock ``generate``, exact ranking, dense MIPS, the hybrids, the cold-start
beam, the title beam and the generate-then-ground baselines) implements :class:`Decoder`, is named in
``generator.decoding.registry`` and is built there; evaluation, recommendation, training validation, the command
line and the experiments all reach decoders through that registry.

- Input, :class:`Histories`: B histories as the backbone reads them (the run layer makes them from item ids).
- Output, :class:`Ranking`: the top-k items per history, best first, with their scores and semantic-ID codes, and
  two facts a caller needs to read the scores: what they are (``score``, one of :data:`SCORES`) and whether every
  item is a leaf of the prefix tree, i.e. reached by constrained generation (``leaves``).

Arguments are checked at the public entry points (``recommend``, ``evaluate``, the Lightning systems, a decoder's call)
by the one set of rules here (:func:`check_k`, :func:`check_beams`, :func:`check_int_in`, :func:`check_alpha`); the
functions a decoder calls assume valid input.

Shapes: B histories, S input positions, k items returned, L code levels, N items.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from semid.safe_read import is_int

# what a ranking's scores are
LOG_LIKELIHOOD = "log-likelihood"  # sum over levels of code log-probabilities renormalised over the tree (<= 0)
INNER_PRODUCT = "inner product"  # dense query . item vector (cosine / temperature for a normalised head)
BLEND = "blend"  # alpha * log-likelihood + (1 - alpha) * dense log-softmax
FUSED = "fused"  # a hybrid fusion's score (blend, reciprocal rank, learned): comparable within one ranking only
TITLE_LOG_PROB = "title log-probability / length^a"  # a title's log-probability among the catalogue's titles
COSINE = "cosine"  # of the item's title embedding with the generated title's
GENERATION_LOG_PROB = "free generation's log-probability"  # codes-grounded: the beam's score of the tuple it grounds
PREFIX_MATCHED = "log-likelihood (a cold item: its matched candidate's)"  # cold-beam
SCORES = (LOG_LIKELIHOOD, INNER_PRODUCT, BLEND, FUSED, TITLE_LOG_PROB, COSINE, GENERATION_LOG_PROB, PREFIX_MATCHED)


class Histories(NamedTuple):
    """B histories, as the backbone reads them.

    tokens: LongTensor (B, S). T5 runs: encoder tokens (user token, code tokens; padding is the layout's pad).
            Causal and title runs: item rows + 1, right-padded with 0, oldest first.
    mask:   BoolTensor (B, S), True at real positions.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor (B,), real positions per history."""
        return self.mask.sum(1)

    def to(self, device: torch.device | str) -> Histories:
        return Histories(self.tokens.to(device), self.mask.to(device))


class Ranking(NamedTuple):
    """Top-k items per history, best first.

    items:  LongTensor (B, k) item ids, distinct per row, all in the catalogue.
    scores: FloatTensor (B, k), non-increasing along a row; what they are is ``score``.
    codes:  LongTensor (B, k, L), the items' semantic-ID codes.
    score:  one of :data:`SCORES`.
    leaves: True when every item was reached along the prefix tree (constrained generation); False for decoders
            that rank items another way (dense, hybrid, grounded).
    """

    items: torch.Tensor
    scores: torch.Tensor
    codes: torch.Tensor
    score: str
    leaves: bool

    def cat(self, others: list[Ranking]) -> Ranking:
        """This ranking and ``others`` (same k and kind) stacked along the batch."""
        every = [self, *others]
        return Ranking(*(torch.cat([getattr(r, f) for r in every]) for f in ("items", "scores", "codes")), self.score, self.leaves)


@runtime_checkable
class Decoder(Protocol):
    """A decoder bound to one trained model (and its tree, item vectors, fusion, ...).

    ``name`` is its registry name, ``score`` what its scores are (:data:`SCORES`), ``leaves`` whether every item it
    returns is a leaf of the prefix tree. ``decoder(histories, k)`` returns the top-k of each history.
    """

    name: str
    score: str
    leaves: bool

    def __call__(self, histories: Histories, k: int) -> Ranking: ...


# ---- the one set of argument rules -----------------------------------------------------------------------------
def as_int(value: object) -> object:
    """A Python int for any integer (numpy's ``np.int64(10)``, from an array, included; never a bool), else ``value``
    unchanged for the checks to name: what the API's entry points pass on, so a count read from an array works."""
    return int(value) if is_int(value) else value


def check_int_in(name: str, value: object, lo: int, hi: int, what: str) -> None:
    """``value`` (the argument ``name``) must be an int in [lo, hi]; ``what`` says where the bounds come from."""
    if not is_int(value) or not lo <= value <= hi:
        raise ValueError(f"`{name}` must be an int in [{lo}, {hi}] ({what}), got {value!r}")


def check_k(k: object, limit: int, what: str) -> None:
    """``k`` must be an int in [1, limit]; ``what`` names the limit (e.g. "the catalogue size")."""
    check_int_in("k", k, 1, limit, what)


def check_beams(num_beams: object, k: int, num_items: int) -> None:
    """``num_beams`` must be an int in [k, num_items] (a beam search returns at most its beams)."""
    if not is_int(num_beams) or not k <= num_beams <= num_items:
        raise ValueError(f"`num_beams` must be an int in [k={k}, {num_items}] (k to the catalogue size), got {num_beams!r}")


def call_beams(want: int, loaded: int, num_items: int) -> int:
    """The beams a call asking for ``want`` items gets by default (``Recommender.recommend``, the service's buckets,
    ``evaluate`` with the history left out, alike): the smallest ``loaded * 2**i`` >= ``want``, capped at
    ``num_items`` (``want`` <= ``num_items``); a few bucket sizes, so batches of different asks share a count."""
    beams = loaded
    while beams < want:  # a handful of doublings
        beams *= 2
    return min(beams, num_items)


def check_alpha(alpha: object) -> None:
    """A blend weight: a finite number in [0, 1]."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")


def check_decode_args(k: object, num_beams: object, num_items: int) -> None:
    """The arguments every decoding entry point takes: ``k`` in [1, N], ``num_beams`` in [k, N]."""
    check_k(k, num_items, "the catalogue size")
    check_beams(num_beams, k, num_items)  # type: ignore[arg-type]


class StateDecoder:
    """One decoder by name, ranking from backbone states, as a :class:`~generator.decoding.protocol.Decoder`.

    ``shared`` is what the decoders of one item-level model share (:class:`CausalDecoders`, or the title decoders):
    it has ``model.last_hidden(histories, lengths)`` and ``decode(name, h, k=, num_beams=)``. :meth:`rank_states`
    ranks from states, so decoders of one model can share them (training validation runs the backbone once for all
    of its decoders).
    """

    def __init__(self, shared: object, name: str, *, score: str, leaves: bool) -> None:
        self.shared, self.name, self.score, self.leaves = shared, name, score, leaves
        self.num_beams = shared.num_beams

    def states(self, histories: Histories) -> torch.Tensor:
        """Backbone states (B, D) after each history."""
        with torch.inference_mode():
            return self.shared.model.last_hidden(histories.tokens, histories.lengths)

    def rank_states(self, h: torch.Tensor, k: int) -> Ranking:
        return self.shared.decode(self.name, h, k=k, num_beams=self.num_beams)

    def __call__(self, histories: Histories, k: int) -> Ranking:
        return self.rank_states(self.states(histories), k)
