"""Losses of the dense head: full softmax over the catalogue, sampled softmax with log-popularity correction, and the joint
generative + dense loss of the T5 generator."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from semid.safe_read import is_int

OBJECTIVES = ("generative", "joint", "dense")
LOSSES = ("full", "sampled")
NEGATIVES = ("in-batch", "uniform", "popularity")  # the sampled softmax's negatives beyond the batch's own targets


class Candidates(NamedTuple):
    """Candidate columns of a sampled softmax.

    rows:        LongTensor (C,) item rows: the B in-batch targets, then the R random negatives.
    log_correct: FloatTensor (C,), log of each column's expected count under the sampling proposal (subtracted
                 from its logit), or zeros without a correction.
    """

    rows: torch.Tensor
    log_correct: torch.Tensor


ColumnMask = Callable[[torch.Tensor | None], torch.Tensor]  # column rows (C,) or None (all N) -> BoolTensor (B, C)


def full_softmax_loss(query: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor,
                      masked: ColumnMask | None = None) -> torch.Tensor:
    """Mean cross-entropy of softmax(query . item_vecs) over all items (``masked(None)``: (B, N) columns left out of
    each row's softmax, never its target).

    Args:
        query: FloatTensor (B, d); item_vecs: FloatTensor (N, d); targets: LongTensor (B,) rows in [0, N).
    """
    _check_loss_args(query, item_vecs, targets)
    logits = query @ item_vecs.T  # (B, N)
    return F.cross_entropy(logits if masked is None else logits.masked_fill(masked(None), float("-inf")), targets)


def sample_candidates(
    targets: torch.Tensor,
    num_random: int,
    num_items: int,
    *,
    log_q: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    negatives: torch.Tensor | None = None,
    proposal: str = "uniform",
    correct: bool = True,
) -> Candidates:
    """In-batch targets plus ``num_random`` random rows, with the mixed-proposal log-Q correction.

    In-batch columns are B draws from the target distribution q (``exp(log_q)``), random columns R draws from the
    proposal p (uniform 1/N, or q itself with ``proposal="popularity"``), so item j's expected count among the
    C = B + R columns is B q_j + R p_j; its log is subtracted from j's logit (the logQ correction of sampled softmax,
    Yi et al. RecSys 2019). Without ``log_q``, or with ``correct=False``, no correction is applied.

    Args:
        targets: LongTensor (B,) rows in [0, N).
        num_random: R >= 0 draws, with replacement, from ``generator``.
        num_items: N.
        log_q: FloatTensor (N,), log-probability that a training target is item j (log popularity; sums to 1).
            Checked by :func:`check_log_q` at the public entry points, not here (this runs every training step).
        negatives: LongTensor (R,) rows to use instead of sampling (tests, or a caller's own sampler).
        proposal: ``"uniform"`` or ``"popularity"`` (needs ``log_q``): the distribution of the random rows.
        correct: subtract the log expected counts (with ``log_q``).
    """
    if not is_int(num_random) or num_random < 0:
        raise ValueError(f"`num_random` must be a non-negative int, got {num_random!r}")
    num_random = int(num_random)
    if proposal not in ("uniform", "popularity"):
        raise ValueError(f"`proposal` must be 'uniform' or 'popularity', got {proposal!r}")
    if proposal == "popularity" and log_q is None:
        raise ValueError("`proposal` 'popularity' draws from the target distribution: pass `log_q`")
    device = targets.device
    if negatives is None:
        gen_device = generator.device if generator is not None else "cpu"
        if proposal == "uniform":
            negatives = torch.randint(num_items, (num_random,), generator=generator, device=gen_device)
        elif num_random:
            negatives = torch.multinomial(log_q.exp().to(gen_device), num_random, replacement=True, generator=generator)
        else:
            negatives = torch.zeros(0, dtype=torch.long, device=gen_device)
    elif negatives.ndim != 1 or (negatives < 0).any() or (negatives >= num_items).any():
        raise ValueError(f"`negatives` must be a 1-d LongTensor of rows in [0, {num_items}), got shape {tuple(negatives.shape)}")
    rows = torch.cat([targets, negatives.to(device)])  # (C,)
    if log_q is None or not correct:
        return Candidates(rows, torch.zeros(rows.shape[0], device=device))
    B, R = targets.shape[0], rows.shape[0] - targets.shape[0]
    q = log_q.to(device)[rows].exp()  # (C,)
    expected = B * q + (R * q if proposal == "popularity" else R / num_items)  # (C,)
    return Candidates(rows, expected.log())


def check_log_q(log_q: torch.Tensor, num_items: int) -> torch.Tensor:
    """``log_q`` itself if it is N log-probabilities (logsumexp 0); a ValueError naming what is wrong otherwise."""
    if log_q.shape != (num_items,):
        raise ValueError(f"`log_q` must have shape ({num_items},), got {tuple(log_q.shape)}")
    total = torch.logsumexp(log_q.double(), 0).item()
    if not math.isclose(total, 0.0, abs_tol=1e-4):
        raise ValueError(f"`log_q` must be log-probabilities (logsumexp 0), got logsumexp {total:.6g}")
    return log_q


def candidate_softmax_loss(
    query: torch.Tensor, cand_vecs: torch.Tensor, candidates: Candidates, targets: torch.Tensor,
    masked: ColumnMask | None = None,
) -> torch.Tensor:
    """Sampled-softmax cross-entropy: row b's positive is column b; other columns holding its target are masked.

    Args:
        query: FloatTensor (B, d); cand_vecs: FloatTensor (C, d), the vectors of ``candidates.rows``.
        candidates: from :func:`sample_candidates`, whose first B rows are ``targets``.
        targets: LongTensor (B,).
    """
    B = query.shape[0]
    logits = query @ cand_vecs.T - candidates.log_correct  # (B, C)
    hit = candidates.rows.unsqueeze(0) == targets.unsqueeze(1)  # (B, C) the target again, as a "negative"
    if masked is not None:  # columns left out of a row's softmax (the row's own positive never is)
        hit |= masked(candidates.rows)
    hit[:, :B].fill_diagonal_(False)
    logits = logits.masked_fill(hit, float("-inf"))
    return F.cross_entropy(logits, torch.arange(B, device=query.device))


def sampled_softmax_loss(
    query: torch.Tensor,
    item_vecs: torch.Tensor,
    targets: torch.Tensor,
    num_random: int,
    log_q: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch and random negatives, log-Q correction and accidental-hit masking.

    Args:
        query: FloatTensor (B, d); item_vecs: FloatTensor (N, d); targets: LongTensor (B,) rows in [0, N).
        num_random, log_q, generator, negatives: see :func:`sample_candidates`.
    Returns:
        the mean loss, a scalar. With every item among the columns exactly once (B = N distinct targets, R = 0)
        and a uniform ``log_q`` it equals :func:`full_softmax_loss`, gradient included.
    """
    _check_loss_args(query, item_vecs, targets)
    if log_q is not None:
        check_log_q(log_q, item_vecs.shape[0])
    cand = sample_candidates(
        targets, num_random, item_vecs.shape[0], log_q=log_q, generator=generator, negatives=negatives
    )
    return candidate_softmax_loss(query, item_vecs[cand.rows], cand, targets)


def softmax_loss(
    query: torch.Tensor,
    vectors_of: Callable[[torch.Tensor | None], torch.Tensor],
    targets: torch.Tensor,
    num_items: int,
    *,
    loss: str = "full",
    negatives: str = "uniform",
    num_negatives: int = 0,
    log_q: torch.Tensor | None = None,
    correct: bool = True,
    generator: torch.Generator | None = None,
    masked: ColumnMask | None = None,
) -> torch.Tensor:
    """The dense loss of either head (the T5 :class:`~generator.models.dense.DenseHead` and the causal design).

    ``"full"``: :func:`full_softmax_loss` over all N items. ``"sampled"``: the batch's targets are the columns (each
    row's positive, and the other rows' negatives), plus ``num_negatives`` rows drawn uniformly (``"uniform"``) or by
    popularity (``"popularity"``, from ``log_q``); ``"in-batch"`` draws none. Item vectors are computed for the
    C = B + R candidate rows only, so a step's cost does not grow with N. Negatives are drawn per process (not
    gathered across DDP processes). Where the columns would number the catalogue or more (B + R >= N: a small
    catalogue, or a batch of long windows), the sampled loss, an estimate of the full one, would cost more than the
    full one itself (B x C logits against B x N): that step takes the full softmax.

    Args:
        query: FloatTensor (B, d); targets: LongTensor (B,) rows in [0, N).
        vectors_of: rows (C,) -> their item vectors (C, d); ``None`` -> all N (N, d).
        log_q, correct, generator: see :func:`sample_candidates` (``log_q`` checked once by the caller).
        masked: columns (C,) (None: all N) -> (B, C) True where that column is no negative of that row (the causal
            design's ``seen_negatives`` False: items of the row's own history), never the row's target.
    """
    if loss == "full":
        return full_softmax_loss(query, vectors_of(None), targets, masked)
    if loss != "sampled":
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"`negatives` must be one of {NEGATIVES}, got {negatives!r}")
    num_random = 0 if negatives == "in-batch" else num_negatives
    if targets.shape[0] + num_random >= num_items:  # no fewer columns than items: the exact loss is the cheaper one
        return full_softmax_loss(query, vectors_of(None), targets, masked)
    cand = sample_candidates(
        targets, num_random, num_items, log_q=log_q, generator=generator,
        proposal="popularity" if negatives == "popularity" else "uniform", correct=correct,
    )
    return candidate_softmax_loss(query, vectors_of(cand.rows), cand, targets, masked)


