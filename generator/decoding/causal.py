"""Decoders of the causal generator: constrained beam search, exact ranking, dense MIPS, and their hybrid.

:class:`CausalDecoders` holds what the decoders of one model share (item paths, edge tables, item vectors; built
in :mod:`generator.decoding.paths`, optionally 16-bit, the model's N-row tables then freed for serving) and ranks
from the model's states after each history, ``h`` (B, D); :class:`~generator.decoding.protocol.StateDecoder` is
one of them by name as a :class:`~generator.decoding.protocol.Decoder` (histories in, :class:`Ranking` out):

- ``beam``: the one beam search (:mod:`generator.decoding.beam`) over the prefix tree on :class:`CausalLevels`:
  one batched product per level, masked by the tree. Scores: the item's log-likelihood (sum over levels of
  log-probabilities renormalised over the allowed codes).
- ``exact``: the same log-likelihood for *every* item. Because the prefix conditions the head through a (scale,
  shift) that does not depend on the user, each tree edge (p -> c) at level l has a fixed vector ``s_l(p) * O_c``
  and bias ``u_l(p) . O_c + b_c`` (:class:`EdgeTables`): the logits of all edges are one (B, D) x (D, E_l) product,
  normalised per parent with a scatter log-sum-exp, and an item's score is the sum of its L edges' log-probs.
  It equals the beam's score on the beam's items and is the beam's upper bound (beam = exact when M = N).
- ``dense``: top-k inner products of the dense query with the item vectors (softmax over all items = MIPS).
- ``hybrid``: a fusion of the two heads (:mod:`generator.decoding.fusion`: pool blend, full-catalogue blend (whole or
  level by level), LIGER,
  reciprocal-rank fusion or a learned per-candidate blend), chosen with its parameters on validation users.

Shapes: B histories, M beams, L levels, K_l level l's block, D d_model, N items, E_l edges (items' prefixes of
length l + 1), P_l parents (prefixes of length l).
"""

from __future__ import annotations

import torch

from generator.decoding.beam import IndexConstraint, TreeConstraint, csr_places, leaf_search
from generator.decoding.chunked import (
    DEFAULT_MAX_SCORE_BYTES,
    check_budget,
    dense_topk,
    exact_topk,
    fits,
    item_vectors,
)
from generator.decoding.fusion import Parts, fused_ranking
from generator.decoding.inputs import inputs_readable_from_vectors, serving_inputs
from generator.decoding.mips import DENSE_INDEXES, EXACT_MAX_ITEMS, dense_index
from generator.decoding.paths import (  # noqa: F401  (EDGE_CHUNK, TABLE_DTYPES, edge_tables, item_paths: re-exported)
    EDGE_CHUNK,
    PRODUCT_MAX_ROWS,
    TABLE_DTYPES,
    EdgeTables,
    ItemPaths,
    check_table_dtype,
    dense_levels,
    edge_slots,
    edge_tables,
    fused_pairs,
    item_paths,
    pair_dots,
    serving_paths,
    table_product,
    trim_heap,
    warm_fused,
)
from generator.decoding.protocol import (
    INNER_PRODUCT,
    LOG_LIKELIHOOD,
    Histories,
    Ranking,
    check_beams,
    check_k,
)
from generator.models.causal import CausalGenerator
from generator.models.ensemble import EnsembleGenerator, member_models
from semid.tree import PrefixTree

DECODERS = ("beam", "exact", "dense", "hybrid")
DENSE_STEP_FACTOR = 32  # a beam step scores all of a level's edges when B x them is at most this many times its pairs
# (and they are at most an eighth of it: the product reads the whole table, a few pairs gather less)
DENSE_STEP_MAX = 1 << 24  # and at most this many (history, edge) logits
FUSED_STEP_FACTOR = 8  # the same, where the pairs are gathered by the fused kernel (paths.fused_pairs): 3-6x cheaper
FUSED_MIN_PAIRS = 1 << 12  # a step with this many pairs or more takes the fused kernel, in decoders that use it
PAIR_CHUNK = 1 << 12  # a step's (pair, D) gathers at a time: in cache (10M items: 5.7x faster than the step's all at once)
# Over this many items (the layout's row limit) a served build is lean: the ID input reads the item vectors, freeing
# the item table (488 MB per million items), and the beam walks the paths' prefix index, freeing the prefix tree (257
# MB per million); below, the tree's byte masks are the faster step (Beauty: 25 against 27.5 ms per 128 users).
LEAN_SERVING_ITEMS = PRODUCT_MAX_ROWS
FUSED_MIN_ITEMS = LEAN_SERVING_ITEMS  # decoders over more items take the fused kernel (compiled at their build): below,
# a call's pairs are few and the kernel's ~5 s first compile in a process would not pay (Beauty: the same rate)


