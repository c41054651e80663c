"""The dense head of every design: softmax over all items, so decoding is maximum inner-product search.

A backbone state is projected to a query vector q (d) (the T5 encoder's output is pooled first; the causal model's
state after a history is one vector already); every item has a vector v_i (d); p(item i | history) =
softmax_i(q . v_i). Item vectors are the sum of a learned table, a projection of the item's frozen content
embedding (``mode``) and, for the causal design, a projection of the sum of its code embeddings (``code_dim``).
Content and codes make items never seen in training rankable: an item added with :meth:`DenseHead.add_items` gets
its vector from them alone (its table row starts at zero). A T5 run's head holds its items' ids and content; the
causal model holds them itself and hands the head their code and content vectors.

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
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from generator.models.config import is_plain_int
from generator.models.dense_loss import LOSSES, NEGATIVES, ColumnMask, softmax_loss

_DEFERRED = threading.local()  # .depth > 0 inside deferred_tables() (per thread: a reload beside a training)


@contextmanager
def deferred_tables() -> Iterator[None]:
    """Inside, the models' N-row tables (the dense item table, the causal model's node vectors) are made on the meta
    device: no memory and no initialisation, to be assigned a checkpoint's tensors (``load_state_dict(assign=True)``,
    ``generator.designs.registry.load_checkpoint(mmap=True)``), so that a served run never holds a second copy."""
    _DEFERRED.depth = getattr(_DEFERRED, "depth", 0) + 1
    try:
        yield
    finally:
        _DEFERRED.depth -= 1


def n_row_table(rows: int, dim: int, init: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``init(rows, dim)``, or an empty meta tensor of that shape inside :func:`deferred_tables`."""
    return torch.empty(rows, dim, device="meta") if getattr(_DEFERRED, "depth", 0) else init(rows, dim)

log = logging.getLogger(__name__)