def check_sampled_options(loss: str, negatives: str, num_negatives: int, correct: bool) -> None:
    """The sampled-softmax options of a config, checked once (the causal design's ``CausalConfig``)."""
    if loss not in LOSSES:
        raise ValueError(f"`dense_loss` must be one of {LOSSES}, got {loss!r}")
    if negatives not in NEGATIVES:
        raise ValueError(f"`dense_negatives` must be one of {NEGATIVES}, got {negatives!r}")
    if not isinstance(num_negatives, int) or isinstance(num_negatives, bool) or num_negatives < 0:
        raise ValueError(f"`num_negatives` must be a non-negative int, got {num_negatives!r}")
    if not isinstance(correct, bool):
        raise ValueError(f"`logq_correction` must be a bool, got {correct!r}")


def log_popularity(target_rows: torch.Tensor, num_items: int, smoothing: float = 1.0) -> torch.Tensor:
    """log q (N,): the training targets' item frequencies, add-``smoothing`` smoothed, normalised to sum 1."""
    counts = torch.bincount(target_rows.reshape(-1), minlength=num_items).double() + smoothing
    return (counts / counts.sum()).log().float()


class JointLoss(NamedTuple):
    """total = generative + weight * dense; a part the objective leaves out is a 0-d zero."""

    total: torch.Tensor
    generative: torch.Tensor
    dense: torch.Tensor


