"""What the causal decoders of one model share, built once from the model and its prefix tree: each item's path
through the tree (:class:`ItemPaths`), the edge tables (:class:`EdgeTables`: one vector and bias per tree edge, the
code head's logits as one product) and each edge's table row (:func:`edge_slots`).

Serving memory: the tables may be stored in 16 bits (``table_dtype`` "float16" or "bfloat16"; default "float32").
Products with them are then taken in float32 on ``chunk`` rows upcast at a time (:func:`table_product`), so a ranking's
arithmetic stays float32 and only the stored vectors are rounded. With ``release`` the build frees each level's node
vectors from the model once its edge table holds them (``CausalGenerator.release_tables``).

Shapes: N items, L levels, D d_model, E_l edges of level l (items' prefixes of length l + 1), P_l parents (prefixes
of length l), A_l active edges (whose parent has two or more children).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch

from generator.models.causal import CausalGenerator
from generator.models.ensemble import EnsembleGenerator
from semid.prefix_index import PrefixIndex
from semid.tree import PrefixTree

log = logging.getLogger(__name__)
EDGE_CHUNK = 1 << 16  # edges per step of the edge tables' build
UPCAST_CHUNK = 1 << 12  # rows of a 16-bit table upcast at a time for a product: in cache (1M items' level 1: 51 -> 31 ms)
TABLE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRODUCT_MAX_ROWS = 1 << 17  # decoder tables up to this many rows are stored for their product (product_layout)


def check_table_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``table_dtype`` name (one of :data:`TABLE_DTYPES`), or a ValueError naming them."""
    if name not in TABLE_DTYPES:
        raise ValueError(f"`table_dtype` must be one of {list(TABLE_DTYPES)}, got {name!r}")
    return TABLE_DTYPES[name]


def for_product(rows: int) -> bool:
    """Whether a decoder table of ``rows`` rows is stored for its product (:func:`product_layout`): up to
    :data:`PRODUCT_MAX_ROWS`. Larger ones (a level's edges or the item vectors of a catalogue of millions) are read
    by rows (the beam's gathered children, chunked exact scoring's items) and multiplied in chunks, so they stay
    row-major: a row gathered from the transposed storage touches D cache lines instead of D / 16, and faiss reads
    row-major vectors without a copy."""
    return rows <= PRODUCT_MAX_ROWS


def product_layout(table: torch.Tensor) -> torch.Tensor:
    """``table`` (..., A, D) as the decoders store it: up to :data:`PRODUCT_MAX_ROWS` rows the same (..., A, D)
    tensor with its storage (..., D, A) contiguous (a transposed view; already so: returned as it is), else row-major.
    ``q @ table.mT`` then has a contiguous right operand, which BLAS runs 2-4x faster for a few queries over a table
    larger than the cache (one user over Beauty's four-member item vectors: 2.4 -> 0.8 ms,
    ``experiments/results/latency_layout.md``); rows are still rows (``table[rows]`` gathers them)."""
    if not for_product(table.shape[-2]):
        return table.contiguous()
    return table if table.mT.is_contiguous() else table.mT.contiguous().mT


