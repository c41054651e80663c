"""The causal generator's losses: the code head's tree-normalised log-likelihood (optionally distilled from the
dense head's softmax) and the dense head's full softmax.

Shapes: P trained positions, L levels, K_l level l's block, D d_model, N items, W a parent's largest degree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from generator.models.causal import CausalGenerator
from generator.models.dense_loss import ColumnMask
from semid.processor import masked_log_softmax

log = logging.getLogger(__name__)


def code_loss(
    model: CausalGenerator,
    hq: torch.Tensor,
    target_tokens: torch.Tensor,
    allowed: list[torch.Tensor] | None = None,
    *,
    label_smoothing: float = 0.0,
    teacher: torch.Tensor | None = None,
    distill: float = 0.0,
    pairs: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean over targets of the item's negative log-likelihood (sum over levels), normalised over the tree.

    With node vectors, each level is computed over the children each target's parent has (the model's own tables,
    which are the tree's for the items it was built with): one logit per (position, child) pair, a log-sum-exp per
    position, no block-wide mask. A level where every parent has a single child adds log 1 = 0 and is skipped.

    Args:
        hq: FloatTensor (P, L, D), the level queries of P positions.
        target_tokens: LongTensor (P, L), the next items' code tokens (teacher forcing).
        allowed: per level a BoolTensor (P, K_l): the codes the tree allows after each target's prefix (needed
            without node vectors only).
        label_smoothing: mass spread uniformly over the allowed codes of each level.
        teacher: FloatTensor (P, N) a distribution over the trained items per position (the dense head's softmax,
            detached); with ``distill`` > 0 each level's target becomes ``(1 - distill)`` x the true code +
            ``distill`` x the teacher's mass on each child of the true parent, renormalised over those children.
            Needs node vectors.
        pairs: per level the number of (position, child) pairs, known on the host (:func:`pair_counts` of the targets,
            from :func:`child_counts`): the step then reads nothing back from the device. Without it each level counts
            them on the device and checks that every target is among its parent's children (a read per level; the
            training system checks the tables once instead, :func:`child_counts`).
    """
    if distill and teacher is None:
        raise ValueError(f"`distill` {distill} needs a `teacher` distribution")
    total = hq.new_zeros(())
    for level in range(model.layout.num_levels):  # loop over levels (L <= 4), not positions
        lo, hi = model.layout.level_range(level)
        prefix, target = target_tokens[:, :level], target_tokens[:, level] - lo
        if model.config.node_vectors and getattr(model, f"parent_keys_{level}").numel() > 1:
            if getattr(model, f"child_codes_{level}").shape[1] == 1:
                continue  # one child under every parent: log-probability 0
            nll, smooth, soft = _pair_nll(model, level, hq[:, level], prefix, target, teacher if distill else None,
                                          None if pairs is None else int(pairs[level]))
        else:
            mask = allowed[level] if allowed is not None else _root_mask(model, level, hq.shape[0])
            logp = masked_log_softmax(model.code_logits(level, hq[:, level], prefix), mask)
            nll = -logp.gather(1, target[:, None]).squeeze(1)
            smooth = -(logp.masked_fill(~mask, 0.0).sum(1) / mask.sum(1).clamp_min(1))
            soft = None
            if distill:  # the root: the teacher's mass on each code of this level
                code = model.item_tokens[1: teacher.shape[1] + 1, level] - lo
                mass = teacher.new_zeros(teacher.shape[0], hi - lo).index_add_(1, code, teacher)
                soft = -(mass / mass.sum(1, keepdim=True).clamp_min(1e-30) * logp.masked_fill(~mask, 0.0)).sum(1)
        if soft is not None:
            nll = (1 - distill) * nll + distill * soft
        if label_smoothing:
            nll = (1 - label_smoothing) * nll + label_smoothing * smooth
        total = total + nll.mean()
    return total


def _root_mask(model: CausalGenerator, level: int, P: int) -> torch.Tensor:
    """The codes the model's tables allow at a level with a single parent (the root), for P rows."""
    if not model.config.node_vectors or getattr(model, f"parent_keys_{level}").numel() != 1:
        raise ValueError("`allowed` masks are required without node vectors")
    codes = getattr(model, f"child_codes_{level}")[0]
    K = model.layout.codebook_sizes[level]
    mask = torch.zeros(K + 1, dtype=torch.bool, device=codes.device)  # slot K takes the padding: no data-sized select
    return mask.index_fill_(0, torch.where(codes >= 0, codes, K), True)[:K].expand(P, -1)