def joint_loss(
    model: nn.Module,
    head: nn.Module,  # a generator.models.dense.DenseHead
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    target_rows: torch.Tensor,
    *,
    objective: str = "joint",
    label_smoothing: float = 0.0,
    log_q: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> JointLoss:
    """The generative and/or dense loss of one batch, the encoder run once for both.

    Args:
        model: a ``T5ForConditionalGeneration``; head: the dense head on its encoder.
        input_ids, attention_mask: (B, S); labels: (B, L + 1) target codes then eos (-100 ignored).
        target_rows: LongTensor (B,), the targets' rows in the head (``head.rows_of(target_ids)``).
        objective: ``"joint"`` (both), ``"dense"`` (the head and encoder only) or ``"generative"`` (decoder only).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    zero = input_ids.new_zeros((), dtype=torch.float32)
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    gen = dense = zero
    if objective != "dense":
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)  # (B, L + 1)
        logits = model(encoder_outputs=enc, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        gen = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, label_smoothing=label_smoothing)
    if objective != "generative":
        query = head(enc.last_hidden_state, attention_mask)  # (B, d)
        dense = head.loss(query, target_rows, log_q=log_q, generator=generator)
    return JointLoss(gen + head.config.weight * dense, gen, dense)


def _check_loss_args(query: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor) -> None:
    if query.ndim != 2 or item_vecs.ndim != 2 or query.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"`query` (B, d) and `item_vecs` (N, d) must share d, got {tuple(query.shape)} and {tuple(item_vecs.shape)}")
    if targets.shape != (query.shape[0],):
        raise ValueError(f"`targets` must have shape ({query.shape[0]},), got {tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= item_vecs.shape[0]):
        raise ValueError(f"`targets` must be rows in [0, {item_vecs.shape[0]}), got range [{int(targets.min())}, {int(targets.max())}]")