def drops_tree(model: CausalGenerator | EnsembleGenerator, release: bool) -> bool:
    """Whether a build of ``model``'s decoders drops its prefix tree (the beam then walks the paths' prefix index):
    a released build over :data:`LEAN_SERVING_ITEMS` items none of which were added since training."""
    return release and model.trained_items == model.num_items and model.num_items > LEAN_SERVING_ITEMS


def exact_scores(model: CausalGenerator | EnsembleGenerator, h: torch.Tensor, paths: ItemPaths, tables: EdgeTables, *,
                 per_level: bool = False) -> torch.Tensor:
    """Log-likelihood of every item for each state: (B, D) -> (B, N); with ``per_level`` its terms, (B, L, N): level
    l's log-probability of the item's code l given its codes before (summing over levels gives the (B, N) form).
    Each row is a distribution (logsumexp 0) over
    the items the model was trained with; items added after training are scored against their trained siblings'
    normaliser (``ItemPaths.norm_edge``), so old items keep their scores and a row's total mass can exceed 1. An
    ensemble's (queries and tables members first) is the sum of its members' log-likelihoods."""
    return _exact(model.level_queries(h), paths, tables, model.layout.num_levels, per_level)


def _exact(hq: torch.Tensor, paths: ItemPaths, tables: EdgeTables, levels: int, per_level: bool = False) -> torch.Tensor:
    """:func:`exact_scores` of level queries hq (B, L, D), or an ensemble's (K, B, L, D) -> (B, N), or (B, L, N)
    ``per_level``. An ensemble's members go through every step together (their edge logits (K, B, A_l) one batched
    product, normalised as K x B rows) and are summed per edge before the items read them: one set of operations
    whatever K (a single user's call pays the per-operation cost once, not K times), holding K x B x A_l floats a
    level (``CausalDecoders.decode`` counts K x B rows against its budget)."""
    B = hq.shape[-3]
    total = hq.new_zeros(B, levels, paths.tokens.shape[0]) if per_level else hq.new_zeros(B, paths.tokens.shape[0])
    for level in range(levels):  # loop over levels
        A = int(paths.active[level].numel())
        if A == 0:
            continue  # every parent has one child here (e.g. an extra level without collisions): log-prob 0
        logits = table_product(hq[..., level, :], tables.vectors[level], tables.biases[level]).reshape(-1, A)  # (K * B, A_l)
        parent = paths.active_parent[level].expand(logits.shape[0], -1)
        P, in_norm = int(paths.active_parent[level][-1]) + 1, paths.active_norm[level]  # (parents ascend)
        norm = logits if in_norm is None else logits.masked_fill(~in_norm, float("-inf"))
        peak = logits.new_full((logits.shape[0], P), float("-inf")).scatter_reduce(1, parent, norm, reduce="amax")
        sums = logits.new_zeros(logits.shape[0], P).scatter_add(1, parent, (norm - peak.gather(1, parent)).exp())
        logp = (logits - (peak + sums.log()).gather(1, parent)).view(-1, B, A).sum(0)  # (B, A_l): the members' sum
        term = torch.nn.functional.pad(logp, (0, 1))[:, paths.item_slot[level]]  # an only child: 0
        if per_level:
            total[:, level] = term
        else:
            total = total + term
    return total


