"""The dense head: softmax over all items, so decoding is maximum inner-product search.

The same T5 encoder that feeds the generator is pooled into a query vector q (d); every item has a vector v_i (d);
p(item i | history) = softmax_i(q . v_i). Item vectors come from a learned table, a projection of the item's
frozen content embedding, or their sum (``mode``). Content makes items never seen in training rankable: a cold item
added with :meth:`DenseHead.add_items` gets its vector from its content alone (its table row starts at zero).

Plain ``nn.Module``s and functions; the Lightning system wraps them. Dimensions: B batch, S encoder length,
N items, C candidates, D content dim, d vector dim.

Losses:
    :func:`full_softmax_loss`: cross-entropy over the whole catalogue (Beauty's 12k items fit easily).
    :func:`sampled_softmax_loss`: in-batch + uniform random negatives with the log-Q correction of Yi et al.
        (RecSys 2019, "Sampling-bias-corrected neural modeling") for the mixed proposal of Yang et al.
        (WWW 2020, "Mixed negative sampling"); accidental hits of the target among the negatives are masked.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MODES = ("id", "content", "both")
POOLINGS = ("mean", "last")
LOSSES = ("full", "sampled")


@dataclass
class DenseHeadConfig:
    """Options of the dense head.

    Args:
        input_dim: the encoder's hidden size (T5 ``d_model``).
        dim: d, the query and item vector size.
        mode: item vectors from the learned table (``"id"``), a projection of content embeddings (``"content"``),
            or their sum (``"both"``). Only ``content``/``both`` can give cold items a vector.
        pooling: ``"mean"`` (masked mean over the encoder positions) or ``"last"`` (the last real position).
        normalize: L2-normalise query and item vectors (cosine scores), the query then divided by ``temperature``.
        temperature: > 0; only used with ``normalize``.
        id_dropout: probability, while training, of zeroing an item's table row in ``"both"`` mode so the content
            part must score items alone (DropoutNet, Volkovs et al., NeurIPS 2017); helps cold items. 0 disables.
        loss: ``"full"`` softmax over the catalogue or ``"sampled"`` softmax.
        num_random_negatives: uniform random negatives per batch for the sampled loss (in-batch ones come free).
        weight: the dense loss's weight when trained jointly with the generative loss (0 < weight).
    """

    input_dim: int
    dim: int = 128
    mode: Literal["id", "content", "both"] = "both"
    pooling: Literal["mean", "last"] = "mean"
    normalize: bool = True
    temperature: float = 0.05
    id_dropout: float = 0.0
    loss: Literal["full", "sampled"] = "full"
    num_random_negatives: int = 1024
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("input_dim", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        for name, allowed in (("mode", MODES), ("pooling", POOLINGS), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"`id_dropout` must be in [0, 1), got {self.id_dropout!r}")
        if self.id_dropout > 0 and self.mode != "both":
            raise ValueError(f"`id_dropout` needs mode='both' (it drops the table part only), got mode={self.mode!r}")
        if not isinstance(self.num_random_negatives, int) or self.num_random_negatives < 0:
            raise ValueError(f"`num_random_negatives` must be a non-negative int, got {self.num_random_negatives!r}")
        if not self.weight > 0:
            raise ValueError(f"`weight` must be > 0, got {self.weight!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DenseHead(nn.Module):
    """Query vectors from encoder states, item vectors from a table and/or content.

    Args:
        config: a :class:`DenseHeadConfig`.
        item_ids: LongTensor (N,), ascending and unique; row i of every item array belongs to ``item_ids[i]``.
        content_embeddings: FloatTensor (N, D), frozen (a buffer); required unless ``mode == "id"``.
    """

    def __init__(
        self, config: DenseHeadConfig, item_ids: torch.Tensor, content_embeddings: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        item_ids = _check_item_ids(item_ids)
        N = item_ids.numel()
        if N == 0:
            raise ValueError("`item_ids` must hold at least one item, got none")
        self.config = config
        self.query_proj = nn.Linear(config.input_dim, config.dim)
        self.register_buffer("item_ids", item_ids, persistent=True)
        if config.mode in ("id", "both"):
            self.item_table = nn.Parameter(torch.randn(N, config.dim) * config.dim**-0.5)
        if config.mode in ("content", "both"):
            if content_embeddings is None:
                raise ValueError(f"`content_embeddings` is required with mode={config.mode!r}")
            content = _check_content(content_embeddings, N)
            self.register_buffer("content_embeddings", content, persistent=True)
            self.content_proj = nn.Linear(content.shape[1], config.dim)
        elif content_embeddings is not None:
            raise ValueError("`content_embeddings` must be None with mode='id' (the table alone gives item vectors)")

    @property
    def num_items(self) -> int:
        """N, the number of items with a vector."""
        return int(self.item_ids.numel())

    # ---- queries -------------------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query vectors.

        Args:
            hidden: FloatTensor (B, S, input_dim), the encoder's last hidden states.
            attention_mask: (B, S), 1 for real tokens (left or right padding alike); every row needs one.
        Returns:
            FloatTensor (B, d); unit norm divided by the temperature with ``normalize``.
        """
        mask = attention_mask.to(hidden.dtype)  # (B, S)
        if self.config.pooling == "mean":
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)  # (B, input_dim)
        else:
            S = hidden.shape[1]
            last = (mask * torch.arange(1, S + 1, device=hidden.device)).argmax(dim=1)  # (B,) last real position
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        query = self.query_proj(pooled)  # (B, d)
        if self.config.normalize:
            query = F.normalize(query, dim=-1) / self.config.temperature
        return query

    # ---- items ---------------------------------------------------------------------------------------------------
    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors: all N (``rows=None``) or those of ``rows`` (LongTensor (C,) in [0, N)) -> (C, d)."""
        mode = self.config.mode
        out = None
        if mode in ("content", "both"):
            content = self.content_embeddings if rows is None else self.content_embeddings[rows]
            out = self.content_proj(content)
        if mode in ("id", "both"):
            table = self.item_table if rows is None else self.item_table[rows]
            if self.training and self.config.id_dropout > 0:
                keep = torch.rand(table.shape[0], 1, device=table.device) >= self.config.id_dropout
                table = table * keep
            out = table if out is None else out + table
        if self.config.normalize:
            out = F.normalize(out, dim=-1)
        return out

    def rows_of(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Row of each item id (any shape); raises on an unknown id."""
        item_ids = torch.as_tensor(item_ids, dtype=torch.long, device=self.item_ids.device)
        pos = torch.searchsorted(self.item_ids, item_ids).clamp_max(self.num_items - 1)
        missing = self.item_ids[pos] != item_ids
        if missing.any():
            raise ValueError(f"unknown item id {int(item_ids[missing][0])}: the dense head has {self.num_items} items")
        return pos

    @torch.no_grad()
    def add_items(self, content_embeddings: torch.Tensor, item_ids: torch.Tensor | None = None) -> None:
        """Add cold items in place: vectors from content alone, their table rows zero.

        Args:
            content_embeddings: FloatTensor (M, D).
            item_ids: LongTensor (M,), ascending, all above the largest current id; default the next M ids.
        """
        if self.config.mode == "id":
            raise ValueError("mode='id' has no content projection: new items would get no vector (use 'content' or 'both')")
        content = _check_content(content_embeddings, None, dim=self.content_embeddings.shape[1])
        M = content.shape[0]
        last = int(self.item_ids[-1])
        new_ids = torch.arange(last + 1, last + 1 + M) if item_ids is None else _check_item_ids(item_ids)
        if new_ids.shape != (M,):
            raise ValueError(f"`item_ids` must have shape ({M},), got {tuple(new_ids.shape)}")
        if M and int(new_ids[0]) <= last:
            raise ValueError(f"new `item_ids` must all be > {last} (the largest existing id), got {int(new_ids[0])}")
        device = self.item_ids.device
        self.item_ids = torch.cat([self.item_ids, new_ids.to(device)])
        self.content_embeddings = torch.cat([self.content_embeddings, content.to(self.content_embeddings)])
        if self.config.mode == "both":
            zeros = torch.zeros(M, self.config.dim, dtype=self.item_table.dtype, device=device)
            self.item_table = nn.Parameter(torch.cat([self.item_table.data, zeros]))
        log.info("dense head: added %d items (now %d)", M, self.num_items)

    # ---- loss ----------------------------------------------------------------------------------------------------
    def loss(
        self,
        query: torch.Tensor,
        target_rows: torch.Tensor,
        *,
        log_q: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The configured loss for queries (B, d) and target rows (B,) in [0, N); scalar.

        The sampled loss only computes the vectors of its candidates (C = B + num_random_negatives rows).
        """
        if self.config.loss == "full":
            return full_softmax_loss(query, self.item_vectors(), target_rows)
        cand = sample_candidates(
            target_rows, self.config.num_random_negatives, self.num_items, log_q=log_q, generator=generator
        )
        return candidate_softmax_loss(query, self.item_vectors(cand.rows), cand, target_rows)


# ---- losses --------------------------------------------------------------------------------------------------------
class Candidates(NamedTuple):
    """Candidate columns of a sampled softmax.

    rows:        LongTensor (C,) item rows: the B in-batch targets, then the R random negatives.
    log_correct: FloatTensor (C,), log of each column's expected count under the sampling proposal (subtracted
                 from its logit), or zeros without a correction.
    """

    rows: torch.Tensor
    log_correct: torch.Tensor


def full_softmax_loss(query: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of softmax(query . item_vecs) over all items.

    Args:
        query: FloatTensor (B, d); item_vecs: FloatTensor (N, d); targets: LongTensor (B,) rows in [0, N).
    """
    _check_loss_args(query, item_vecs, targets)
    return F.cross_entropy(query @ item_vecs.T, targets)  # logits (B, N)