def pair_dots(hq: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, hist: torch.Tensor, *, chunk: int,
              bias: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """The beam's (beam, child) pairs' logits: ``table[rows[i]] . hq[hist[i]]`` (+ ``bias[rows[i]]``) for each pair
    i, in ``hq``'s dtype, -inf where ``rows[i] < 0`` (no child), 0 where ``rows[i] >= A`` (an only child: no table
    row): hq (B, D), table (A, D) row-major, A >= 1, bias (A,), rows and hist (C,) -> (C,); an ensemble's, members
    first: (K, B, D), (K, A, D), (K, A) -> (K, C). ``fused`` (where :func:`fused_pairs` has a kernel): one compiled
    pass, no (C, D) temporaries (10M items' wide levels: 2x the chunks); only the forms :func:`warm_fused` compiled
    run (a call needing another compile takes the chunks: ``FALLBACKS``). Else ``chunk`` pairs at a time, their
    temporaries in cache. Pairs follow beams and beams their histories (``hist`` ascending), so a chunk's histories
    are a run of n: where n <= 8 (a wide level, ~3,000 pairs per history at 10M items, or a single user) they are
    one (c, D) x (D, n) product read at each pair's column, else each pair's own product with its history's query."""
    kernel = fused_pairs() if fused else None
    if kernel is not None:
        reason = "in use: another thread's call, or a build compiling it"  # (torch's stance is global, not per thread)
        if _KERNEL_LOCK.acquire(blocking=False):
            try:
                with torch.compiler.set_stance("fail_on_recompile"):  # never a compile inside a request
                    out = kernel(hq.reshape(-1, *hq.shape[-2:]).contiguous(), table.reshape(-1, *table.shape[-2:]),
                                 None if bias is None else bias.reshape(-1, bias.shape[-1]), rows.long(), hist.long())
                return out.reshape(*hq.shape[:-2], -1)
            except Exception as exc:  # noqa: BLE001 (a form not compiled, or the compiler failing: the chunks instead)
                reason = f"no compiled form for it: {type(exc).__name__}"
            finally:
                _KERNEL_LOCK.release()
        FALLBACKS[0] += 1
        if FALLBACKS[0] == 1:
            log.warning("the beam's fused pair kernel was not used for a call (%s); it gathers in chunks (said "
                        "once)", reason)
    C, (A, D), lead = rows.numel(), table.shape[-2:], hq.shape[:-2]
    slot, rows = rows, rows.clamp(0, A - 1)
    if hq.shape[-2] == 1 and C <= chunk:  # one history's pairs (a single user's call): one product, nothing to pick
        out = (table.index_select(-2, rows).to(hq.dtype) @ hq.mT).squeeze(-1)  # (C,), or (K, C)
        out = out if bias is None else out.add_(bias.index_select(-1, rows).to(hq.dtype))
        return torch.where(slot < 0, float("-inf"), torch.where(slot >= A, 0.0, out))
    starts = torch.arange(0, C, chunk, device=hist.device)
    spans = torch.stack([hist[starts], hist[(starts + chunk - 1).clamp_max(C - 1)]], 1).tolist()  # one read for all
    out = hq.new_empty(*lead, C)
    for a, (first, last) in zip(range(0, C, chunk), spans, strict=True):  # loop over chunks of pairs
        h, v = hist[a : a + chunk] - first, table.index_select(-2, rows[a : a + chunk]).to(hq.dtype)  # (c,), (c, D)
        if last - first < 8:
            prod = v @ hq[..., first : last + 1, :].mT  # (c, n), or (K, c, n)
            out[..., a : a + chunk] = prod.gather(-1, h.expand(*lead, -1).unsqueeze(-1)).squeeze(-1)
        else:
            q = hq.index_select(-2, h + first).reshape(-1, D, 1)  # (c, D, 1), or (K * c, D, 1)
            out[..., a : a + chunk] = torch.bmm(v.reshape(-1, 1, D), q).view(*lead, -1)
    out = out if bias is None else out + bias.index_select(-1, rows).to(hq.dtype)
    return torch.where(slot < 0, float("-inf"), torch.where(slot >= A, 0.0, out))


def _pair_form(hq: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
               hist: torch.Tensor) -> torch.Tensor:
    """What :func:`fused_pairs` compiles: (K, B, D), (K, A, D), (K, A) or None, (C,), (C,) -> (K, C), as
    :func:`pair_dots` (-inf for a row < 0, 0 for a row >= A). Run as it is, it would hold two (K, C, D) temporaries;
    compiled, the gathers, upcast, products, sums and masks are one loop."""
    A, row = table.shape[1], rows.clamp(0, table.shape[1] - 1)
    out = (table.index_select(1, row).to(hq.dtype) * hq.index_select(1, hist)).sum(-1)
    out = out if bias is None else out + bias.index_select(1, row).to(hq.dtype)
    return torch.where(rows < 0, float("-inf"), torch.where(rows >= A, 0.0, out))


_FUSED: list[Callable | None] = []  # [the compiled kernel, or None where none can be compiled here], once tried
FALLBACKS = [0]  # calls asked to fuse that took the chunks (a form warm_fused did not compile, or the kernel busy)
_KERNEL_LOCK = threading.Lock()  # one user of the kernel (and of torch's compile stance) at a time: a call or a warm-up


def fused_pairs() -> Callable | None:
    """The compiled :func:`_pair_form` (``torch.compile``, shapes dynamic: compiled once per table dtype and for one
    or many histories, ~5 s at a process's first use, ~0.2 s for each form after), or None: turned off by the
    environment (``SEMID_FUSED_GATHERS=0``) or not compilable here (no C++ compiler: a warning, once; the beam then
    gathers in chunks, the same numbers up to float rounding)."""
    if not _FUSED:
        kernel = None
        if os.environ.get("SEMID_FUSED_GATHERS", "1") != "0":
            try:
                kernel = torch.compile(_pair_form, dynamic=True)
                with torch.inference_mode():  # (as decoding runs)
                    kernel(torch.ones(1, 5, 4), torch.ones(1, 7, 4), torch.ones(1, 7), torch.tensor([0, 6, 2]), torch.tensor([0, 1, 4]))
            except Exception as exc:  # noqa: BLE001 (a toolchain missing or failing: any of its errors; the probe's inputs are valid)
                log.warning("the beam's fused pair kernel cannot be compiled here (%s: %s); it gathers in chunks "
                            "instead (slower on catalogues of millions). SEMID_FUSED_GATHERS=0 skips the attempt.",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                kernel = None
        _FUSED.append(kernel)
    return _FUSED[0]


def warm_fused(table: torch.Tensor, bias: torch.Tensor) -> bool:
    """Compile :func:`fused_pairs`' forms for the beam's gathers from this row-major (A, D) or (K, A, D) table and
    its biases (the decoders' own tensors: the compiled forms hold to their kind), for many histories and for one,
    as decoding calls them (queries and indices made under inference mode, the queries contiguous), so that no
    request compiles; whether both then run without compiling again (else, e.g. where torch's limit of compiled forms
    is reached or the device has no compiler, a warning and False: the beam gathers in chunks)."""
    if fused_pairs() is None or table.shape[-2] < 2:
        return False
    K, A, D = table.reshape(-1, *table.shape[-2:]).shape
    B, C = [n for n in (13, 17, 23, 29, 31, 37) if n not in (K, A, D)][:2]  # distinct: no size tied to another's
    try:
        with _KERNEL_LOCK, torch.inference_mode():  # (a decoding thread's calls take the chunks meanwhile)
            rows = torch.arange(C, device=table.device) % min(A, 19)
            for stance in ("default", "fail_on_recompile"):  # compile, then check that nothing compiles again
                for n in (B, 1):  # loop over the kernel's two forms
                    hq = torch.zeros(K, n, D, device=table.device)
                    with torch.compiler.set_stance(stance):
                        _FUSED[0](hq, table.reshape(K, A, D), bias.reshape(K, A), rows, torch.arange(C, device=table.device) * n // C)
    except Exception as exc:  # noqa: BLE001 (any failure of the compiler: the chunks instead)
        log.warning("the beam's fused pair kernel cannot be compiled for %s tables on %s (%s: %s); it gathers in "
                    "chunks", table.dtype, table.device, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    return True


def new_table(rows: int, width: int, *, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (rows, width) decoder table on ``like``'s device, laid out as :func:`product_layout` stores it."""
    if for_product(rows):
        return like.new_empty(width, rows, dtype=dtype).mT
    return like.new_empty(rows, width, dtype=dtype)


def table_product(q: torch.Tensor, table: torch.Tensor, bias: torch.Tensor | None = None, *, chunk: int = UPCAST_CHUNK) -> torch.Tensor:
    """``q @ table.T (+ bias)`` in ``q``'s dtype: q (B, D), table (A, D), bias (A,) -> (B, A); an ensemble's, members
    first: q (K, B, D), table (K, A, D), bias (K, A) -> (K, B, A). A table of q's dtype is one product; a 16-bit one
    is upcast ``chunk`` rows at a time, never as a whole (each chunk taken as (D, chunk) columns, the product's
    layout: :func:`product_layout`)."""
    bias = None if bias is None else bias.unsqueeze(-2)  # (1, A) or (K, 1, A)
    if table.dtype == q.dtype:
        return q @ table.mT if bias is None else q @ table.mT + bias
    out = q.new_empty(*q.shape[:-1], table.shape[-2])
    for a in range(0, table.shape[-2], chunk):  # loop over chunks of rows
        out[..., a : a + chunk] = q @ table.mT[..., :, a : a + chunk].to(q.dtype)
    return out if bias is None else out.add_(bias)


class ItemPaths(NamedTuple):
    """Each item's path through the prefix tree (rows follow the semantic IDs' rows), from the items' prefix index
    (:class:`semid.prefix_index.PrefixIndex`; edges of level l are its depth-(l + 1) nodes).

    tokens: LongTensor (N, L) code tokens; nodes: LongTensor (N, L + 1), the tree node after l code tokens (0 = root).
    (The decoders keep a narrower copy once their tables are built: :func:`serving_paths`.)
    index:         the items' ``PrefixIndex``: level l's edges are its nodes of depth l + 1 (``index.parent[l]`` (E_l,)
                   their parents in [0, P_l), ``index.code[l]`` their codes).
    parent_tokens: per level l a LongTensor (P_l, l), the tokens of each parent prefix.
    norm_edge:     per level l a BoolTensor (E_l,): the edge is in its parent's normaliser: it leads to an item the
                   model was trained with, or its parent has no such edge (a node that only added items reach).
    active:        per level l a LongTensor (A_l,): the edges whose parent has two or more (an only child has
                   log-probability 0, so exact scoring skips it); active_parent: (A_l,) their parents renumbered
                   0..; item_slot: (N,) the item's edge among the active ones, A_l for an only child.
    active_norm:   per level l ``norm_edge`` of the active edges (A_l,), or None where every one is in its parent's
                   normaliser (no items added since training): what exact scoring masks, made once.
    """

    tokens: torch.Tensor
    nodes: torch.Tensor
    index: PrefixIndex
    parent_tokens: list[torch.Tensor]
    norm_edge: list[torch.Tensor]
    active: list[torch.Tensor]
    active_parent: list[torch.Tensor]
    item_slot: list[torch.Tensor]
    active_norm: list[torch.Tensor | None]


def item_paths(model: CausalGenerator, tree: PrefixTree | None) -> ItemPaths:
    """The model's items' paths from their prefix index; ``tree`` is their prefix tree (its node numbers are ``nodes``;
    checked against the index), or None where the decoders will not walk one (a lean serving build: the paths are
    made from the model's own item tokens, on the model's device)."""
    device = tree.device if tree is not None else model.item_tokens.device
    tokens = model.item_tokens[1:].to(device)
    N, L = tokens.shape
    index = PrefixIndex(model.layout.tokens_to_codes(tokens), model.layout.codebook_sizes).to(device)
    want = torch.cat([index.offsets.diff(), torch.tensor([N], device=device)])
    if tree is not None and not torch.equal(held := torch.bincount(tree.node_depth), want):
        raise ValueError(f"the prefix tree has {held.tolist()} nodes per depth, the model's items make {want.tolist()}: "
                         "tree and model disagree")
    parent_tokens, norm_edge, active, active_parent, item_slot = [], [], [], [], []
    for level in range(L):  # loop over levels
        parent = index.parent[level]
        parent_tokens.append(tokens[index.first_item[level], :level])
        trained = index.first_item[level + 1] < model.trained_items  # rows of added items come after the trained ones
        norm_edge.append(trained | (index.first_item[level] >= model.trained_items)[parent])  # or a parent no trained item has
        multi = torch.bincount(parent, minlength=index.keys[level].numel())[parent] > 1  # (E_l,) the edge has siblings
        act = torch.nonzero(multi).squeeze(1)
        _, act_parent = torch.unique(parent[act], return_inverse=True)
        slot = torch.where(multi, torch.cumsum(multi, 0) - 1, act.numel())  # an edge's rank among the active ones
        active.append(act)
        active_parent.append(act_parent)
        item_slot.append(slot[index.node[:, level + 1]])
    active_norm = [None if bool(x.all()) else x for x in (n[a] for n, a in zip(norm_edge, active, strict=True))]
    return ItemPaths(tokens, index.tree_nodes(), index, parent_tokens, norm_edge, active, active_parent, item_slot, active_norm)


class EdgeTables(NamedTuple):
    """Per level l, for the active edges (``ItemPaths.active``): vectors (A_l, D) and biases (A_l,) such that
    edge logits = level query @ vectors.T + biases; an ensemble's members first, (K, A_l, D) and (K, A_l)."""

    vectors: list[torch.Tensor]
    biases: list[torch.Tensor]


@torch.no_grad()
def edge_tables(model: CausalGenerator | EnsembleGenerator, paths: ItemPaths, *, chunk: int = EDGE_CHUNK, dtype: str = "float32",
                release: bool = False) -> EdgeTables:
    """The edge tables, ``chunk`` edges at a time: besides the tables, the build holds (chunk, D) temporaries and
    one int64 per edge (its node-vector row), never an (edges x children) table. The last chunk ends at the level's
    last edge (it overlaps the one before), so every product of the prefix MLP has ``chunk`` rows (or the level's
    all): on one thread the tables are bit-identical to one pass over the level (``tests/test_edge_tables.py``;
    BLAS takes another path for products of a few rows; several threads may round differently).

    dtype: the vectors' storage (:data:`TABLE_DTYPES`; computed in float32, rounded when stored; biases stay float32).
    release: free level l's node vectors from the model once its table is built (serving; the model can then no
    longer build tables or score codes itself).

    An ensemble's tables are its members', members first: vectors (K, A_l, D), biases (K, A_l)
    (:mod:`generator.models.ensemble`)."""
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"`chunk` must be a positive int, got {chunk!r}")
    if isinstance(model, EnsembleGenerator):  # the members' tables, members first: (K, A_l, D) and (K, A_l)
        parts = [edge_tables(m, paths, chunk=chunk, dtype=dtype, release=release) for m in model.members]  # loop over members
        return EdgeTables([torch.stack([x.mT for x in v]).mT if for_product(v[0].shape[0]) else torch.stack(v)  # as each member's
                           for v in zip(*(p.vectors for p in parts), strict=True)],
                          [torch.stack(b) for b in zip(*(p.biases for p in parts), strict=True)])
    store = check_table_dtype(dtype)
    L = model.layout.num_levels
    vectors, biases = [None] * L, [None] * L
    weight, D = model.code_emb.weight, model.config.d_model
    for level in reversed(range(L)):  # loop over levels, deepest first: with `release` the deep levels' child tables
        # (1.5 GB at 10M items) are freed before the widest level's table is made
        act = paths.active[level]
        A, lo = int(act.numel()), model.layout.level_range(level)[0]
        parent, code = paths.index.parent[level][act], paths.index.code[level][act]  # (A_l,) each
        rows = model.edge_node_rows(level, paths.parent_tokens[level][parent], code) if model.config.node_vectors else None
        table = None if rows is None else getattr(model, f"node_vec_{level}")
        vec, bias = new_table(A, D, like=weight, dtype=store), weight.new_empty(A)  # (A, D), stored for the product
        for a in range(0, A, chunk):  # loop over chunks of edges
            b = min(A, a + chunk)
            a = max(0, b - chunk)  # the last chunk: `chunk` edges ending at the level's last
            s, u = model.prefix_film(level, paths.parent_tokens[level][parent[a:b]])  # (chunk, D) each
            token = code[a:b] + lo
            out = weight[token]  # (chunk, D)
            if rows is not None:
                out = out + table[rows[a:b].clamp_min(0)] * (rows[a:b] >= 0).unsqueeze(-1)
            vec[a:b] = s * out
            bias[a:b] = (u * out).sum(-1) + model.code_bias[token]
        vectors[level], biases[level] = vec, bias
        if release:
            del rows, table  # the level's node vectors: the model's reference is the last one
            model.release_tables([level])
    return EdgeTables(vectors, biases)


def edge_slots(paths: ItemPaths) -> list[torch.Tensor]:
    """Per level l (E_l,): each edge's row in the edge tables (its rank among the active edges), A_l for an only child."""
    out = []
    for level, act in enumerate(paths.active):  # loop over levels
        slot = torch.full_like(paths.index.parent[level], act.numel())
        slot[act] = torch.arange(act.numel(), device=act.device)
        out.append(slot)
    return out


DENSE_LEVEL_MAX = 1 << 20  # a level's (parents x codes) tables are made up to this many cells (4 MiB each)
DENSE_LEVEL_FILL = 0.5  # and where at least this share of the cells has a child


def dense_levels(index: PrefixIndex, slots: list[torch.Tensor], widths: list[int]) -> tuple[list, list]:
    """Per level l, for a level nearly full (at least half of its (P_l, K_l) cells have a child: the shallow levels
    of a catalogue of millions, where a beam's ~256 children make ~650k (beam, child) pairs per 128 users) of at most
    :data:`DENSE_LEVEL_MAX` cells, two int32 (P_l + 1, K_l) tables by parent and code: the child's row at depth
    l + 1 and its edge-table row (``slots``: A_l for an only child), -1 where the code has no child and in the last
    row (a dead beam's); else None. A beam step then reads its beams' rows of them (``IndexConstraint``,
    ``EdgeLevels``) instead of listing pairs. Returns (children, slots)."""
    children, rows = [], []
    for level, (start, width) in enumerate(zip(index.child_start, widths, strict=True)):  # loop over levels
        start = start.long()
        P, E = start.numel() - 1, int(start[-1])
        if P * width > DENSE_LEVEL_MAX or E < DENSE_LEVEL_FILL * P * width:
            children.append(None)
            rows.append(None)
            continue
        place = torch.repeat_interleave(torch.arange(P, device=start.device), start.diff()) * width + index.code[level].long()
        child, slot = (torch.full(((P + 1) * width,), -1, dtype=torch.int32, device=start.device) for _ in range(2))
        child[place], slot[place] = torch.arange(E, dtype=torch.int32, device=start.device), slots[level].to(torch.int32)
        children.append(child.view(P + 1, width))
        rows.append(slot.view(P + 1, width))
    return children, rows


def narrow(rows: torch.Tensor, bound: int) -> torch.Tensor:
    """``rows`` (int64 values in [0, bound]) as int32 where ``bound`` fits one, else as they are: tensors only ever
    used to index (never as gather / scatter indices, which want int64)."""
    return rows.to(torch.int32) if bound < 2**31 - 1 else rows


def trim_heap() -> bool:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing): a serving build
    frees more than it keeps (the model's node vectors and item table, the build's temporaries), and glibc keeps what
    small and mid-sized frees leave in its arenas (about 300 MB of a 1M-item build, ``scale_serve_trim.md``). True
    where it ran."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return False
    if trim is None:
        return False
    trim(0)
    return True


def serving_paths(paths: ItemPaths, slots: list[torch.Tensor]) -> tuple[ItemPaths, list[torch.Tensor]]:
    """What the decoders keep of ``paths`` and the edge slots once the edge tables are built: the build's
    ``nodes`` and ``parent_tokens`` dropped (None: serving reads neither; ``item_paths`` gives them again), and the
    per-item and per-edge rows that only index (``item_slot``, ``active``, the edge slots, the index's ``node``,
    ``order``, spans, parents, codes, first items and child runs; its keys stay int64) as int32 where the catalogue
    fits (below 2^31 items): about 160 of their 300 bytes per item at L = 4."""
    N = int(paths.tokens.shape[0])
    index = copy.copy(paths.index)  # the index itself stays as built (a PrefixIndex is never changed in place)
    index.node = narrow(index.node, N)
    for name in ("order", "_start", "_stop"):  # item positions and rows, in [0, N]
        setattr(index, name, narrow(getattr(index, name), N))
    for name in ("parent", "code", "first_item", "child_start"):  # per depth: node rows, codes, item rows, all <= N
        setattr(index, name, [narrow(x, N) for x in getattr(index, name)])
    out = paths._replace(nodes=None, parent_tokens=None, index=index, active=[narrow(a, N) for a in paths.active],
                         item_slot=[narrow(s, N) for s in paths.item_slot])
    return out, [narrow(s, N) for s in slots]
