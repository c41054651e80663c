"""Decoders of the causal generator: constrained beam search, exact ranking, dense MIPS, and their hybrid.

:class:`CausalDecoders` holds what the decoders of one model share (item paths, edge tables, item vectors) and
ranks from the model's states after each history, ``h`` (B, D); :class:`StateDecoder` is one of them by name as a
:class:`~generator.decoding.protocol.Decoder` (histories in, :class:`Ranking` out):

- ``beam``: beam search over the prefix tree, level by level; at level l the M beams' logits over level l's block
  come from one batched product, are masked by ``PrefixTree.allowed_mask`` (a gather, no loop over beams),
  log-softmaxed over the allowed codes, and one ``topk`` over M x K_l picks the next beams. Scores: the item's
  log-likelihood (sum over levels of log-probabilities renormalised over the allowed codes).
- ``exact``: the same log-likelihood for *every* item. Because the prefix conditions the head through a (scale,
  shift) that does not depend on the user, each tree edge (p -> c) at level l has a fixed vector ``s_l(p) * O_c``
  and bias ``u_l(p) . O_c + b_c`` (:class:`EdgeTables`): the logits of all edges are one (B, D) x (D, E_l) product,
  normalised per parent with a scatter log-sum-exp, and an item's score is the sum of its L edges' log-probs.
  It equals the beam's score on the beam's items and is the beam's upper bound (beam = exact when M = N).
- ``dense``: top-k inner products of the dense query with the item vectors (softmax over all items = MIPS).
- ``hybrid``: a fusion of the two heads (:mod:`generator.decoding.fusion`: pool blend, full-catalogue blend, LIGER,
  reciprocal-rank fusion or a learned per-candidate blend), chosen with its parameters on validation users.

Shapes: B histories, M beams, L levels, K_l level l's block, D d_model, N items, E_l edges (items' prefixes of
length l + 1), P_l parents (prefixes of length l).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from generator.decoding.chunked import DEFAULT_MAX_SCORE_BYTES, check_budget, dense_topk, exact_topk, fits
from generator.decoding.fusion import Parts, fused_ranking
from generator.decoding.mips import DEFAULT_NPROBE, DENSE_INDEXES, EXACT_MAX_ITEMS, dense_index
from generator.decoding.protocol import (
    INNER_PRODUCT,
    LOG_LIKELIHOOD,
    Histories,
    Ranking,
    check_beams,
    check_k,
)
from generator.models.causal import CausalGenerator
from generator.models.causal_loss import masked_log_softmax
from semid.tree import PrefixTree

DECODERS = ("beam", "exact", "dense", "hybrid")


class ItemPaths(NamedTuple):
    """Each item's path through the prefix tree (rows follow the semantic IDs' rows).

    tokens: LongTensor (N, L) code tokens; nodes: LongTensor (N, L + 1), node after l code tokens (0 = root).
    edge:   per level l a LongTensor (N,) the item's edge among level l's edges (``EdgeTables``'s column).
    parent_tokens: per level l a LongTensor (P_l, l), the tokens of each parent prefix.
    edge_parent:   per level l a LongTensor (E_l,) the edge's parent in [0, P_l); edge_token: (E_l,) its token.
    norm_edge:     per level l a BoolTensor (E_l,): the edge is in its parent's normaliser: it leads to an item the
                   model was trained with, or its parent has no such edge (a node that only added items reach).
    active:        per level l a LongTensor (A_l,): the edges whose parent has two or more (an only child has
                   log-probability 0, so exact scoring skips it); active_parent: (A_l,) their parents renumbered
                   0..; item_slot: (N,) the item's edge among the active ones, A_l for an only child.
    """

    tokens: torch.Tensor
    nodes: torch.Tensor
    edge: list[torch.Tensor]
    parent_tokens: list[torch.Tensor]
    edge_parent: list[torch.Tensor]
    edge_token: list[torch.Tensor]
    norm_edge: list[torch.Tensor]
    active: list[torch.Tensor]
    active_parent: list[torch.Tensor]
    item_slot: list[torch.Tensor]


def item_paths(model: CausalGenerator, tree: PrefixTree) -> ItemPaths:
    """Walk every item's code tokens down the tree (one ``next_nodes`` per level, vectorised over items)."""
    tokens = model.item_tokens[1:].to(tree.device)
    N, L = tokens.shape
    nodes = [torch.zeros(N, dtype=torch.long, device=tree.device)]
    for level in range(L):
        nodes.append(tree.next_nodes(nodes[-1], tokens[:, level]))
    nodes_t = torch.stack(nodes, 1)
    if (nodes_t < 0).any():
        bad = int(torch.nonzero((nodes_t < 0).any(1))[0])
        raise ValueError(f"item row {bad} (codes {tokens[bad].tolist()}) is not in the prefix tree: tree and model disagree")
    edge, parent_tokens, edge_parent, edge_token, norm_edge = [], [], [], [], []
    active, active_parent, item_slot = [], [], []
    for level in range(L):
        child, first, inv = _unique_first(nodes_t[:, level + 1])
        parents, pfirst, pinv = _unique_first(nodes_t[first, level])
        edge.append(inv)
        edge_parent.append(pinv)
        edge_token.append(tokens[first, level])
        parent_tokens.append(tokens[first[pfirst], :level])
        trained = first < model.trained_items  # rows of added items come after the trained ones
        parent_trained = torch.zeros(parents.numel(), dtype=torch.long, device=tree.device).scatter_reduce(
            0, pinv, trained.long(), reduce="amax").bool()
        norm_edge.append(trained | ~parent_trained[pinv])
        degree = torch.bincount(pinv, minlength=parents.numel())
        act = torch.nonzero(degree[pinv] > 1).squeeze(1)
        _, act_parent = torch.unique(pinv[act], return_inverse=True)
        slot = torch.full((child.numel(),), act.numel(), dtype=torch.long, device=tree.device)
        slot[act] = torch.arange(act.numel(), device=tree.device)
        active.append(act)
        active_parent.append(act_parent)
        item_slot.append(slot[inv])
    return ItemPaths(tokens, nodes_t, edge, parent_tokens, edge_parent, edge_token, norm_edge, active, active_parent, item_slot)


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique values, index of a first occurrence of each, inverse) of a 1-D tensor."""
    values, inv = torch.unique(x, return_inverse=True)
    first = torch.full((values.numel(),), x.numel(), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inv, torch.arange(x.numel(), device=x.device), reduce="amin")
    return values, first, inv


class EdgeTables(NamedTuple):
    """Per level l, for the active edges (``ItemPaths.active``): vectors (A_l, D) and biases (A_l,) such that
    edge logits = level query @ vectors.T + biases."""

    vectors: list[torch.Tensor]
    biases: list[torch.Tensor]


@torch.no_grad()
def edge_tables(model: CausalGenerator, paths: ItemPaths) -> EdgeTables:
    vectors, biases = [], []
    for level in range(model.layout.num_levels):  # loop over levels
        act = paths.active[level]
        p = paths.edge_parent[level][act]
        s, u = model.prefix_film(level, paths.parent_tokens[level][p])  # (A_l, D) each
        token = paths.edge_token[level][act]
        out = model.code_emb.weight[token]  # (A_l, D)
        if model.config.node_vectors:
            lo, _ = model.layout.level_range(level)
            out = out + model.edge_node_vectors(level, paths.parent_tokens[level][p], token - lo)
        vectors.append(s * out)
        biases.append((u * out).sum(-1) + model.code_bias[token])
    return EdgeTables(vectors, biases)


def exact_scores(model: CausalGenerator, h: torch.Tensor, paths: ItemPaths, tables: EdgeTables) -> torch.Tensor:
    """Log-likelihood of every item for each state: (B, D) -> (B, N). Each row is a distribution (logsumexp 0) over
    the items the model was trained with; items added after training are scored against their trained siblings'
    normaliser (``ItemPaths.norm_edge``), so old items keep their scores and a row's total mass can exceed 1."""
    hq = model.level_queries(h)  # (B, L, D)
    B = h.shape[0]
    total = h.new_zeros(B, paths.tokens.shape[0])
    for level in range(model.layout.num_levels):  # loop over levels
        A = int(paths.active[level].numel())
        if A == 0:
            continue  # every parent has one child here (e.g. an extra level without collisions): log-prob 0
        logits = hq[:, level] @ tables.vectors[level].T + tables.biases[level]  # (B, A_l)
        parent = paths.active_parent[level].expand(B, -1)
        P = int(paths.active_parent[level].max()) + 1
        in_norm = paths.norm_edge[level][paths.active[level]]
        norm = logits if bool(in_norm.all()) else logits.masked_fill(~in_norm, float("-inf"))
        peak = logits.new_full((B, P), float("-inf")).scatter_reduce(1, parent, norm, reduce="amax")
        sums = logits.new_zeros(B, P).scatter_add(1, parent, (norm - peak.gather(1, parent)).exp())
        logp = logits - (peak + sums.log()).gather(1, parent)  # (B, A_l)
        total = total + torch.nn.functional.pad(logp, (0, 1))[:, paths.item_slot[level]]  # an only child: 0
    return total