MODES = ("id", "content", "both")
HOST_FIELDS = ("code_dim", "content_dim")  # for a head whose host model holds its items (the causal design's)
POOLINGS = ("mean", "last")


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
        num_random_negatives: random negatives per batch for the sampled loss (in-batch ones come free).
        negatives: how the sampled loss draws them: ``"uniform"``, ``"popularity"`` (from the targets' frequencies)
            or ``"in-batch"`` (none: the batch's targets only).
        weight: the dense loss's weight when trained jointly with the generative loss (0 < weight).
        logq_correction: the sampled loss subtracts each column's log expected count (Yi et al., RecSys 2019).
        code_dim: the width of the code vectors the host model hands :meth:`DenseHead.item_vectors` (projected
            without bias and added; the causal design's), 0 for none.
        content_dim: with ``mode`` content or both, the width of content the host model hands the head (the causal
            design's, projected without bias); 0: the head holds its items' content (T5's, projected with bias).
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
    negatives: Literal["in-batch", "uniform", "popularity"] = "uniform"
    logq_correction: bool = True
    code_dim: int = 0
    content_dim: int = 0

    def __post_init__(self) -> None:
        for name, low in (("input_dim", 1), ("dim", 1), ("code_dim", 0), ("content_dim", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be a {'positive' if low else 'non-negative'} int, got {value!r}")
        for name, allowed in (("mode", MODES), ("pooling", POOLINGS), ("loss", LOSSES), ("negatives", NEGATIVES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"`id_dropout` must be in [0, 1), got {self.id_dropout!r}")
        if self.id_dropout > 0 and self.mode != "both" and not (self.mode == "id" and self.code_dim):
            raise ValueError(f"`id_dropout` needs mode='both' or code vectors (it drops the table part only), got "
                             f"mode={self.mode!r}")
        if not is_plain_int(self.num_random_negatives) or self.num_random_negatives < 0:  # (saved: no numpy, no bool)
            raise ValueError(f"`num_random_negatives` must be a non-negative int, got {self.num_random_negatives!r}")
        if not self.weight > 0:
            raise ValueError(f"`weight` must be > 0, got {self.weight!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DenseHead(nn.Module):
    """Query vectors from backbone states, item vectors from a table, content and/or codes.

    Args:
        config: a :class:`DenseHeadConfig`.
        item_ids: LongTensor (N,), ascending and unique; row i of every item array belongs to ``item_ids[i]``. None
            when the host model holds its items (the causal design's): then ``num_items`` rows.
        content_embeddings: FloatTensor (N, D), frozen (a buffer); required with ``item_ids`` unless ``mode == "id"``.
    """

    def __init__(self, config: DenseHeadConfig, item_ids: torch.Tensor | None = None,
                 content_embeddings: torch.Tensor | None = None, *, num_items: int | None = None) -> None:
        super().__init__()
        if item_ids is not None:
            item_ids = _check_item_ids(item_ids)
            if config.code_dim or config.content_dim:
                raise ValueError(f"`code_dim` and `content_dim` are for a head whose model holds its items and hands it their "
                                 f"vectors (pass `num_items`, not `item_ids`), got {config.code_dim}, {config.content_dim}")
        N = item_ids.numel() if item_ids is not None else num_items
        if not N:
            raise ValueError("`item_ids` must hold at least one item, got none")
        self.config = config
        self.query_proj = nn.Linear(config.input_dim, config.dim)
        if item_ids is not None:
            self.register_buffer("item_ids", item_ids, persistent=True)
        if config.mode in ("id", "both"):
            self.item_table = nn.Parameter(n_row_table(N, config.dim, lambda n, d: torch.randn(n, d) * d**-0.5))
        if config.code_dim:
            self.code_proj = nn.Linear(config.code_dim, config.dim, bias=False)
        if config.mode in ("content", "both") and config.content_dim:  # content handed in by the host model
            self.content_proj = nn.Linear(config.content_dim, config.dim, bias=False)
        elif config.mode in ("content", "both"):
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
        return int(self.item_ids.numel() if hasattr(self, "item_ids") else self.item_table.shape[0])

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
        return self.query(pooled)

    def query(self, state: torch.Tensor) -> torch.Tensor:
        """Query vectors of backbone states (..., input_dim) -> (..., d); unit norm / temperature with ``normalize``."""
        query = self.query_proj(state)
        if self.config.normalize:
            query = F.normalize(query, dim=-1) / self.config.temperature
        return query

    # ---- items ---------------------------------------------------------------------------------------------------
    def item_vectors(self, rows: torch.Tensor | None = None, *, codes: torch.Tensor | None = None,
                     content: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
        """Item vectors: all N (``rows=None``) or those of ``rows`` (LongTensor (C,) in [0, N)) -> (C, d).

        codes, content: (C, code_dim), (C, content_dim) those items' code and content vectors, from a host model
        that holds them (``code_dim``, ``content_dim``); a head that holds its content reads its own. ``sparse``: the
        table's gradient from ``rows`` is sparse (those rows only; for a lazy optimiser).
        """
        c = self.config
        out = None
        if c.mode in ("id", "both"):
            out = self.item_table if rows is None else F.embedding(rows, self.item_table, sparse=True) if sparse else self.item_table[rows]
            if self.training and c.id_dropout > 0:
                keep = torch.rand(out.shape[0], 1, device=out.device) >= c.id_dropout
                out = out * keep
        if c.code_dim:
            out = out + self.code_proj(codes)
        if c.mode in ("content", "both"):
            if not c.content_dim:
                content = self.content_embeddings if rows is None else self.content_embeddings[rows]
            part = self.content_proj(content)
            out = part if out is None else out + part
        if c.normalize:
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
    def add_items(self, content_embeddings: torch.Tensor | None = None, item_ids: torch.Tensor | None = None, *,
                  count: int | None = None) -> None:
        """Add items in place: their table rows zero, so their vectors come from content (and codes) alone.

        Args:
            content_embeddings: FloatTensor (M, D), for a head that holds its items' content (T5's).
            item_ids: LongTensor (M,), ascending, all above the largest current id; default the next M ids.
            count: M, for a head whose host model holds its items (the causal design's).
        """
        if hasattr(self, "item_ids"):
            if self.config.mode == "id":
                raise ValueError("mode='id' has no content projection: new items would get no vector (use 'content' or 'both')")
            content = _check_content(content_embeddings, None, dim=self.content_embeddings.shape[1])
            count = content.shape[0]
            last = int(self.item_ids[-1])
            new_ids = torch.arange(last + 1, last + 1 + count) if item_ids is None else _check_item_ids(item_ids)
            if new_ids.shape != (count,):
                raise ValueError(f"`item_ids` must have shape ({count},), got {tuple(new_ids.shape)}")
            if count and int(new_ids[0]) <= last:
                raise ValueError(f"new `item_ids` must all be > {last} (the largest existing id), got {int(new_ids[0])}")
            self.item_ids = torch.cat([self.item_ids, new_ids.to(self.item_ids.device)])
            self.content_embeddings = torch.cat([self.content_embeddings, content.to(self.content_embeddings)])
        if hasattr(self, "item_table"):
            self.item_table = nn.Parameter(torch.cat([self.item_table.data, self.item_table.new_zeros(count, self.config.dim)]))
        log.info("dense head: added %d items (now %d)", count, self.num_items)

    # ---- loss ----------------------------------------------------------------------------------------------------
    def loss(self, query: torch.Tensor, target_rows: torch.Tensor, *,
             vectors_of: Callable[[torch.Tensor | None], torch.Tensor] | None = None, log_q: torch.Tensor | None = None,
             generator: torch.Generator | None = None, masked: ColumnMask | None = None) -> torch.Tensor:
        """The configured loss for queries (B, d) and target rows (B,) in [0, N); scalar. ``vectors_of`` (rows or
        None -> item vectors): a host model's (default :meth:`item_vectors`); ``masked``: columns kept out of each
        row's softmax (``generator.models.dense_loss.softmax_loss``).

        The sampled loss only computes the vectors of its candidates (C = B + num_random_negatives rows).
        """
        c = self.config
        return softmax_loss(query, self.item_vectors if vectors_of is None else vectors_of, target_rows, self.num_items,
                            loss=c.loss, negatives=c.negatives, num_negatives=c.num_random_negatives, log_q=log_q,
                            correct=c.logq_correction, generator=generator, masked=masked)


# ---- with the T5 encoder --------------------------------------------------------------------------------------------
STATE_PREFIX = "dense_head."  # where a LightningModule that holds the head as `self.dense_head` keeps its weights
META_KEY = "dense"  # the head's config in a checkpoint's ``semid`` entry


def encode_queries(model: nn.Module, head: DenseHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Query vectors (B, d) of encoder inputs (B, S) through ``model``'s T5 encoder and the head."""
    hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, D)
    return head(hidden, attention_mask)


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


