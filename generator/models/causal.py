"""The causal generator: one position per history item, every next-item target trained in one forward pass.

A user's history ``x_1 .. x_T`` (item rows) becomes T input vectors, each the sum of the item's code embeddings
(plus, optionally, a projection of its content embedding). A causal GPT-2 stack (``transformers.GPT2Model`` from a
``GPT2Config``, no pretrained weights) reads them left to right, as SASRec does: its hidden state ``h_t`` at
position t has seen ``x_1 .. x_t`` only, and emits the *next* item's semantic ID level by level, each level
conditioned on the codes chosen so far, and (the dense head) a query for MIPS over item vectors.

The code head (per level l, on ``h``; ``p`` is the prefix of codes chosen before level l)::

    q_l(h, p) = W_l LN(h) * s_l(p) + u_l(p)            s_l, u_l: a small MLP of the prefix's code embeddings
    logit_l(c | h, p) = q_l(h, p) . (O_c + N_pc) + b_c  O: the code embeddings (tied with the input side)

``N_pc`` is a learned vector of the tree node ``p + (c,)`` (``node_vectors``; zero for a prefix not seen at
training time, so cold items fall back to their codes): it gives the head item-level capacity at the deep levels,
as the dense head's item table does, while the code embeddings share what items with a code have in common.
``s`` and ``u`` depend on the prefix only, so the logit of tree edge (p -> c) is ``W_l LN(h) . (s_l(p) * (O_c +
N_pc)) + u_l(p) . (O_c + N_pc) + b_c``: one inner product per edge. That is what makes ranking *every* item by its exact
log-likelihood a matrix product (``generator.decoding.causal.exact_scores``), and the beam a handful of gathers.
Log-probabilities are normalised over the codes the prefix tree allows after ``p`` (training and decoding alike),
so an item's score is a proper log-probability over the catalogue.

Items added after training (cold start) get input vectors and code-head scores from their codes alone
(:meth:`CausalGenerator.add_items`).

Shapes: B histories, T positions, D d_model, L levels, K_l level l's codebook, N items, V layout vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model

from generator.models.config import BackboneConfig, check_fields, from_known
from generator.models.dense import DenseHead, DenseHeadConfig, n_row_table
from generator.models.dense_loss import check_sampled_options
from generator.models.gpt2_states import gpt2_states, lean_forward_fits
from semid.layout import TokenLayout
from semid.prefix_index import PrefixIndex, find, prefix_key

DESIGN = "causal"
MAX_MEMBERS = 16  # a combined run of three four-member runs has 12


@dataclass(frozen=True)
class CausalConfig(BackboneConfig):
    """The causal design's size: the backbone's, and its heads'. ``dense_dim`` 0 means no dense head;
    ``content_dim`` 0 no content input."""

    dense_dim: int = 64  # the dense head's query and item vectors (item table); 0 for no dense head
    content_dim: int = 0  # width of the item content embeddings added to the input (0: codes only)
    node_vectors: bool = True  # a learned output vector per ID prefix (tree node), added to its code's embedding
    head_dropout: float = 0.0  # dropout on the code head's query while training
    node_dropout: float = 0.0  # while training, each (position, child) pair's node vector is dropped with this probability
    content_vectors: bool = True  # with content_dim and dense_dim: item vectors also get a projection of the content
    distill: float = 0.0  # weight of the dense head's softmax as the code head's soft target, level by level
    item_dropout: float = 0.0  # while training, each item's table row is dropped from its dense vector with this
    # probability, so the code and content parts alone score items well (the vectors items added later get)
    code_input: bool = True  # the item's input vector includes the sum of its code embeddings (False: a plain
    # SASRec's input, the study's reference inside the same harness; needs id_input)
    id_input: bool = False  # add the item's dense-table row (its ID embedding, tied as in SASRec) to its input vector;
    # needs dense_dim == d_model. ``item_dropout`` drops it per input position too, so codes alone must carry an item
    dense_loss: str = "full"  # the dense head's loss: "full" softmax over the catalogue, or "sampled" (dense_loss.py)
    dense_negatives: str = "uniform"  # sampled: extra negatives "uniform", by "popularity", or none ("in-batch")
    num_negatives: int = 1024  # sampled: random negatives per step beyond the batch's targets (not with "in-batch")
    logq_correction: bool = True  # sampled: subtract log expected count of each column (Yi et al., RecSys 2019)
    seen_negatives: bool = True  # the dense softmax of a position counts the items of its own history as negatives
    # (False: they are left out of it, as a served answer leaves the history out: `exclude_history`)
    sparse_tables: bool = False  # the N-row tables (dense item table, node vectors) get sparse gradients, and the
    # optimiser updates only the rows a step touches (generator.training.optim): a step's cost then does not grow
    # with the catalogue. Not with DDP (its reducer expects dense gradients for these tables)
    members: int = 1  # > 1: an ensemble of this many generators trained side by side and decoded as one model that
    # scores an item by the sum of their log-likelihoods, each level normalised per member (generator.models.ensemble)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sampled_options(self.dense_loss, self.dense_negatives, self.num_negatives, self.logq_correction)
        check_fields(self, positive=("members",), non_negative=("dense_dim", "content_dim"),
                     unit=("head_dropout", "node_dropout", "item_dropout", "distill"),
                     flags=("node_vectors", "content_vectors", "id_input", "code_input", "sparse_tables", "seen_negatives"))
        if self.members > MAX_MEMBERS:
            raise ValueError(f"`members` must be at most {MAX_MEMBERS} (each member is a whole model), got {self.members}")
        if not (self.code_input or self.id_input):
            raise ValueError("`code_input` False needs `id_input` True: an item's input must come from somewhere")
        if self.id_input and self.dense_dim != self.d_model:
            raise ValueError(f"`id_input` ties the input ID embedding to the dense item table: `dense_dim` must equal "
                             f"`d_model` ({self.d_model}), got {self.dense_dim}")
        if self.distill and not (self.dense_dim and self.node_vectors and self.dense_loss == "full"):
            raise ValueError(f"`distill` ({self.distill}) needs a dense head (dense_dim > 0) with the full softmax and node vectors")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CausalConfig:
        # checkpoints written before node vectors / content item vectors existed had none
        d = {"node_vectors": False, "content_vectors": False, "id_input": False, "code_input": True, **d}
        return from_known(cls, d, "causal config keys", ignore=("design",))

    def to_dict(self) -> dict[str, Any]:
        return {"design": DESIGN, **asdict(self)}


class CausalGenerator(nn.Module):
    """Histories of item rows -> next-item code logits (per level) and dense queries, at every position.

    Args:
        config: sizes.
        layout: the token layout (code blocks; the only token arithmetic).
        item_tokens: LongTensor (N, L), every item's code tokens (``layout.codes_to_tokens(ids.codes)``); row r is
            the item ``ids.item_ids[r]``. Histories are given as rows + 1 (0 is padding).
        content: FloatTensor (N, content_dim), frozen item content embeddings; required iff ``content_dim > 0``.
    """

    def __init__(
        self, config: CausalConfig, layout: TokenLayout, item_tokens: torch.Tensor, content: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if config.members != 1:
            raise ValueError(f"a config with `members` {config.members} is an ensemble: build it with "
                             "generator.models.ensemble.build_causal")
        self.config, self.layout = config, layout
        L, D = layout.num_levels, config.d_model
        item_tokens = torch.as_tensor(item_tokens, dtype=torch.long)
        if item_tokens.ndim != 2 or item_tokens.shape[1] != L:
            raise ValueError(f"`item_tokens` must be (N, {L}), got shape {tuple(item_tokens.shape)}")
        # row 0 is the padding item (all pad tokens, whose embedding is zero)
        pad = torch.full((1, L), layout.pad_token_id, dtype=torch.long)
        self.register_buffer("item_tokens", torch.cat([pad, item_tokens]), persistent=True)  # (N + 1, L)
        self.trained_items = int(item_tokens.shape[0])  # rows from here on were added after training (add_items)
        self.released: set[str] = set()  # N-row tables freed for serving (release_tables)
        self._input_vectors: torch.Tensor | None = None  # serving: the ID input read from item vectors (decoding.inputs.read_inputs_from)
        self._input_table: torch.Tensor | None = None  # serving: every item's input, (N + 1, D) (decoding.inputs.freeze_inputs)
        self.code_emb = nn.Embedding(layout.vocab_size, D, padding_idx=layout.pad_token_id)  # input and output side
        nn.init.normal_(self.code_emb.weight, std=D**-0.5)
        with torch.no_grad():
            self.code_emb.weight[layout.pad_token_id].zero_()
        if config.content_dim:
            if content is None or content.shape != (item_tokens.shape[0], config.content_dim):
                raise ValueError(
                    f"`content` must be ({item_tokens.shape[0]}, {config.content_dim}) with content_dim > 0, "
                    f"got {None if content is None else tuple(content.shape)}"
                )
            self.register_buffer("content", torch.cat([content.new_zeros(1, config.content_dim), content.float()]), persistent=True)
            self.content_proj = nn.Linear(config.content_dim, D)
        elif content is not None:
            raise ValueError("`content` must be None with content_dim = 0")
        gpt = GPT2Config(
            vocab_size=1, n_positions=config.max_history, n_embd=D, n_layer=config.num_layers, n_head=config.num_heads,
            n_inner=config.d_ff, resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            activation_function="gelu_new", use_cache=False, bos_token_id=None, eos_token_id=None,
        )
        self.backbone = GPT2Model(gpt)
        self.lean_forward = lean_forward_fits(gpt)  # states without transformers' per-call bookkeeping (gpt2_states)
        # code head: per level a projection of the state, and a prefix MLP giving (scale, shift)
        self.level_proj = nn.ModuleList(nn.Linear(D, D) for _ in range(L))
        self.head_norm = nn.LayerNorm(D)
        self.prefix_mlp = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, 2 * D)) for _ in range(L))
        for mlp in self.prefix_mlp:  # start as "no conditioning": scale 1, shift 0
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
        self.code_bias = nn.Parameter(torch.zeros(layout.vocab_size))
        self.head_drop = nn.Dropout(config.head_dropout)
        if config.node_vectors:  # per level: the ID prefixes of length l (parents), their children and the vectors
            index = PrefixIndex(item_tokens - torch.tensor(layout.level_offsets), layout.codebook_sizes)
            for level in range(L):  # parent_keys_l (P,), child_codes_l (P, W) (-1 pads), child_index_l (P, W) into node_vec_l
                self.register_buffer(f"parent_keys_{level}", index.keys[level], persistent=True)
                self.register_buffer(f"child_codes_{level}", index.child_codes[level], persistent=True)
                self.register_buffer(f"child_index_{level}", index.child_index[level], persistent=True)
                self.register_buffer(f"item_node_{level}", index.node[:, level + 1].contiguous(), persistent=False)  # distill
                self.register_parameter(f"node_vec_{level}", nn.Parameter(n_row_table(index.keys[level + 1].numel(), D, torch.zeros)))
        if config.dense_dim:  # item vectors: a table + the item's code embeddings, projected (+ its content, projected)
            self.dense_head = DenseHead(dense_config(config), num_items=item_tokens.shape[0])
            self._register_load_state_dict_pre_hook(rename_dense_weights)

    @property
    def num_items(self) -> int:
        return int(self.item_tokens.shape[0] - 1)

    @property
    def has_dense(self) -> bool:
        return self.config.dense_dim > 0

    @property
    def uses_content_vectors(self) -> bool:
        return bool(self.config.dense_dim and self.config.content_dim and self.config.content_vectors)

    # ---- the backbone --------------------------------------------------------------------------------------------
    def item_inputs(self, rows1: torch.Tensor) -> torch.Tensor:
        """Input vectors of items given as rows + 1 (0 = padding): sum of code embeddings (+ content). (..., D)."""
        if self._input_table is not None and not self.training:  # serving (a released model): rows of all items' inputs
            return self._input_table[rows1]
        x = (self.code_emb(self.item_tokens[rows1]).sum(-2) if self.config.code_input
             else self.code_emb.weight.new_zeros(*rows1.shape, self.config.d_model))
        if self.config.id_input and self._input_vectors is not None:  # serving: table row = item vector - its code part
            codes = x if self.config.code_input else self.code_emb(self.item_tokens[rows1]).sum(-2)
            ids = self._input_vectors[(rows1 - 1).clamp_min(0)].to(codes.dtype) - self.dense_head.code_proj(codes)
            x = x + ids * (rows1 > 0).unsqueeze(-1)
        elif self.config.id_input:  # the tied ID embedding; row 0 (padding) adds nothing
            self._check_held("item_table")  # (freed for serving once the inputs were frozen: decoding.inputs)
            ids = self.table_rows(self.dense_head.item_table, (rows1 - 1).clamp_min(0)) * (rows1 > 0).unsqueeze(-1)
            if self.training and self.config.item_dropout:  # per position: the codes alone must carry the item
                ids = ids * (torch.rand(rows1.shape + (1,), device=ids.device) >= self.config.item_dropout)
            x = x + ids
        if self.config.content_dim:
            x = x + self.content_proj(self.content[rows1]) * (rows1 > 0).unsqueeze(-1)
        return x

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's)
        self._input_table = None  # (a serving table of the weights before: built again by the decoders' refresh)
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args: Any, **kwargs: Any):  # noqa: ANN201 (nn.Module's)
        self._input_table = None
        return super().load_state_dict(*args, **kwargs)

    def hidden(self, histories: torch.Tensor) -> torch.Tensor:
        """States at every position. histories: LongTensor (B, T) item rows + 1, right-padded with 0 -> (B, T, D).

        Causal: position t sees positions <= t only, so right padding never reaches a real position.
        """
        T = histories.shape[1]
        if T > self.config.max_history:
            raise ValueError(f"histories of {T} positions exceed the model's max_history {self.config.max_history}")
        x = self.item_inputs(histories)
        if self.lean_forward:  # the same arithmetic and dropout, without transformers' per-call bookkeeping and host reads
            return gpt2_states(self.backbone, x)
        return self.backbone(inputs_embeds=x).last_hidden_state

    def last_hidden(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The state after each history's last item: (B, D). Outside training the last block runs for that position
        alone (``gpt2_states(at=)``: the decoders' single-user call pays about 5/8 of a full pass)."""
        if self.lean_forward and not self.training:
            if histories.shape[1] > self.config.max_history:
                raise ValueError(f"histories of {histories.shape[1]} positions exceed the model's max_history {self.config.max_history}")
            return gpt2_states(self.backbone, self.item_inputs(histories), at=lengths - 1)
        h = self.hidden(histories)
        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]

    # ---- the code head -------------------------------------------------------------------------------------------
    def level_queries(self, h: torch.Tensor) -> torch.Tensor:
        """W_l LN(h) for every level: (..., D) -> (..., L, D)."""
        z = self.head_norm(h)
        return torch.stack([proj(z) for proj in self.level_proj], dim=-2)

    def prefix_film(self, level: int, prefix_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of level ``level`` for prefixes (..., level) of code tokens -> two (..., D)."""
        e = self.code_emb(prefix_tokens).sum(-2)  # (..., D); zero for the empty prefix
        s, u = self.prefix_mlp[level](e).chunk(2, dim=-1)
        return 1.0 + s, u

    def code_logits(self, level: int, hq: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """Raw logits over level ``level``'s block. hq: (..., D) that level's query; prefix_tokens: (..., level)."""
        lo, hi = self.layout.level_range(level)
        s, u = self.prefix_film(level, prefix_tokens)
        q = self.head_drop(hq * s + u)
        logits = q @ self.code_emb.weight[lo:hi].T + self.code_bias[lo:hi]
        if self.config.node_vectors:
            logits = logits + self.node_logits(level, q, prefix_tokens)
        return logits

    def table_rows(self, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of an N-row table; with ``sparse_tables`` their gradient is sparse (only these rows)."""
        return F.embedding(rows, table, sparse=True) if self.config.sparse_tables and self.training else table[rows]

    # ---- node vectors: children of each parent prefix, padded to the level's largest degree ------------------------
    def _children(self, level: int, prefix_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(child codes, node-vector rows) (..., W) of each prefix (..., level); -1 where none (or unknown prefix)."""
        offsets = torch.tensor(self.layout.level_offsets[:level], device=prefix_tokens.device)
        row = find(getattr(self, f"parent_keys_{level}"), prefix_key(prefix_tokens - offsets, self.layout.codebook_sizes))
        found, pos = (row >= 0).unsqueeze(-1), row.clamp_min(0)
        codes, index = getattr(self, f"child_codes_{level}")[pos], getattr(self, f"child_index_{level}")[pos]
        return torch.where(found, codes, -1), torch.where(found, index, -1)

    def node_logits(self, level: int, q: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """q . N over level ``level``'s block (..., K): each known child's node vector, 0 for codes without one."""
        self._check_held(f"node_vec_{level}")
        K = self.layout.codebook_sizes[level]
        table = getattr(self, f"node_vec_{level}")
        if getattr(self, f"parent_keys_{level}").numel() == 1:  # one parent (the root): a dense (K, D) table
            codes, index = getattr(self, f"child_codes_{level}")[0], getattr(self, f"child_index_{level}")[0]
            keep = codes >= 0  # padding goes to row K, dropped: no data-sized select (a host read on a GPU)
            dense = table.new_zeros(K + 1, table.shape[1]).index_add(0, torch.where(keep, codes, K), table[index.clamp_min(0)])
            return q @ dense[:K].T
        codes, index = self._children(level, prefix_tokens)  # (..., W)
        vecs = self.table_rows(table, index.clamp_min(0))  # (..., W, D)
        node = (vecs @ q.unsqueeze(-1)).squeeze(-1) * (index >= 0)  # (..., W)
        out = q.new_zeros(*q.shape[:-1], K + 1)  # column K collects the padding
        return out.scatter_add(-1, torch.where(codes >= 0, codes, K), node)[..., :K]

    def edge_node_rows(self, level: int, parent_tokens: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Rows in ``node_vec_<level>`` of the nodes parent + (c,) for parents (E, level) and codes (E,) -> (E,); -1
        where unknown. One search per edge among the level's (parent row, code) keys: no (E, W) children table."""
        self._check_held(f"node_vec_{level}")
        offsets = torch.tensor(self.layout.level_offsets[:level], device=parent_tokens.device)
        parent = find(getattr(self, f"parent_keys_{level}"), prefix_key(parent_tokens - offsets, self.layout.codebook_sizes))
        keys, rows = self._child_keys(level)
        K = self.layout.codebook_sizes[level]
        hit = find(keys, torch.where((parent >= 0) & (codes >= 0) & (codes < K), parent * K + codes, -1))
        return torch.where(hit >= 0, rows[hit.clamp_min(0)], -1)

    def _child_keys(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(parent row * K_l + code, ascending; the child's node-vector row) (C,) each, of every child in the level's
        padded tables (rows ascend, codes ascend within a row, pads last: row-major order is key order)."""
        codes, index = getattr(self, f"child_codes_{level}"), getattr(self, f"child_index_{level}")
        real = codes >= 0  # (P, W) bool: the one table of the padded size this builds
        parent = torch.repeat_interleave(torch.arange(codes.shape[0], device=codes.device), real.sum(1))
        keys = parent * self.layout.codebook_sizes[level] + codes[real]
        if keys.numel() > 1 and not bool((keys.diff() > 0).all()):
            raise ValueError(f"`child_codes_{level}` is not the prefix-tree table (codes must ascend within a row, "
                             "pads last): load the model from a checkpoint that passes its checks")
        return keys, index[real]

    # ---- the dense head (generator.models.dense) ------------------------------------------------------------------
    def dense_queries(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense_head.query(h)

    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N or C rows, dense_dim): table + projected code embeddings (+ content); added items (table row 0) score too."""
        self._check_held("item_table")
        rows1 = slice(1, None) if rows is None else rows + 1
        codes = self.code_emb(self.item_tokens[rows1]).sum(-2)  # (N, D)
        return self.dense_head.item_vectors(rows, codes=codes, content=self.content[rows1] if self.uses_content_vectors else None,
                                            sparse=self.config.sparse_tables and self.training)

    # ---- serving: the N-row tables the decoders fold into their own ----------------------------------------------
    def release_tables(self, levels: list[int] | range, *, item_table: bool = False) -> None:
        """Free the node vectors of ``levels`` (with their child tables) and, with ``item_table``, the dense item table:
        once the decoders' edge tables and item vectors are built from them, serving reads neither
        (``generator.decoding.causal.CausalDecoders.refresh(release=True)``). What would read them afterwards
        (``code_logits``, ``edge_node_rows``, ``item_vectors``) raises a ValueError; the input side must not read the
        item table (``id_input`` False). A released model is for serving only: it cannot be trained or saved whole."""
        if item_table and self.config.id_input:
            raise ValueError("the model's input reads the dense item table (`id_input`): it cannot be released")
        for level in levels if self.config.node_vectors else ():  # loop over levels
            name = f"node_vec_{level}"
            self._parameters[name] = nn.Parameter(getattr(self, name).new_empty(0, self.config.d_model), requires_grad=False)
            for buf in (f"parent_keys_{level}", f"child_codes_{level}", f"child_index_{level}", f"item_node_{level}"):
                setattr(self, buf, getattr(self, buf).new_empty(0))
            self.released.add(name)
        if item_table and self.has_dense:
            head = self.dense_head
            head.item_table = nn.Parameter(head.item_table.new_empty(0, head.item_table.shape[1]), requires_grad=False)
            self.released.add("item_table")

    def _check_held(self, name: str) -> None:
        if name in self.released:
            raise ValueError(f"the model's {name} was released for serving (the decoders' edge tables and item vectors "
                             "hold what it gave): load the run again to decode with the model itself")

    # ---- cold start ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_items(self, item_tokens: torch.Tensor, content: torch.Tensor | None = None) -> None:
        """Append M items known by their code tokens (M, L) (and content (M, content_dim) where the model uses it).

        Their input vectors and code-head scores come from their codes alone; their dense table rows start at zero
        (a dense score of 0 until trained).
        """
        if self.released:
            raise ValueError(f"the model's {', '.join(sorted(self.released))} were released for serving: add items to "
                             "the run loaded again, then build its decoders")
        item_tokens = torch.as_tensor(item_tokens, dtype=torch.long, device=self.item_tokens.device)
        if item_tokens.ndim != 2 or item_tokens.shape[1] != self.layout.num_levels:
            raise ValueError(f"`item_tokens` must be (M, {self.layout.num_levels}), got shape {tuple(item_tokens.shape)}")
        self.item_tokens = torch.cat([self.item_tokens, item_tokens])
        M = item_tokens.shape[0]
        if self.config.content_dim:
            if content is None or content.shape != (M, self.config.content_dim):
                raise ValueError(f"`content` must be ({M}, {self.config.content_dim}) for this model")
            self.content = torch.cat([self.content, content.to(self.content)])
        if self.has_dense:
            self.dense_head.add_items(count=M)


def dense_config(config: CausalConfig) -> DenseHeadConfig:
    """The causal design's dense head: queries straight from the state, item vectors from a table and the item's
    code embeddings (and content, with ``content_vectors``), no normalisation."""
    content = config.content_dim if config.content_dim and config.content_vectors else 0
    return DenseHeadConfig(input_dim=config.d_model, dim=config.dense_dim, mode="both" if content else "id",
                           normalize=False, id_dropout=config.item_dropout, loss=config.dense_loss,
                           negatives=config.dense_negatives, num_random_negatives=config.num_negatives,
                           logq_correction=config.logq_correction, code_dim=config.d_model, content_dim=content)


# the dense head's weights were the model's own before it was the shared module: old name -> new name
OLD_DENSE_NAMES = {"dense_query.weight": "dense_head.query_proj.weight", "dense_query.bias": "dense_head.query_proj.bias",
                   "item_table": "dense_head.item_table", "dense_codes.weight": "dense_head.code_proj.weight",
                   "dense_content.weight": "dense_head.content_proj.weight"}


def rename_dense_weights(state: dict[str, Any], prefix: str = "", *hook_args: Any) -> dict[str, Any]:
    """``state`` (a causal state dict, changed in place and returned; also the model's load_state_dict pre-hook) with
    the dense head's weights under their names: checkpoints written before the head was shared hold the old ones."""
    for old, new in OLD_DENSE_NAMES.items():
        if prefix + old in state:
            state[prefix + new] = state.pop(prefix + old)
    return state