class TreeMask:
    """The beam's tree state: each beam's node (and its node in the trained tree when items were added since)."""

    def __init__(self, tree: PrefixTree, trained_tree: PrefixTree | None, B: int, device: torch.device) -> None:
        self.tree, self.trained_tree = tree, trained_tree
        self.nodes = torch.zeros(B, dtype=torch.long, device=device)  # (B*m,) tree node of each beam, -1 = dead
        self.old_nodes = self.nodes.clone()  # the same prefixes in trained_tree (-1 where only added items lead)

    def logp(self, logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        allowed = self.tree.allowed_mask(self.nodes, token_range=(lo, hi))
        if self.trained_tree is None:
            return masked_log_softmax(logits, allowed)
        norm = self.trained_tree.allowed_mask(self.old_nodes, token_range=(lo, hi))
        norm = torch.where(norm.any(1, keepdim=True), norm, allowed)
        return (logits - logits.masked_fill(~norm, float("-inf")).logsumexp(1, keepdim=True)).masked_fill(~allowed, float("-inf"))

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        self.nodes = torch.where(alive, self.tree.next_nodes(self.nodes[rows], tokens), -1)
        if self.trained_tree is not None:
            self.old_nodes = self.trained_tree.next_nodes(self.old_nodes[rows], tokens)


class NoMask:
    """No tree: each level's log-softmax over its whole block (free generation)."""

    def logp(self, logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return logits.log_softmax(-1)

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        pass


def beam_levels(model: CausalGenerator, h: torch.Tensor, *, num_beams: int, mask: TreeMask | NoMask
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal beam search's loop over levels, from states (B, D): (code tokens (B*M, L), scores (B, M)), best
    first. ``mask`` gives each level's log-probabilities (over what the tree allows, or the whole block) and follows
    the beams; one batched product per level (``code_logits``), one ``topk`` over M x K_l; no loop over beams."""
    layout = model.layout
    B, M, L = h.shape[0], num_beams, layout.num_levels
    device = h.device
    hq = model.level_queries(h)  # (B, L, D)
    scores = torch.zeros(B, 1, dtype=h.dtype, device=device)  # (B, m)
    prefix = torch.empty(B, 0, dtype=torch.long, device=device)  # (B*m, level) chosen code tokens
    m = 1
    for level in range(L):  # the only loop: over levels
        lo, hi = layout.level_range(level)
        K = hi - lo
        q = hq[:, level, None, :].expand(B, m, -1).reshape(B * m, -1)  # (B*m, D)
        logp = mask.logp(model.code_logits(level, q, prefix), lo, hi)  # (B*m, K)
        cand = (scores[:, :, None] + logp.view(B, m, K)).view(B, m * K)
        if m * K < M:  # fewer candidates than beams: pad with dead ones
            cand = torch.nn.functional.pad(cand, (0, M - m * K), value=float("-inf"))
        scores, idx = cand.topk(M, dim=1)  # (B, M), best first
        parent = (idx // K).clamp_max(m - 1)
        rows = (torch.arange(B, device=device)[:, None] * m + parent).view(-1)  # (B*M,)
        tokens = (idx % K).view(-1) + lo
        mask.advance(rows, tokens, torch.isfinite(scores.view(-1)))
        prefix = torch.cat([prefix[rows], tokens[:, None]], dim=1)
        m = M
    return prefix, scores


def beam_search(
    model: CausalGenerator, h: torch.Tensor, tree: PrefixTree, *, k: int, num_beams: int,
    trained_tree: PrefixTree | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constrained beam search from states (B, D): (items (B, k), scores (B, k), code tokens (B, k, L)).

    With ``trained_tree`` (the tree of the items the model was trained with, when items were added since), each
    node's log-probabilities are normalised over its trained children where it has any, as :func:`exact_scores` does.
    """
    B, M, L = h.shape[0], num_beams, model.layout.num_levels
    mask = TreeMask(tree, trained_tree, B, h.device)
    prefix, scores = beam_levels(model, h, num_beams=num_beams, mask=mask)
    leaves = tree.next_nodes(mask.nodes, torch.full_like(mask.nodes, model.layout.eos_token_id))  # the eos step adds log 1 = 0
    top = leaves.view(B, M)[:, :k]
    items = torch.where(top >= 0, tree.node_value[top.clamp_min(0)], -1)
    if (items < 0).any():
        raise RuntimeError("beam search kept a path outside the prefix tree among the top k: the tree is not fixed-length")
    return items, scores[:, :k].contiguous(), prefix.view(B, M, L)[:, :k].contiguous()


class CausalDecoders:
    """Every decoder of one causal model over one tree, sharing the item paths and (per weights) edge tables.

    Call :meth:`refresh` after the weights change (each validation epoch does); decoding is under inference mode.
    ``exact`` and ``dense`` hold at most ``max_score_bytes`` of (users x items) scores (:mod:`generator.decoding.chunked`).
    ``dense`` searches with ``dense_index`` (:func:`generator.decoding.mips.dense_index`: exact up to ``exact_max_items``
    items, an approximate faiss IVF visiting ``nprobe`` lists beyond).
    """

    def __init__(self, model: CausalGenerator, tree: PrefixTree, item_ids: torch.Tensor, *, num_beams: int = 20,
                 alpha: float | None = None, num_candidates: int = 50, trained_tree: PrefixTree | None = None,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES, dense_index: str = "auto",
                 exact_max_items: int = EXACT_MAX_ITEMS, nprobe: int = DEFAULT_NPROBE) -> None:
        self.model, self.tree, self.num_beams = model, tree, num_beams
        self.max_score_bytes = check_budget(max_score_bytes)
        if dense_index not in DENSE_INDEXES:
            raise ValueError(f"`dense_index` must be one of {DENSE_INDEXES}, got {dense_index!r}")
        self.index_options = {"kind": dense_index, "exact_max_items": exact_max_items, "nprobe": nprobe}
        self.index = None  # the dense decoder's faiss index, when it uses one
        if (trained_tree is None) != (model.trained_items == model.num_items):
            raise ValueError("`trained_tree` (the tree of the items the model was trained with) must be given exactly "
                             f"when items were added after training ({model.num_items - model.trained_items} were)")
        held = 0 if trained_tree is None else int(torch.unique(trained_tree.node_value[trained_tree.node_value >= 0]).numel())
        if trained_tree is not None and held != model.trained_items:
            raise ValueError(f"`trained_tree` holds {held} items, but the model was trained with {model.trained_items}: "
                             "build it from the IDs the model was trained with")
        self.trained_tree = trained_tree
        self.item_ids = torch.as_tensor(item_ids, dtype=torch.long)
        if self.item_ids.numel() != model.num_items:
            raise ValueError(f"`item_ids` must hold the model's {model.num_items} items, got {self.item_ids.numel()}")
        self.num_candidates = min(num_candidates, model.num_items)
        # the hybrid's fusion (kind, params); a given `alpha` means the pool blend with that weight
        self.fusion: tuple[str, dict] | None = None if alpha is None else ("blend", {"alpha": float(alpha)})
        self.paths: ItemPaths | None = None
        self.tables: EdgeTables | None = None
        self._vectors: torch.Tensor | None = None

    def refresh(self) -> CausalDecoders:
        device = next(self.model.parameters()).device
        self.tree = self.tree.to(device)
        self.trained_tree = None if self.trained_tree is None else self.trained_tree.to(device)
        self.item_ids = self.item_ids.to(device)
        self.paths = item_paths(self.model, self.tree)
        self.tables = edge_tables(self.model, self.paths)
        self._vectors = self.model.item_vectors().detach() if self.model.has_dense else None
        self.index = None if self._vectors is None else dense_index(self._vectors, **self.index_options)
        return self

    def _ready(self) -> None:
        if self.paths is None:
            self.refresh()

    def codes_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        tokens = self.paths.tokens[rows.clamp_min(0)]
        return torch.where(rows[..., None] >= 0, self.model.layout.tokens_to_codes(tokens), -1)

    # ---- decoders ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, name: str, h: torch.Tensor, *, k: int, num_beams: int | None = None) -> Ranking:
        """Top-k for states h (B, D) with decoder ``name`` (one of :data:`DECODERS`); ``num_beams`` overrides the
        beam's for one call."""
        if name not in DECODERS:
            raise ValueError(f"`decoder` must be one of {list(DECODERS)} for this run, got {name!r}")
        self._ready()
        N = self.model.num_items
        check_k(k, N, "the catalogue size")
        if name == "beam":
            M = self.num_beams if num_beams is None else num_beams
            check_beams(M, k, N)
            items, scores, tokens = beam_search(self.model, h, self.tree, k=k, num_beams=M, trained_tree=self.trained_tree)
            return Ranking(items, scores, self.model.layout.tokens_to_codes(tokens), LOG_LIKELIHOOD, True)
        if name in ("dense", "hybrid") and self._vectors is None:
            raise ValueError("this run has no dense head (it was trained with dense_dim 0): use decoder 'beam' or 'exact'")
        small = fits(h.shape[0], N, self.max_score_bytes)  # the whole (B, N) matrix at once, or in chunks
        if name == "exact":
            if small:
                scores, rows = exact_scores(self.model, h, self.paths, self.tables).topk(k, dim=1)
            else:
                scores, rows = exact_topk(self.model, h, self.paths, self.tables, k, max_score_bytes=self.max_score_bytes)
            return Ranking(self.item_ids[rows], scores, self.codes_of_rows(rows), LOG_LIKELIHOOD, True)
        if name == "dense":
            q = self.model.dense_queries(h)
            if self.index is not None:
                res = self.index.search(q, k)
                scores, rows = res.scores.to(h.device), res.item_ids.to(h.device)  # rows; -1 where the index ran short
                items = torch.where(rows >= 0, self.item_ids[rows.clamp_min(0)], -1)
                return Ranking(items, scores, self.codes_of_rows(rows), INNER_PRODUCT, False)
            if small:
                scores, rows = (q @ self._vectors.T).topk(k, dim=1)
            else:
                scores, rows = dense_topk(q, self._vectors, k, max_score_bytes=self.max_score_bytes)
            return Ranking(self.item_ids[rows], scores, self.codes_of_rows(rows), INNER_PRODUCT, False)
        return self._hybrid(h, k)

    @torch.inference_mode()
    def parts(self, h: torch.Tensor) -> Parts:
        """Both heads' distributions over every item, the generative list (the exact top C, C = ``num_candidates``)
        and the cold rows: everything a fusion reads (:mod:`generator.decoding.fusion`). One encoder pass (``h``),
        one matrix product per code level and one for the dense head; no beam, no per-candidate teacher forcing."""
        self._ready()
        if self._vectors is None:
            raise ValueError("this run has no dense head (it was trained with dense_dim 0): use decoder 'beam' or 'exact'")
        exact = exact_scores(self.model, h, self.paths, self.tables)
        dense = (self.model.dense_queries(h) @ self._vectors.T).log_softmax(1)
        return Parts(exact, dense, exact.topk(self.num_candidates, dim=1).indices, self.cold_rows.to(h.device))

    def history_parts(self, histories: Histories) -> Parts:
        """:meth:`parts` of a batch of histories (what a fusion is chosen on)."""
        with torch.inference_mode():
            return self.parts(self.model.last_hidden(histories.tokens, histories.lengths))

    @property
    def cold_rows(self) -> torch.Tensor:
        """Rows of the items added after training (the model's ``trained_items`` onwards)."""
        return torch.arange(self.model.trained_items, self.model.num_items, device=self.item_ids.device)

    def _hybrid(self, h: torch.Tensor, k: int) -> Ranking:
        return fused_ranking(self.fusion, self.parts(h), k, self.item_ids, self.codes_of_rows)


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