def _pair_nll(model: CausalGenerator, level: int, hq: torch.Tensor, prefix: torch.Tensor, target: torch.Tensor,
              teacher: torch.Tensor | None = None, pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(-log p(target), -mean log p over the children, and with a ``teacher`` (P, N) the cross-entropy against its
    mass on each child renormalised over the children) per position, over (position, child) pairs; ``pairs``, their
    number when the host knows it (no read back, no check)."""
    lo, hi = model.layout.level_range(level)
    s, u = model.prefix_film(level, prefix)
    q = model.head_drop(hq * s + u)  # (P, D)
    block = q @ model.code_emb.weight[lo:hi].T + model.code_bias[lo:hi]  # (P, K): the shared part, one matmul
    codes, index = model._children(level, prefix)  # (P, W)
    deg = (codes >= 0).sum(1)
    pos = torch.repeat_interleave(torch.arange(q.shape[0], device=q.device), deg, output_size=pairs)  # (R,) pairs
    slot = torch.arange(pos.numel(), device=q.device) - torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg,
                                                                                output_size=pos.numel())
    code, row = codes[pos, slot], index[pos, slot]
    table = getattr(model, f"node_vec_{level}")
    fused = (pair_dot_kernel() if q.device.type == "cpu" and q.dtype == table.dtype == torch.float32
             and not (model.config.sparse_tables and model.training) else None)  # (sparse gradients: the gathers)
    node = (fused(q, table.view_as(table), pos, row) if fused is not None  # (a view: one compiled form for every
            else (q[pos] * model.table_rows(table, row)).sum(-1))  # level's table, a Parameter's size is fixed) (R,)
    if model.training and model.config.node_dropout:  # the codes must score an item without its node vector too
        node = node * (torch.rand_like(node) >= model.config.node_dropout)
    logit = block[pos, code] + node
    P = q.shape[0]
    peak = logit.new_full((P,), float("-inf")).scatter_reduce(0, pos, logit.detach(), reduce="amax")
    lse = peak + logit.new_zeros(P).scatter_add(0, pos, (logit - peak[pos]).exp()).log()
    logp = logit - lse[pos]
    hit = code == target[pos]
    nll = -logp.new_zeros(P).scatter_add(0, pos, torch.where(hit, logp, 0.0))
    if pairs is None and not bool((logp.new_zeros(P).scatter_add(0, pos, hit.to(logp.dtype)) == 1).all()):
        raise ValueError(DISAGREE.format(level=level))
    smooth = -logp.new_zeros(P).scatter_add(0, pos, logp) / deg.clamp_min(1)
    soft = None
    if teacher is not None:  # the teacher's mass under each tree node of this level, then on each pair's child
        node = getattr(model, f"item_node_{level}")  # (N,) each trained item's node row
        mass = teacher.new_zeros(P, table.shape[0]).index_add_(1, node, teacher)[pos, row]  # (R,)
        mass = mass / mass.new_zeros(P).scatter_add(0, pos, mass).clamp_min(1e-30)[pos]
        soft = -logp.new_zeros(P).scatter_add(0, pos, mass * logp)
    return nll, smooth, soft


def dense_logits(model: CausalGenerator, h: torch.Tensor) -> torch.Tensor:
    """The dense head's scores of every item: h (P, D) -> (P, N)."""
    return model.dense_queries(h) @ model.item_vectors().T


def dense_loss(model: CausalGenerator, h: torch.Tensor, target_rows: torch.Tensor, *, log_q: torch.Tensor | None = None,
               generator: torch.Generator | None = None, masked: ColumnMask | None = None) -> torch.Tensor:
    """The dense head's loss (``DenseHead.loss``: full or sampled softmax). h: (P, D); target_rows: (P,); log_q: (N,);
    ``masked``: columns kept out of each position's softmax (:func:`history_columns`)."""
    return model.dense_head.loss(model.dense_queries(h), target_rows, vectors_of=model.item_vectors, log_q=log_q,
                                 generator=generator, masked=masked)


def history_columns(histories: torch.Tensor, real: torch.Tensor, target_rows: torch.Tensor, num_items: int) -> ColumnMask:
    """The columns each training position's softmax leaves out with ``seen_negatives`` False: the items of its own
    history so far (its inputs up to and including the position, within the training window of ``max_history``
    items, where serving leaves out the whole history given), never its target. histories (B, T) item rows + 1
    (0: pad); real (P,) the flat positions trained; target_rows (P,); num_items: N, the columns of the full softmax.
    Sparse: the (position, history item) pairs (at most P x T) are matched to the columns holding those items by
    one sort and two binary searches (a column set may hold an item twice), then set in a (P, C) mask; no (P, C)
    comparison or gather (on a GPU the pairs' count is read back: two host reads a step, with this option only)."""
    B, T = histories.shape
    b, t = real // T, real % T  # each trained position's history and place in it
    earlier = torch.arange(T, device=histories.device)[None, :] <= t[:, None]  # (P, T) its inputs so far
    item = histories[b] - 1  # (P, T) their rows, -1: pad
    keep = earlier & (item >= 0) & (item != target_rows[:, None])
    pos, item = keep.nonzero(as_tuple=True)[0], item[keep]  # the (position, history item) pairs

    def masked(columns: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros(real.numel(), num_items if columns is None else columns.numel(), dtype=torch.bool,
                          device=histories.device)
        if columns is None:  # the full softmax: column = item row
            return out.index_put_((pos, item), torch.ones_like(pos, dtype=torch.bool))
        srt, order = columns.sort()
        lo, hi = torch.searchsorted(srt, item), torch.searchsorted(srt, item, right=True)  # each pair's columns
        count = hi - lo
        which = torch.repeat_interleave(torch.arange(pos.numel(), device=pos.device), count)
        col = order[lo[which] + torch.arange(which.numel(), device=pos.device) - torch.repeat_interleave(
            torch.cumsum(count, 0) - count, count)]
        return out.index_put_((pos[which], col), torch.ones_like(col, dtype=torch.bool))

    return masked


def _pair_dot(q: torch.Tensor, table: torch.Tensor, pos: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Each pair's query row times its node-vector row: q (P, D), table (E, D), pos, row (R,) -> (R,). Eager, it
    makes two (R, D) gathers and their product, and as many again backward (code_head_cost.md: ~56% of the loss);
    compiled (:func:`pair_dot_kernel`), one loop each way (its gradients the same, its sums up to rounding)."""
    return (q[pos] * table[row]).sum(-1)


_FUSED: list[Callable | None] = []  # [the compiled _pair_dot, or None where none can be compiled here], once tried


def pair_dot_kernel() -> Callable | None:
    """The compiled :func:`_pair_dot` for float32 CPU tensors (``torch.compile``, sizes dynamic: one form for every
    level and model, the probe's; ~9 s once per process with a cold inductor cache, ~3 s warm; then ~3.6x the eager form forward and backward at Beauty's level 1), or None: turned off by the
    environment (``SEMID_FUSED_GATHERS=0``, as the beam's kernel) or not compilable here (a warning, once; the
    eager form then, the same numbers up to rounding)."""
    if not _FUSED:
        kernel = None
        if os.environ.get("SEMID_FUSED_GATHERS", "1") != "0":
            try:
                kernel = torch.compile(_pair_dot, dynamic=True)
                q, table = torch.ones(3, 4, requires_grad=True), nn.Parameter(torch.ones(5, 4))
                with torch.enable_grad():  # both ways, as training calls it (a table's view: `_pair_nll`)
                    pos, row = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 4, 0, 2, 3, 1])  # sizes apart: no
                    kernel(q, table.view_as(table), pos, row).sum().backward()  # size tied to another in the form
            except Exception as exc:  # noqa: BLE001 (a toolchain missing or failing: any of its errors; the probe's inputs are valid)
                log.warning("the code head's fused pair product cannot be compiled here (%s: %s); training takes the "
                            "eager form (slower). SEMID_FUSED_GATHERS=0 skips the attempt.", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
                kernel = None
        _FUSED.append(kernel)
    return _FUSED[0]


DISAGREE = ("a target's level-{level} code is not among its parent's children: the model's tables and the training items "
            "disagree (a checkpoint loaded with other semantic IDs than it was built from?): build the model from the "
            "run's own IDs")
CHUNK_ITEMS = 65536  # items per table lookup in the one-off checks and counts


def pair_levels(model: CausalGenerator) -> list[int]:
    """The levels :func:`code_loss` computes over (position, child) pairs (node vectors, more than one parent, and
    some parent with more than one child)."""
    return [level for level in range(model.layout.num_levels)
            if model.config.node_vectors and getattr(model, f"parent_keys_{level}").numel() > 1
            and getattr(model, f"child_codes_{level}").shape[1] > 1]


def child_counts(model: CausalGenerator) -> torch.Tensor:
    """LongTensor (L, N) on the CPU: for each trained item row and level, how many children its parent has at that
    level (0 on the levels that take no pairs), so a batch's pair counts are a host-side sum (:func:`pair_counts`).
    On the way it checks that every item's code at every pair level is among its parent's children in the model's
    tables (what each step would otherwise check on the device). Once per model: the tables are fixed while it trains."""
    tokens = model.item_tokens[1:]
    counts = torch.zeros(model.layout.num_levels, tokens.shape[0], dtype=torch.long)
    with torch.no_grad():
        for level in pair_levels(model):  # loop over levels (L <= 4), then chunks of items (an (n, W) table each)
            first, _ = model.layout.level_range(level)
            for lo in range(0, tokens.shape[0], CHUNK_ITEMS):
                part = tokens[lo: lo + CHUNK_ITEMS]
                codes, _ = model._children(level, part[:, :level])
                if not bool(((codes == (part[:, level] - first)[:, None]).sum(1) == 1).all()):
                    raise ValueError(DISAGREE.format(level=level))
                counts[level, lo: lo + CHUNK_ITEMS] = (codes >= 0).sum(1).cpu()
    return counts


def pair_counts(counts: torch.Tensor, rows: torch.Tensor) -> tuple[int, ...]:
    """The number of (position, child) pairs per level for the target ``rows`` (host tensors), from :func:`child_counts`."""
    return tuple(int(n) for n in counts[:, rows].sum(1))
