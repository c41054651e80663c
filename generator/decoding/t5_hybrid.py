"""The dense and hybrid decoders: MIPS over the dense head's item vectors, and beam candidates re-ranked by a blend.

The candidate pool of a history is the union of the beam's top C and the dense head's top C items (C =
``num_candidates``; at most 2C, padded to 2C). Every candidate gets its generative log-probability by teacher forcing
(:func:`teacher_forced_logprob`: the sum over levels of the code log-probability renormalised over the tokens the
prefix tree allows after the candidate's prefix, which is exactly the beam's score for the beam's items, a proper
distribution over items) and its dense log-softmax over the whole catalogue (a proper distribution too), so the blend

    score = alpha * gen_logprob + (1 - alpha) * dense_logprob

is a weighted product of the two experts. ``alpha`` is chosen on validation users only (:func:`choose_alpha`).
alpha = 1 gives the generative order (the beam's order on its items); alpha = 0 the dense top-k exactly, since the
pool holds the dense top C: on validation the chosen alpha is never worse than dense.

:class:`DenseDecoder` and :class:`HybridDecoder` are callables with the signature and return of
``generator.decoding.t5_generate.generate_topk`` (``(model, input_ids, attention_mask, tree, layout, *, k, num_beams) ->
BeamResult``), so evaluation and recommendation treat every decoder alike.

Dimensions: B histories, S encoder tokens, M candidates, N items, d vector dim, L code levels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import yaml
from torch import nn

from generator.decoding.mips import MIPSIndex
from generator.decoding.t5_beam import _decoder_step, auto_batch_size, fast_topk
from generator.decoding.t5_generate import DECODERS, BeamResult, check_beam_args, get_decoder
from generator.models.dense import (
    OBJECTIVES,
    DenseHead,
    DenseHeadConfig,
    encode_queries,
    load_dense_head,
    log_popularity,
)
from generator.models.t5 import ids_digest, safe_load
from generator.training.examples import collate
from generator.training.t5_data import eval_batches, sample_users, split_examples
from semid.data import Dataset, Split
from semid.ids import SemanticIDs
from semid.io import write_json
from semid.layout import TokenLayout
from semid.metrics import ndcg_at_k, recall_at_k
from semid.tree import PrefixTree

if TYPE_CHECKING:
    from generator.runs.folder import Run

log = logging.getLogger(__name__)

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


class HybridCandidates(NamedTuple):
    """Candidates with both scores.

    items:         LongTensor (B, M) item ids; -1 in a padded slot.
    gen_logprob:   FloatTensor (B, M), the generative log-probability (the beam's score); -inf in a padded slot.
    dense_logprob: FloatTensor (B, M), the dense head's log-softmax (or raw score) of each candidate.
    codes:         LongTensor (B, M, L), the candidates' code tuples (-1 in a padded slot).
    """

    items: torch.Tensor
    gen_logprob: torch.Tensor
    dense_logprob: torch.Tensor
    codes: torch.Tensor


class AlphaChoice(NamedTuple):
    """The blend weight chosen on validation: ``alpha``, the ``metric`` it maximised, and that metric per alpha."""

    alpha: float
    metric: str
    table: dict[float, float]


def dense_candidate_scores(
    query: torch.Tensor,
    item_vecs: torch.Tensor,
    cand_rows: torch.Tensor,
    *,
    log_softmax: bool = True,
    item_chunk: int = 65536,
) -> torch.Tensor:
    """Dense scores of given candidates: q . v, minus log-sum-exp over the whole catalogue with ``log_softmax``.

    Args:
        query: FloatTensor (B, d); item_vecs: FloatTensor (N, d).
        cand_rows: LongTensor (B, M) rows in [0, N).
        item_chunk: items per block of the log-sum-exp (memory B x item_chunk).
    Returns:
        FloatTensor (B, M).
    """
    if cand_rows.ndim != 2 or cand_rows.shape[0] != query.shape[0]:
        raise ValueError(f"`cand_rows` must be (B={query.shape[0]}, M), got shape {tuple(cand_rows.shape)}")
    scores = torch.einsum("bd,bmd->bm", query, item_vecs[cand_rows])  # (B, M)
    if not log_softmax:
        return scores
    lse = torch.full((query.shape[0],), float("-inf"), dtype=query.dtype, device=query.device)
    for i0 in range(0, item_vecs.shape[0], item_chunk):  # loop over item blocks, not items
        lse = torch.logaddexp(lse, torch.logsumexp(query @ item_vecs[i0 : i0 + item_chunk].T, dim=1))
    return scores - lse.unsqueeze(1)


def union_rows(first: torch.Tensor, second: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the union of two candidate lists, duplicates dropped, valid entries first, padded to a fixed width.

    Args:
        first, second: LongTensor (B, M1), (B, M2) catalogue rows; entries equal to ``pad`` are empty slots.
        pad: the empty-slot value (e.g. N, above every row).
    Returns:
        rows (B, M1 + M2): ``first``'s rows in its order, then ``second``'s rows that are not in ``first`` in
        ``second``'s order, then ``pad``; valid (B, M1 + M2) bool, False in the padded slots.
    """
    both = torch.cat([first, second], dim=1)  # (B, W)
    srt, perm = torch.sort(both, dim=1, stable=True)  # equal rows keep their position order: the first is kept
    dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = torch.zeros_like(dup_sorted).scatter_(1, perm, dup_sorted)  # back to position order
    valid = ~dup & (both != pad)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid slots first, in their order
    rows, valid = both.gather(1, order), valid.gather(1, order)
    return torch.where(valid, rows, pad), valid


@torch.inference_mode()
def teacher_forced_logprob(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    codes: torch.Tensor,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Generative log-probability of given candidates, the score ``fast_topk`` gives the items it finds.

    For each history and candidate the decoder reads [bos, c_1 .. c_{L-1}] (teacher forcing); at level l the
    log-softmax is taken over level l's token block restricted to the tokens the tree allows after the candidate's
    prefix, and the candidate's token is gathered; the score is the sum over levels. The encoder runs once per
    history and its cross-attention keys/values are computed once per history and shared by its M candidates (the
    candidates are M query positions of one attention call, as the beam's M beams: nothing is expanded per candidate).

    Args:
        model: T5ForConditionalGeneration in eval mode (as for ``fast_topk``).
        input_ids, attention_mask: (B, S) encoder inputs.
        codes: LongTensor (B, M, L) candidate code tuples; every one must be an item of ``tree``.
        batch_size: histories per chunk; None picks it from the memory budget of ``fast_topk``.
    Returns:
        FloatTensor (B, M); -inf where a candidate's code tuple is not in the tree.
    """
    device = model.device
    if tree.device != device:
        tree = tree.to(device)
    input_ids, attention_mask, codes = input_ids.to(device), attention_mask.to(device), codes.to(device)
    B, S = input_ids.shape
    M, L = codes.shape[1], codes.shape[2]
    if codes.ndim != 3 or codes.shape[0] != B or L != layout.num_levels:
        raise ValueError(f"`codes` must be (B={B}, M, L={layout.num_levels}), got shape {tuple(codes.shape)}")
    if B == 0 or M == 0:
        return torch.zeros(B, M, dtype=torch.float32, device=device)
    chunk = batch_size or auto_batch_size(model, S, M, layout)
    parts = [
        _teacher_forced_chunk(model, input_ids[i : i + chunk], attention_mask[i : i + chunk], tree, layout, codes[i : i + chunk])
        for i in range(0, B, chunk)  # loop over chunks of histories, as fast_topk
    ]
    return torch.cat(parts, dim=0)


def _teacher_forced_chunk(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tree: PrefixTree, layout: TokenLayout,
    codes: torch.Tensor,
) -> torch.Tensor:
    """teacher_forced_logprob for one chunk of B histories with M candidates each: (B, M)."""
    c, dec = model.config, model.decoder
    B, S = input_ids.shape
    M, L = codes.shape[1], codes.shape[2]
    H, dk, device = c.num_heads, c.d_kv, input_ids.device
    enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, D)
    cross = []
    for block in dec.block:  # loop over layers: keys/values once per history
        att = block.layer[1].EncDecAttention
        keys_t = att.k(enc).view(B, S, H, dk).permute(0, 2, 3, 1).contiguous()  # (B, H, dk, S)
        values = att.v(enc).view(B, S, H, dk).transpose(1, 2).contiguous()  # (B, H, S, dk)
        cross.append((keys_t, values))
    enc_bias = torch.zeros(B, 1, 1, S, dtype=enc.dtype, device=device)
    enc_bias.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(enc.dtype).min)
    pos_bias = dec.block[0].layer[0].SelfAttention.compute_bias(L, L, device=device)  # (1, H, L, L)
    pos_bias = pos_bias[0].permute(1, 2, 0)[:, :, None, :].contiguous()  # (L query, L key, 1, H)
    head = model.get_output_embeddings()
    scale = c.d_model**-0.5 if getattr(c, "scale_decoder_outputs", c.tie_word_embeddings) else 1.0

    flat = codes.reshape(B * M, L)  # row b * M + j is candidate j of history b
    cache = torch.empty(L, len(dec.block), 2, B * M, H, dk, dtype=enc.dtype, device=device)
    tokens = torch.full((B * M,), layout.bos_token_id, dtype=torch.long, device=device)
    nodes = torch.zeros(B * M, dtype=torch.long, device=device)  # -1 once a candidate leaves the tree
    total = torch.zeros(B * M, dtype=torch.float32, device=device)
    for level in range(L):  # the only loop: over levels
        lo, hi = layout.level_range(level)
        hidden = _decoder_step(dec, tokens, cache, level, pos_bias, cross, enc_bias, M)  # (B*M, D)
        logits = (hidden * scale) @ head.weight[lo:hi].T  # (B*M, K)
        if head.bias is not None:
            logits = logits + head.bias[lo:hi]
        allowed = tree.allowed_mask(nodes, token_range=(lo, hi))  # (B*M, K)
        logp = logits.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
        code = flat[:, level]
        ok = (code >= 0) & (code < hi - lo)
        got = logp.gather(1, code.clamp(0, hi - lo - 1)[:, None]).squeeze(1)
        got = torch.where(ok & allowed.gather(1, code.clamp(0, hi - lo - 1)[:, None]).squeeze(1), got, float("-inf"))
        total = total + got  # NaN-free: a row with nothing allowed gives -inf (or NaN, replaced below)
        tokens = code.clamp(0, hi - lo - 1) + lo
        nodes = torch.where(ok, tree.next_nodes(nodes, tokens), -1)
    total = torch.where(torch.isnan(total), float("-inf"), total)
    return total.view(B, M)


def hybrid_candidates(beam: BeamResult, dense_logprob: torch.Tensor) -> HybridCandidates:
    """Attach dense scores (B, M), computed for ``beam.items``, to a beam result over M candidates."""
    if dense_logprob.shape != beam.items.shape:
        raise ValueError(f"`dense_logprob` must have the beam's shape {tuple(beam.items.shape)}, got {tuple(dense_logprob.shape)}")
    return HybridCandidates(beam.items, beam.scores, dense_logprob.to(beam.scores), beam.codes)


def blend(cands: HybridCandidates, alpha: float) -> torch.Tensor:
    """alpha * gen + (1 - alpha) * dense, (B, M); -inf wherever the beam left a slot empty."""
    _check_alpha(alpha)
    mixed = alpha * cands.gen_logprob + (1.0 - alpha) * cands.dense_logprob
    return torch.where(torch.isfinite(cands.gen_logprob), mixed, float("-inf"))  # 0 * -inf would be NaN


def rerank(cands: HybridCandidates, alpha: float, k: int) -> BeamResult:
    """Top-k of the candidates by the blended score, best first; ties keep the beam's order.

    Returns:
        :class:`BeamResult` with items (B, k), blended scores (B, k) and codes (B, k, L).
    """
    M = cands.items.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= M:
        raise ValueError(f"`k` must be an int in [1, {M}] (the number of beam candidates), got {k!r}")
    scores = blend(cands, alpha)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # (B, k)
    L = cands.codes.shape[2]
    return BeamResult(
        cands.items.gather(1, order),
        scores.gather(1, order),
        cands.codes.gather(1, order.unsqueeze(2).expand(-1, -1, L)),
    )


def choose_alpha(
    cands: HybridCandidates,
    targets: torch.Tensor | np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    metric: str = "ndcg@10",
) -> AlphaChoice:
    """Pick the blend weight that maximises ``metric`` on *validation* candidates and targets.

    Args:
        cands: candidates of validation histories (B, M).
        targets: (B,) the validation target item ids.
        grid: alphas to try, each in [0, 1]; on a tie the first in the grid wins.
        metric: ``"recall@K"`` or ``"ndcg@K"`` with K <= M.
    """
    name, _, k_str = metric.partition("@")
    if name not in ("recall", "ndcg") or not k_str.isdigit() or not 1 <= int(k_str) <= cands.items.shape[1]:
        raise ValueError(f"`metric` must be 'recall@K' or 'ndcg@K' with 1 <= K <= {cands.items.shape[1]}, got {metric!r}")
    if len(grid) == 0:
        raise ValueError("`grid` must hold at least one alpha, got none")
    k = int(k_str)
    fn = recall_at_k if name == "recall" else ndcg_at_k
    table = {float(a): float(fn(rerank(cands, float(a), k).items, targets, k).mean()) for a in grid}  # loop over grid
    best = max(table, key=lambda a: (table[a], -list(table).index(a)))
    return AlphaChoice(best, metric, table)


# ---- decoders --------------------------------------------------------------------------------------------------------
def _head_state(head: DenseHead) -> tuple:
    """Changes whenever the head's item vectors can: its item count, or any parameter or buffer being replaced,
    moved or updated in place (an optimiser step or ``load_state_dict`` bumps a tensor's version counter)."""
    tensors = [*head.parameters(), *head.buffers()]
    return (head.num_items, tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))


@torch.no_grad()
def _eval_item_vectors(head: DenseHead) -> torch.Tensor:
    was_training = head.training
    head.eval()
    try:
        return head.item_vectors()
    finally:
        head.train(was_training)


class DenseDecoder:
    """Top-k items by inner product of the dense head's query with every item vector.

    Args:
        head: the dense head (its items must be ``ids``'s, row for row).
        ids: the semantic IDs, for the returned items' codes.
        kind: the :class:`MIPSIndex` kind. ``"exact"`` computes the item vectors once and again only when the head
            changes (its item count, or its weights: always current while training); a faiss index is built on first
            use: call :meth:`refresh` after the head changes.
        index_options: passed to :meth:`MIPSIndex.build` (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``).
    Scores are raw inner products q . v (with ``normalize``, cosine over the temperature).
    """

    def __init__(self, head: DenseHead, ids: SemanticIDs, *, kind: str = "exact", **index_options: Any) -> None:
        _check_aligned(head, ids)
        self.head, self.ids, self.kind, self.index_options = head, ids, kind, index_options
        self._codes = torch.from_numpy(ids.codes)  # (N, L), row i is item head.item_ids[i]
        self.index: MIPSIndex | None = None
        self._state: tuple | None = None  # _head_state(head) when the index was built
        self.__name__ = f"DenseDecoder(kind={kind!r})"  # how evaluation reports the decoder

    @torch.no_grad()
    def refresh(self) -> MIPSIndex:
        """(Re)build the index from the head's current item vectors."""
        self._state = _head_state(self.head)
        vecs = _eval_item_vectors(self.head)
        self.index = MIPSIndex.build(vecs, self.head.item_ids, self.kind, **self.index_options)
        return self.index

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tree: PrefixTree | None = None,
        layout: TokenLayout | None = None,
        *,
        k: int,
        num_beams: int | None = None,
    ) -> BeamResult:
        """Top-k (B, k) for encoder inputs (B, S); ``tree``, ``layout`` and ``num_beams`` are not used."""
        if self.index is None or (self.kind == "exact" and self._state != _head_state(self.head)):
            self.refresh()  # not at every batch: all N item vectors are the costly part
        assert self.index is not None, "refresh() builds the index"
        query = encode_queries(model, self.head, input_ids, attention_mask)  # (B, d)
        res = self.index.search(query, k)
        rows = self.head.rows_of(res.item_ids.clamp_min(self.head.item_ids[0]))
        codes = torch.where(res.item_ids.unsqueeze(-1) >= 0, self._codes.to(rows.device)[rows], -1)  # (B, k, L)
        return BeamResult(res.item_ids, res.scores.float(), codes)


class HybridDecoder:
    """The beam's and the dense head's top ``num_candidates`` items, pooled; :func:`rerank` orders them by the blend.

    Args:
        head, ids: as for :class:`DenseDecoder`.
        alpha: the blend weight in [0, 1], chosen on validation (:func:`choose_alpha`).
        num_candidates: C, candidates per history from each of beam and dense (beams used: max(num_beams, C)); the
            pool holds C to 2C items.
        beam: the beam-search function (``generator.decoding.t5_beam.fast_topk`` or ``generator.decoding.t5_generate.generate_topk``).
    """

    def __init__(
        self,
        head: DenseHead,
        ids: SemanticIDs,
        *,
        alpha: float,
        num_candidates: int = 50,
        beam: Callable[..., BeamResult] = fast_topk,
    ) -> None:
        _check_aligned(head, ids)
        check_beam_args(1, num_candidates, ids.num_items)
        _check_alpha(alpha)
        self.head, self.ids, self.alpha, self.num_candidates, self.beam = head, ids, float(alpha), num_candidates, beam
        self._codes = torch.from_numpy(ids.codes)  # (N, L), row i is item head.item_ids[i]
        self._vecs: torch.Tensor | None = None  # all N item vectors, computed again only when the head changes
        self._state: tuple | None = None
        self.__name__ = f"HybridDecoder(alpha={self.alpha}, num_candidates={num_candidates}, beam={beam.__name__})"

    @torch.no_grad()
    def candidates(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tree: PrefixTree,
        layout: TokenLayout, *, num_beams: int,
    ) -> HybridCandidates:
        """The union of the beam's and the dense head's top C (B, 2C, padded) with both log-probabilities.

        The generative score of every candidate comes from teacher forcing (:func:`teacher_forced_logprob`), equal
        to the beam's score on the beam's items; padded slots have item -1, codes -1 and both scores -inf.
        """
        C = self.num_candidates
        res = self.beam(model, input_ids, attention_mask, tree, layout, k=C, num_beams=max(num_beams, C))
        device = res.items.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        was_training = self.head.training
        self.head.eval()
        query = encode_queries(model, self.head, input_ids, attention_mask)  # (B, d)
        self.head.train(was_training)
        vecs = self.item_vectors()
        N = vecs.shape[0]
        logits = query @ vecs.T  # (B, N)
        log_z = torch.logsumexp(logits, dim=1, keepdim=True)  # (B, 1)
        beam_rows = torch.where(res.items >= 0, self.head.rows_of(res.items.clamp_min(self.head.item_ids[0])), N)
        rows, valid = union_rows(beam_rows, logits.topk(C, dim=1).indices, N)  # (B, 2C)
        safe = rows.clamp_max(N - 1)
        codes = self._codes.to(device)[safe]  # (B, 2C, L)
        gen = teacher_forced_logprob(model, input_ids, attention_mask, tree, layout, codes).to(logits.dtype)
        neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=device)
        return HybridCandidates(
            torch.where(valid, self.head.item_ids.to(device)[safe], -1),
            torch.where(valid, gen, neg_inf),
            torch.where(valid, logits.gather(1, safe) - log_z, neg_inf),
            torch.where(valid[..., None], codes, -1),
        )

    def item_vectors(self) -> torch.Tensor:
        """All N item vectors (eval mode), cached until the head changes."""
        state = _head_state(self.head)
        if self._vecs is None or self._state != state:
            self._vecs, self._state = _eval_item_vectors(self.head), state
        return self._vecs

    def __call__(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tree: PrefixTree,
        layout: TokenLayout, *, k: int, num_beams: int,
    ) -> BeamResult:
        """Top-k (B, k) of the re-ranked candidates; k <= num_candidates."""
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_candidates:
            raise ValueError(f"`k` must be an int in [1, {self.num_candidates}] (num_candidates), got {k!r}")
        return rerank(self.candidates(model, input_ids, attention_mask, tree, layout, num_beams=num_beams), self.alpha, k)


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")


def _check_aligned(head: DenseHead, ids: SemanticIDs) -> None:
    if head.num_items != ids.num_items or not np.array_equal(head.item_ids.cpu().numpy(), ids.item_ids):
        raise ValueError(
            f"the dense head's {head.num_items} items are not the semantic IDs' {ids.num_items} items, row for row: "
            "add cold items to both (DenseHead.add_items, SemanticIDs.add_items)"
        )


# ---- runs: the head for training, decoders by name for evaluation and recommendation ----------------------------
ALL_DECODERS = (*DECODERS, "exact", "dense", "hybrid")  # "exact": causal runs only (generator.causal)
# generator.titles: constrained title beam and free title + grounding (title runs), free codes + grounding (causal)
ALL_DECODERS += ("title-beam", "title-grounded", "codes-grounded")
POOL = "union"  # the candidate pool an alpha was chosen for: beam top-C plus dense top-C, teacher-forced scores
ALPHA_FILE = "hybrid.json"  # RUN/hybrid.json: the blend weight chosen on validation for the run's checkpoint


class DenseSetup(NamedTuple):
    """What the Lightning system needs for the dense head: the head (None for none), the objective, log q (N,) of
    the training targets (sampled loss only) and the validation decoder (the dense one when only it is trained)."""

    head: DenseHead | None
    objective: str
    log_q: torch.Tensor | None
    val_decoder: DenseDecoder | None


def dense_setup(
    mode: str | None,
    objective: str,
    dataset: Dataset,
    split: Split,
    ids: SemanticIDs,
    input_dim: int,
    *,
    embeddings: str = "minilm",
    options: dict[str, Any] | None = None,
) -> DenseSetup:
    """Build the dense head of a training run.

    Args:
        mode: ``"id"``, ``"content"``, ``"both"``, or None for no head (then ``objective`` must be "generative").
        objective: ``"joint"`` (generative + dense), ``"dense"`` (encoder and head only) or ``"generative"``.
        embeddings: name of the dataset's ``item_emb_<name>.npy`` (content modes); row i is item i + 1.
        options: further :class:`DenseHeadConfig` fields (``dim``, ``pooling``, ``loss``, ``temperature``, ...).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    if mode is None:
        if objective != "generative":
            raise ValueError(f"`objective` {objective!r} needs a dense head: pass `dense` (id, content or both)")
        return DenseSetup(None, objective, None, None)
    config = DenseHeadConfig(input_dim=input_dim, mode=mode, **(options or {}))
    if int(ids.item_ids.max()) > dataset.num_items:
        raise ValueError(f"the semantic IDs have items above {dataset.num_items}, the dataset's last: no content for them")
    content = None if mode == "id" else torch.from_numpy(dataset.embeddings(embeddings)[ids.item_ids - 1])
    head = DenseHead(config, torch.from_numpy(ids.item_ids), content)
    log_q = None
    if config.loss == "sampled":
        targets = np.concatenate([s[1:] for s in split.train])  # every training example's target
        log_q = log_popularity(head.rows_of(torch.from_numpy(targets)), head.num_items)
    val_decoder = DenseDecoder(head, ids) if objective == "dense" else None
    return DenseSetup(head, objective, log_q, val_decoder)


def load_run_head(run: Run) -> DenseHead:
    """The dense head of a run's checkpoint, on the model's device, in eval mode."""
    head = load_dense_head(safe_load(run.checkpoint))
    if head is None:
        raise ValueError(f"{run.checkpoint}: this run has no dense head (train it with `semid train --dense both ...`)")
    return head.to(next(run.model.parameters()).device)


def build_decoder(
    run: Run,
    name: str,
    *,
    split: Split | None = None,
    alpha: float | None = None,
    num_beams: int = 20,
    num_candidates: int = 50,
    alpha_users: int | None = 2000,
    batch_size: int = 64,
    seed: int = 0,
) -> Callable[..., BeamResult]:
    """A decoder by name for a loaded run: ``auto``/``beam``/``generate`` (generative), ``dense`` or ``hybrid``.

    For ``hybrid`` the blend weight is ``alpha`` if given, else the one stored in ``RUN/hybrid.json`` for this
    checkpoint, else it is chosen on ``alpha_users`` validation users of ``split`` (never test users) and stored.
    """
    if name not in ALL_DECODERS:
        raise ValueError(f"`decoder` must be one of {list(ALL_DECODERS)}, got {name!r}")
    if name in DECODERS:
        return get_decoder(name)
    if name in ("title-beam", "title-grounded", "codes-grounded"):
        raise ValueError(f"{run.path}: decoder {name!r} needs a title run (`semid train --target title`) or, for "
                         "codes-grounded, a causal run; this is a T5 run")
    if name == "exact":
        raise ValueError(
            f"{run.path}: decoder 'exact' ranks every item by its log-likelihood and needs a causal run (the default "
            "preset); this is a T5 run: use 'beam', 'generate', 'dense' or 'hybrid'"
        )
    head = load_run_head(run)
    num_candidates = min(num_candidates, run.ids.num_items)
    if name == "dense":
        return DenseDecoder(head, run.ids)
    if alpha is None:
        alpha = _stored_alpha(run, num_candidates)
    if alpha is None:
        if split is None:
            raise ValueError(
                f"{run.path}: no blend weight chosen yet: pass `alpha`, or run `semid evaluate --run {run.path} "
                "--split test --decoder hybrid` once to choose it on validation users"
            )
        decoder = HybridDecoder(head, run.ids, alpha=0.5, num_candidates=num_candidates, beam=get_decoder("auto"))
        choice = choose_run_alpha(run, decoder, split, num_beams=num_beams, max_users=alpha_users, batch_size=batch_size, seed=seed)
        alpha = choice.alpha
    return HybridDecoder(head, run.ids, alpha=alpha, num_candidates=num_candidates, beam=get_decoder("auto"))


def validation_candidates(
    run: Run, decoder: HybridDecoder, split: Split, *, num_beams: int, max_users: int | None, batch_size: int, seed: int
) -> tuple[HybridCandidates, np.ndarray]:
    """Hybrid candidates (U, M) of a seeded sample of validation users, and their targets (U,)."""
    rows = sample_users(split.num_users, max_users, seed)
    ex = split_examples(split, run.ids, run.layout, "valid", rows=rows, max_history=run.max_history, use_user_tokens=run.use_user_tokens)
    device = next(run.model.parameters()).device
    tree = run.tree.to(device)
    parts, targets = [], []
    for index in eval_batches(ex.input_lengths, batch_size):  # loop over batches of users
        b = collate(ex, index, run.layout.pad_token_id)
        parts.append(decoder.candidates(run.model, b.input_ids.to(device), b.attention_mask.to(device), tree, run.layout, num_beams=num_beams))
        targets.append(b.target.numpy())
    cands = HybridCandidates(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in HybridCandidates._fields))
    return cands, np.concatenate(targets)


def choose_run_alpha(
    run: Run, decoder: HybridDecoder, split: Split, *, num_beams: int = 20, max_users: int | None = 2000,
    batch_size: int = 64, seed: int = 0, grid: Sequence[float] = DEFAULT_GRID, metric: str = "ndcg@10",
) -> AlphaChoice:
    """Choose the blend weight on validation users and store it in ``RUN/hybrid.json``."""
    cands, targets = validation_candidates(run, decoder, split, num_beams=num_beams, max_users=max_users, batch_size=batch_size, seed=seed)
    choice = choose_alpha(cands, torch.from_numpy(targets), grid, metric)
    write_json(
        Path(run.path) / ALPHA_FILE,
        {"alpha": choice.alpha, "metric": metric, "table": {str(a): v for a, v in choice.table.items()},
         "validation_users": int(targets.size), "num_candidates": decoder.num_candidates, **_alpha_key(run)},
    )
    log.info("hybrid: alpha %.2f chosen on %d validation users (%s by alpha: %s)", choice.alpha, targets.size, metric, choice.table)
    return choice


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _alpha_key(run: Run) -> dict[str, str]:
    """What a stored alpha depends on besides the candidate count: the exact checkpoint (path and content), IDs and
    candidate pool (an alpha chosen for the beam-only pool of older versions, which has no "pool", is not reused)."""
    return {"checkpoint": str(Path(run.checkpoint).resolve()), "checkpoint_sha256": _file_digest(Path(run.checkpoint)),
            "ids_sha256": ids_digest(run.ids), "pool": POOL}


def _stored_alpha(run: Run, num_candidates: int) -> float | None:
    """The alpha in RUN/hybrid.json if it was chosen for this checkpoint file (path and content), IDs and candidate count."""
    path = Path(run.path) / ALPHA_FILE
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        alpha = float(stored["alpha"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: corrupt hybrid blend-weight file ({type(e).__name__}: {e}); delete it to choose alpha again, or pass `alpha`"
        ) from e
    key = _alpha_key(run)
    stale = [name for name, value in key.items() if stored.get(name) != value]
    if stored.get("num_candidates") != num_candidates:
        stale.append("num_candidates")
    if stale:
        log.info("%s was chosen for another %s; choosing alpha again", path, ", ".join(stale))
        return None
    return alpha


class DenseOptionsAction(argparse.Action):
    """``--dense-option KEY=VALUE`` (repeatable) -> a dict of :class:`DenseHeadConfig` fields, values YAML-typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, option: Any = None) -> None:
        key, sep, text = str(value).partition("=")
        known = set(DenseHeadConfig.__dataclass_fields__) - {"input_dim", "mode"}
        if not sep or key not in known:
            parser.error(f"{option} must be KEY=VALUE with KEY one of {sorted(known)}, got {value!r}")
        options = dict(getattr(namespace, self.dest) or {})
        options[key] = yaml.safe_load(text)
        setattr(namespace, self.dest, options)