def sample_candidates(
    targets: torch.Tensor,
    num_random: int,
    num_items: int,
    *,
    log_q: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    negatives: torch.Tensor | None = None,
) -> Candidates:
    """In-batch targets plus ``num_random`` uniform random rows, with the mixed-proposal log-Q correction.

    In-batch columns are B draws from the target distribution q (``exp(log_q)``), random columns R draws from the
    uniform 1/N, so item j's expected count among the C = B + R columns is B q_j + R / N; its log is subtracted
    from j's logit (the logQ correction of sampled softmax). Without ``log_q`` no correction is applied.

    Args:
        targets: LongTensor (B,) rows in [0, N).
        num_random: R >= 0 uniform draws, with replacement, from ``generator``.
        num_items: N.
        log_q: FloatTensor (N,), log-probability that a training target is item j (log popularity; sums to 1).
        negatives: LongTensor (R,) rows to use instead of sampling (tests, or a caller's own sampler).
    """
    if not isinstance(num_random, int) or num_random < 0:
        raise ValueError(f"`num_random` must be a non-negative int, got {num_random!r}")
    device = targets.device
    if negatives is None:
        negatives = torch.randint(num_items, (num_random,), generator=generator, device=generator.device if generator else "cpu")
    elif negatives.ndim != 1 or (negatives < 0).any() or (negatives >= num_items).any():
        raise ValueError(f"`negatives` must be a 1-d LongTensor of rows in [0, {num_items}), got shape {tuple(negatives.shape)}")
    rows = torch.cat([targets, negatives.to(device)])  # (C,)
    if log_q is None:
        return Candidates(rows, torch.zeros(rows.shape[0], device=device))
    if log_q.shape != (num_items,):
        raise ValueError(f"`log_q` must have shape ({num_items},), got {tuple(log_q.shape)}")
    total = torch.logsumexp(log_q.double(), 0).item()
    if not math.isclose(total, 0.0, abs_tol=1e-4):
        raise ValueError(f"`log_q` must be log-probabilities (logsumexp 0), got logsumexp {total:.6g}")
    B, R = targets.shape[0], rows.shape[0] - targets.shape[0]
    expected = B * log_q.to(device)[rows].exp() + R / num_items  # (C,)
    return Candidates(rows, expected.log())