class CausalLevels:
    """The causal model as a :class:`~generator.decoding.beam.Backbone`: level l's logits of every beam from its
    history's level query and the beam's prefix, one batched product per level (``code_logits``)."""

    def __init__(self, model: CausalGenerator, h: torch.Tensor) -> None:
        self.model, self.B, self.device = model, h.shape[0], h.device
        self.hq = model.level_queries(h)  # (B, L, D)

    def window(self, level: int) -> tuple[int, int]:
        return self.model.layout.level_range(level)

    def logits(self, level: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        q = self.hq[..., level, None, :]  # (B, 1, D), or an ensemble's (K, B, 1, D)
        q = q.expand(*q.shape[:-3], self.B, m, q.shape[-1]).reshape(*q.shape[:-3], self.B * m, q.shape[-1])  # (B*m, D)
        return self.model.code_logits(level, q, prefix)  # (B*m, K_l), or (K, B*m, K_l)

    def reorder(self, level: int, rows: torch.Tensor) -> None:
        pass  # the prefix is the whole per-beam state


class EdgeLevels:
    """The causal model as a :class:`~generator.decoding.beam.Backbone` read from the decoders' edge tables: a beam's
    level-l logits are its level query times the vectors of its tree node's children plus their biases (the numbers
    ``code_logits`` gives up to float rounding, without the prefix FiLM and node vectors per beam). The beam's node is
    its ``constraint``'s; a step reads one (beam, child) pair per child in the nodes' CSR runs (``child_start``):
    beams x their children, not x the level's largest degree. A pair's logit is its gathered edge vector (from a
    product-layout table's row-major copy, ``edge_rows``) times its history's query, or where the level's edges are
    few for its pairs (B x A_l <= ``dense_factor`` x pairs and A_l <= ``dense_factor`` / 8 x pairs: the product
    streams the whole table, a single user's few pairs need not) a read of one (B, D) x (D, A_l) product (exact
    scoring's numbers). Decoders over :data:`FUSED_MIN_ITEMS` items gather a step of :data:`FUSED_MIN_PAIRS` pairs
    or more with the fused kernel (``paths.fused_pairs``; the factor is then :data:`FUSED_STEP_FACTOR`: its gathers
    cost less against the product; 10M items: 130 -> 66.5 ms per 128 users, ``beam_fused.md``). An only child (no
    table row) has logit 0, its log-probability 0 either way."""

    masked = True  # its logits are -inf wherever the beam's node has no child (beam.premasked_log_softmax)

    def __init__(self, shared: CausalDecoders, h: torch.Tensor, constraint: TreeConstraint | IndexConstraint,
                 dense_factor: int | None = None) -> None:
        self.model, self.B, self.device = shared.model, h.shape[0], h.device
        self.index, self.tables, self.slots, self.constraint = shared.paths.index, shared.tables, shared.edge_slots, constraint
        self.rows = shared.edge_rows
        self.hq = self.model.level_queries(h)  # (B, L, D), or an ensemble's (K, B, L, D)
        self.dense_factor, self.fused, self.dense_slots = dense_factor, shared.fused_pairs, shared.dense[1]

    def window(self, level: int) -> tuple[int, int]:
        return self.model.layout.level_range(level)

    def logits(self, level: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        lo, hi = self.window(level)
        nodes = self.constraint.nodes  # (R,) depth-l tree nodes, -1: a dead beam (no children, masked)
        beam_hist = torch.arange(nodes.numel(), device=nodes.device) // m  # (R,) each beam's history
        if isinstance(self.constraint, IndexConstraint) and self.constraint.dense[level] is not None:
            # a nearly full level: every (beam, code) cell is a pair, its table row read by parent and code
            slot = self.constraint.dense_rows(self.dense_slots[level]).flatten()  # (R * K_l,), -1: no child
            hist, place = beam_hist[:, None].expand(-1, hi - lo).flatten().contiguous(), None  # (one beam: a view)
        else:  # (C,) one per child: its beam, its depth-(l + 1) node, its place in the (R, K_l) block (an index
            # constraint's made once for the step)
            pair_row, child, place = (self.constraint.pairs(hi - lo) if isinstance(self.constraint, IndexConstraint)
                                      else csr_places(self.index, level, nodes, hi - lo))
            slot, hist = self.slots[level].index_select(0, child), beam_hist.index_select(0, pair_row)
        vectors, C = self.tables.vectors[level], slot.numel()  # slot: each pair's table row, A: an only child
        A, lead = vectors.shape[-2], vectors.shape[:-2]  # lead: (), or an ensemble's (K,): its members' logits apart
        fused = self.fused and C >= FUSED_MIN_PAIRS and fused_pairs() is not None
        factor = self.dense_factor if self.dense_factor is not None else FUSED_STEP_FACTOR if fused else DENSE_STEP_FACTOR
        members = vectors.shape[0] if lead else 1  # the cap counts every member's logits
        if not A:  # only children: log-probability 0 either way
            edge = torch.where(slot < 0, float("-inf"), 0.0).to(self.hq.dtype).expand(*lead, -1)
        elif self.B * A <= factor * C and 8 * A <= factor * C and members * self.B * A <= DENSE_STEP_MAX:
            dense = table_product(self.hq[..., level, :], vectors, self.tables.biases[level])  # (B, A_l), as exact scoring's
            edge = torch.where(slot < 0, float("-inf"), torch.where(slot >= A, 0.0, dense[..., hist, slot.long().clamp(0, A - 1)]))
        else:  # gathers, PAIR_CHUNK pairs at a time: each pair's vector times its history's level query (pairs
            # follow beams in history order, so pair_dots may take a chunk's histories as a run)
            rows = vectors if self.rows[level] is None else self.rows[level]  # rows: one read each, not D
            edge = pair_dots(self.hq[..., level, :], rows, slot, hist, chunk=PAIR_CHUNK, bias=self.tables.biases[level],
                             fused=fused)  # (C,) or (K, C), -inf where no child, 0 for an only child
        if place is not None:  # (C,) pairs into the (R, K_l) block
            edge = self.hq.new_full((*lead, nodes.numel() * (hi - lo)), float("-inf")).index_copy_(-1, place, edge)
        return edge.view(*lead, nodes.numel(), hi - lo)

    def reorder(self, level: int, rows: torch.Tensor) -> None:
        pass  # the node is the constraint's


def beam_search(
    model: CausalGenerator, h: torch.Tensor, tree: PrefixTree, *, k: int, num_beams: int,
    trained_tree: PrefixTree | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constrained beam search from states (B, D): (items (B, k), scores (B, k), code tokens (B, k, L)) with the code
    head run per beam (the reference ``EdgeLevels`` is tested against). ``trained_tree``: as :func:`exact_scores`'s."""
    return leaf_search(CausalLevels(model, h), tree, levels=model.layout.num_levels, k=k, num_beams=num_beams,
                       trained_tree=trained_tree)


class CausalDecoders:
    """Every decoder of one causal model over one tree, sharing the item paths and (per weights) edge tables.

    Call :meth:`refresh` after the weights change (each validation epoch does); decoding is under inference mode.
    ``exact`` and ``dense`` hold at most ``max_score_bytes`` of (users x items) scores (:mod:`generator.decoding.chunked`).
    ``dense`` searches with ``dense_index`` (:func:`generator.decoding.mips.dense_index`: exact up to ``exact_max_items``
    items, an approximate faiss IVF visiting ``nprobe`` lists beyond, by default ``mips.default_nprobe``).
    ``table_dtype`` stores the edge tables and item vectors in 16 bits ("float16", "bfloat16"; products in float32,
    :mod:`generator.decoding.paths`); default "float32". ``tree`` None: a lean build (:func:`drops_tree`) never reads it.
    """

    def __init__(self, model: CausalGenerator, tree: PrefixTree | None, item_ids: torch.Tensor, *, num_beams: int = 20,
                 alpha: float | None = None, num_candidates: int = 50, trained_tree: PrefixTree | None = None,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES, dense_index: str = "auto",
                 exact_max_items: int = EXACT_MAX_ITEMS, nprobe: int | None = None, table_dtype: str = "float32") -> None:
        self.model, self.tree, self.num_beams = model, tree, num_beams
        self._lo = [model.layout.level_range(level)[0] for level in range(model.layout.num_levels)]  # each level's first token
        self._lo_t: torch.Tensor | None = None  # the same as a tensor, made at the first call
        self.table_dtype = table_dtype
        check_table_dtype(table_dtype)  # a ValueError naming the choices
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
        self.edge_slots: list[torch.Tensor] | None = None
        self.dense: tuple[list, list] = ([], [])  # nearly full levels' (P + 1, K) child and slot tables (dense_levels)
        self.edge_rows: list[torch.Tensor | None] | None = None  # row-major copies of product-layout edge tables
        self.fused_pairs = False  # whether the beam gathers its pairs with the fused kernel (set by refresh)
        self._vectors: torch.Tensor | None = None
        self._item_nodes: tuple[ItemPaths, torch.Tensor] | None = None  # (the paths they were made from, nodes)

    def refresh(self, *, release: bool = False, input_from_vectors: bool | None = None) -> CausalDecoders:
        """Build (again, after the weights changed) the paths, edge tables (``edge_rows``: row-major copies of those
        stored for their product, which the beam gathers rows from) and item vectors. ``release`` (serving): free the
        model's node vectors and its dense item table as soon as the tables hold what they give; the decoders read
        neither, but the model can no longer build them again or score codes itself (``codes-grounded``, training).
        Where the model's input reads the item table (``id_input``), it is freed only with ``input_from_vectors``
        (default None: over :data:`LEAN_SERVING_ITEMS` items): the input then reads its rows back from the item
        vectors here (``inputs.read_inputs_from``: equal up to float rounding, so near-tied items may swap)."""
        if self.model.released or (self.tree is None and (self.paths is not None or not drops_tree(self.model, release))):
            what = ", ".join(sorted(self.model.released)) or "prefix tree"  # (only a lean build goes without a tree)
            raise ValueError(f"the model's {what} were released for serving, or no prefix tree was given to a build that "
                             "needs one (drops_tree): the decoders cannot be built; load the run again")
        from_vectors = self._inputs_from_vectors(input_from_vectors, release)  # (checked before anything is built)
        device = next(self.model.parameters()).device
        self.tree = None if self.tree is None else self.tree.to(device)
        self.trained_tree = None if self.trained_tree is None else self.trained_tree.to(device)
        self.item_ids = self.item_ids.to(device)
        self.paths = item_paths(self.model, self.tree)._replace(nodes=None)  # (the build reads no nodes: freed now)
        self.tables = edge_tables(self.model, self.paths, dtype=self.table_dtype, release=release)
        self.paths, self.edge_slots = serving_paths(self.paths, edge_slots(self.paths))
        self.edge_rows = [None if v.is_contiguous() else v.contiguous() for v in self.tables.vectors]  # (the beam's gathers)
        widest = max(range(len(self.tables.vectors)), key=lambda level: self.tables.vectors[level].shape[-2])
        rows = self.tables.vectors[widest] if self.edge_rows[widest] is None else self.edge_rows[widest]
        self.fused_pairs = self.model.num_items > FUSED_MIN_ITEMS and warm_fused(rows, self.tables.biases[widest])
        self._vectors = item_vectors(self.model, dtype=self.table_dtype) if self.model.has_dense else None
        if release:  # the item table freed, or read from the vectors (large catalogues), or the inputs frozen (small)
            serving_inputs(self.model, self._vectors, from_vectors)
        self.index = None if self._vectors is None else dense_index(self._vectors, **self.index_options)
        if drops_tree(self.model, release):  # the beam walks the paths' prefix index
            self.tree = None
        widths = [hi - lo for lo, hi in map(self.model.layout.level_range, range(len(self._lo)))]
        self.dense = ([], []) if self.tree is not None else dense_levels(self.paths.index, self.edge_slots, widths)
        if release:
            trim_heap()
        return self

    def _inputs_from_vectors(self, asked: bool | None, release: bool) -> bool:
        if asked is not None and not isinstance(asked, bool):
            raise TypeError(f"`input_from_vectors` must be a bool or None, got {asked!r}")
        if asked and not release:
            raise ValueError("`input_from_vectors` frees the model's item table: it needs `release` (serving)")
        readable = all(inputs_readable_from_vectors(m) for m in member_models(self.model))
        if asked and not readable:
            raise ValueError("`input_from_vectors`: this model's ID input cannot be read from its item vectors (no "
                             "ID input, or item vectors with a content part)")
        return readable and (asked if asked is not None else self.model.num_items > LEAN_SERVING_ITEMS)

    def _ready(self) -> None:
        if self.paths is None:
            self.refresh()

    def codes_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The codes (..., L) of item rows (-1 where a row is -1): the paths' tokens less each level's first token
        (the paths' own tokens, checked when the model was built: no range check per call)."""
        if self._lo_t is None or self._lo_t.device != rows.device:
            self._lo_t = torch.tensor(self._lo, device=rows.device)
        return torch.where(rows[..., None] >= 0, self.paths.tokens[rows.clamp_min(0)] - self._lo_t, -1)

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
            on_tree = (TreeConstraint(self.tree, h.shape[0], h.device, self.trained_tree) if self.tree is not None
                       else IndexConstraint(self.paths.index, self._lo, h.shape[0], h.device, self.item_ids, self.dense[0]))
            items, scores, tokens = leaf_search(EdgeLevels(self, h, on_tree), self.tree, levels=self.model.layout.num_levels,
                                                k=k, num_beams=M, constraint=on_tree)
            return Ranking(items, scores, self.model.layout.tokens_to_codes(tokens), LOG_LIKELIHOOD, True)
        if name in ("dense", "hybrid") and self._vectors is None:
            raise ValueError("this run has no dense head (it was trained with dense_dim 0): use decoder 'beam' or 'exact'")
        small = fits(h.shape[0], N, self.max_score_bytes)  # the whole (B, N) matrix at once, or in chunks
        if name == "exact":
            members = self.tables.vectors[0].shape[0] if self.tables.vectors[0].ndim == 3 else 1  # their rows go together
            if fits(h.shape[0] * members, N, self.max_score_bytes):
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
                scores, rows = table_product(q, self._vectors).topk(k, dim=1)
            else:
                scores, rows = dense_topk(q, self._vectors, k, max_score_bytes=self.max_score_bytes)
            return Ranking(self.item_ids[rows], scores, self.codes_of_rows(rows), INNER_PRODUCT, False)
        return self._hybrid(h, k)

    @torch.inference_mode()
    def parts(self, h: torch.Tensor, *, levels: bool = False) -> Parts:
        """Both heads' distributions over every item, the generative list (the exact top C, C = ``num_candidates``)
        and the cold rows: everything a fusion reads (:mod:`generator.decoding.fusion`). One encoder pass (``h``),
        one matrix product per code level and one for the dense head; no beam, no per-candidate teacher forcing.
        ``levels``: also the exact score's per-level terms and each item's tree nodes (what the ``levels`` fusion
        reads; (B, L, N) more)."""
        self._ready()
        if self._vectors is None:
            raise ValueError("this run has no dense head (it was trained with dense_dim 0): use decoder 'beam' or 'exact'")
        code_levels = exact_scores(self.model, h, self.paths, self.tables, per_level=True) if levels else None
        exact = exact_scores(self.model, h, self.paths, self.tables) if code_levels is None else code_levels.sum(1)
        dense = table_product(self.model.dense_queries(h), self._vectors).log_softmax(1)
        return Parts(exact, dense, exact.topk(self.num_candidates, dim=1).indices, self.cold_rows.to(h.device),
                     code_levels=code_levels, item_nodes=self.item_nodes() if levels else None)

    def item_nodes(self) -> torch.Tensor:
        """(N, L + 1) int64: each item's node at every depth (the serving paths keep them narrower), made once."""
        if self._item_nodes is None or self._item_nodes[0] is not self.paths:
            self._item_nodes = (self.paths, self.paths.index.node.long())
        return self._item_nodes[1]

    def history_parts(self, histories: Histories, *, levels: bool = False) -> Parts:
        """:meth:`parts` of a batch of histories (what a fusion is chosen on; ``levels``: with the per-level terms,
        which the ``levels`` fusion reads)."""
        with torch.inference_mode():
            return self.parts(self.model.last_hidden(histories.tokens, histories.lengths), levels=levels)

    @property
    def cold_rows(self) -> torch.Tensor:
        """Rows of the items added after training (the model's ``trained_items`` onwards)."""
        return torch.arange(self.model.trained_items, self.model.num_items, device=self.item_ids.device)

    def _hybrid(self, h: torch.Tensor, k: int) -> Ranking:
        levels = self.fusion is not None and self.fusion[0] == "levels"
        return fused_ranking(self.fusion, self.parts(h, levels=levels), k, self.item_ids, self.codes_of_rows)