def candidate_softmax_loss(
    query: torch.Tensor, cand_vecs: torch.Tensor, candidates: Candidates, targets: torch.Tensor
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
    cand = sample_candidates(
        targets, num_random, item_vecs.shape[0], log_q=log_q, generator=generator, negatives=negatives
    )
    return candidate_softmax_loss(query, item_vecs[cand.rows], cand, targets)


def log_popularity(target_rows: torch.Tensor, num_items: int, smoothing: float = 1.0) -> torch.Tensor:
    """log q (N,): the training targets' item frequencies, add-``smoothing`` smoothed, normalised to sum 1."""
    counts = torch.bincount(target_rows.reshape(-1), minlength=num_items).double() + smoothing
    return (counts / counts.sum()).log().float()


# ---- with the T5 encoder --------------------------------------------------------------------------------------------
OBJECTIVES = ("generative", "joint", "dense")
STATE_PREFIX = "dense_head."  # where a LightningModule that holds the head as `self.dense_head` keeps its weights
META_KEY = "dense"  # the head's config in a checkpoint's ``semid`` entry


class JointLoss(NamedTuple):
    """total = generative + weight * dense; a part the objective leaves out is a 0-d zero."""

    total: torch.Tensor
    generative: torch.Tensor
    dense: torch.Tensor


def encode_queries(model: nn.Module, head: DenseHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Query vectors (B, d) of encoder inputs (B, S) through ``model``'s T5 encoder and the head."""
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, D)
    return head(hidden, attention_mask)


def joint_loss(
    model: nn.Module,
    head: DenseHead,
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


def load_dense_head(checkpoint: dict[str, Any]) -> DenseHead | None:
    """The dense head saved in a loaded checkpoint dict (None if it has none), in eval mode on the CPU."""
    meta = checkpoint.get("semid", {}).get(META_KEY)
    if meta is None:
        return None
    state = {k[len(STATE_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
    head = DenseHead(DenseHeadConfig(**meta), state["item_ids"].cpu(), state.get("content_embeddings"))
    head.load_state_dict(state)
    return head.eval()


# ---- checks --------------------------------------------------------------------------------------------------------
def _check_item_ids(item_ids: torch.Tensor) -> torch.Tensor:
    item_ids = torch.as_tensor(item_ids)
    if item_ids.ndim != 1 or item_ids.dtype.is_floating_point or item_ids.dtype == torch.bool:
        raise ValueError(f"`item_ids` must be a 1-d integer tensor, got {item_ids.dtype} {tuple(item_ids.shape)}")
    item_ids = item_ids.long()
    if item_ids.numel() > 1 and (item_ids.diff() <= 0).any():
        raise ValueError("`item_ids` must be strictly ascending (unique)")
    return item_ids


def _check_content(content: torch.Tensor, num_items: int | None, dim: int | None = None) -> torch.Tensor:
    content = torch.as_tensor(content)
    if content.ndim != 2 or not content.dtype.is_floating_point:
        raise ValueError(f"`content_embeddings` must be a float (N, D) tensor, got {content.dtype} {tuple(content.shape)}")
    if num_items is not None and content.shape[0] != num_items:
        raise ValueError(f"`content_embeddings` must have one row per item ({num_items}), got {content.shape[0]}")
    if dim is not None and content.shape[1] != dim:
        raise ValueError(f"`content_embeddings` must have D={dim} columns, got {content.shape[1]}")
    if not torch.isfinite(content).all():
        raise ValueError("`content_embeddings` must be finite (no NaN or inf)")
    return content.float()


def _check_loss_args(query: torch.Tensor, item_vecs: torch.Tensor, targets: torch.Tensor) -> None:
    if query.ndim != 2 or item_vecs.ndim != 2 or query.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"`query` (B, d) and `item_vecs` (N, d) must share d, got {tuple(query.shape)} and {tuple(item_vecs.shape)}")
    if targets.shape != (query.shape[0],):
        raise ValueError(f"`targets` must have shape ({query.shape[0]},), got {tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= item_vecs.shape[0]):
        raise ValueError(f"`targets` must be rows in [0, {item_vecs.shape[0]}), got range [{int(targets.min())}, {int(targets.max())}]")
