"""An ensemble of causal generators that decodes as one causal model (``CausalConfig.members`` > 1).

K members of one config (each a :class:`~generator.models.causal.CausalGenerator`, each from its own random
initialisation and dropout) are trained side by side on the same batches, each on its own loss, and served as one
model that scores an item by the *sum* of the members' log-likelihoods (the product of their distributions):

    score(item | history) = sum_k log p_k(item | history) = sum_k sum_l log p_k(c_l | h_k, c_<l)

Each level's log-probabilities are normalised per member, then summed: the decoders take the members' logits with
a leading member dimension (``level_queries`` (K, ..., L, D), ``code_logits`` (K, ..., K_l), the edge tables (K, A_l,
D)) and add their log-softmaxes (``generator.decoding.beam.TreeConstraint``, ``exact_scores``). Summing the logits
instead (one model K times as wide) would renormalise the product at every level, which sharpens each level's
distribution and ranks worse (Beauty, two 30-minute seeds: R@10 0.0730 against 0.0779 for the sum of
log-likelihoods, ``experiments/results/ensemble_seeds30_composed.md``).

The dense head's scores are the sum of the members' logits: one inner product of the concatenated queries with the
concatenated item vectors (``K * dense_dim`` wide), so the dense decoder stays one MIPS; over the whole catalogue the
sum of the members' log-softmaxes differs from it by a constant per history, so both rank alike. The state ``h`` of a
history is the members' states side by side, (..., K * d_model).

Why: two runs of the default from two seeds (60 CPU-minutes in all) rank better than one run of 60 (exact R@10
0.0779 against 0.0733 on Beauty, ``experiments/results/ensemble_seeds30.md``); one model of K members makes that the
design, with one checkpoint, one run folder and one beam.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.gpt2_states import stack_gpt2, stacked_states
from semid.layout import TokenLayout


class EnsembleGenerator(nn.Module):
    """``config.members`` causal generators of ``config`` (with ``members`` 1) as one model (module docstring).

    Args: as :class:`CausalGenerator`'s; each member gets the same item tokens (and content) and its own weights.
    """

    def __init__(self, config: CausalConfig, layout: TokenLayout, item_tokens: torch.Tensor,
                 content: torch.Tensor | None = None) -> None:
        super().__init__()
        if config.members < 2:
            raise ValueError(f"an ensemble needs `members` >= 2, got {config.members}; build a CausalGenerator")
        self.config, self.layout = config, layout
        one = replace(config, members=1)
        self.members = nn.ModuleList(CausalGenerator(one, layout, item_tokens, content) for _ in range(config.members))
        self._stacked: tuple[tuple[Any, ...], dict[str, torch.Tensor]] | None = None  # (weights' versions, stack)
        self._params: list[nn.Parameter] | None = None  # the members' backbone parameters, listed once
        self._input_table: torch.Tensor | None = None  # serving: the members' inputs of every item, (K, N + 1, D)

    @classmethod
    def of(cls, models: list[CausalGenerator]) -> EnsembleGenerator:
        """An ensemble of generators trained apart (e.g. from other seeds): one config and one catalogue, weights copied."""
        if len(models) < 2 or not all(isinstance(m, CausalGenerator) for m in models):
            raise ValueError(f"an ensemble is made of two causal generators or more, got {[type(m).__name__ for m in models]}")
        first = models[0]
        for i, m in enumerate(models[1:], 1):  # loop over members
            if m.config != first.config:
                raise ValueError(f"member {i}'s config differs from member 0's: {m.config} != {first.config}")
            if m.layout.to_dict() != first.layout.to_dict() or not torch.equal(m.item_tokens, first.item_tokens):
                raise ValueError(f"member {i} has another token layout or catalogue than member 0")
            if m.released:
                raise ValueError(f"member {i}'s {sorted(m.released)} were released for serving: load it again")
        if first.num_items != first.trained_items:
            raise ValueError("members with items added after training: make the ensemble first, then add the items")
        content = first.content[1:] if first.config.content_dim else None
        out = cls(replace(first.config, members=len(models)), first.layout, first.item_tokens[1:], content)
        for mine, theirs in zip(out.members, models, strict=True):
            mine.load_state_dict(theirs.state_dict())
        return out.train(first.training)

    # ---- what the decoders read of a causal model: the first member's item tables, the members' widths summed ------
    @property
    def item_tokens(self) -> torch.Tensor:
        return self.members[0].item_tokens

    @property
    def trained_items(self) -> int:
        return self.members[0].trained_items

    @property
    def num_items(self) -> int:
        return self.members[0].num_items

    @property
    def has_dense(self) -> bool:
        return self.members[0].has_dense

    @property
    def released(self) -> set[str]:
        return set().union(*(m.released for m in self.members))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(..., K * D) -> K tensors (..., D): each member's part of a concatenated state or query."""
        D = self.config.d_model
        if x.shape[-1] != D * len(self.members):
            raise ValueError(f"expected the members' states side by side ({len(self.members)} x {D} wide), got width {x.shape[-1]}")
        return x.split(D, dim=-1)

    def hidden(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, T) item rows + 1 -> (B, T, K * D): every member's states, side by side. Outside training the members'
        backbones run as one (``stacked_states``: one batched product per layer for all K), the per-call cost a
        single history pays once instead of K times; with gradients on (or in training) they run one by one."""
        if self.training or torch.is_grad_enabled() or not all(m.lean_forward for m in self.members):  # the stack is detached
            return torch.cat([m.hidden(histories) for m in self.members], dim=-1)  # loop over members
        B, T = histories.shape
        if T > self.config.max_history:
            raise ValueError(f"histories of {T} positions exceed the model's max_history {self.config.max_history}")
        h = stacked_states([m.backbone for m in self.members], self._stacked_weights(), self._inputs(histories))
        return h.permute(1, 2, 0, 3).reshape(B, T, -1)

    def _inputs(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, T) item rows + 1 -> (K, B, T, D): each member's input vectors; a served ensemble's from one table."""
        if self._input_table is not None:  # (set on a released model only: decoding.inputs.freeze_inputs)
            return self._input_table[:, histories]
        return torch.stack([m.item_inputs(histories) for m in self.members])  # loop over members

    def _stacked_weights(self) -> dict[str, torch.Tensor]:
        """The members' backbone weights stacked, made again whenever one of them changed (an optimiser step, a load,
        the weight average's swap: each bumps the tensor's version) or moved. A model released for serving
        (``release_tables``) is never trained again: its stack, once checked against the versions after the release
        (a stack made before it may be stale), is kept without reading them again (0.2 ms of a single user's call)."""
        if self._stacked is not None and self._stacked[0] is None:  # (checked since the release)
            return self._stacked[1]
        if self._params is None:  # walking the modules costs more than one user's states; the Parameters stay
            self._params = [p for m in self.members for mod in (m.backbone, m.head_norm, m.level_proj, *self._query_projs(m))
                            for p in mod.parameters()]  # (moves and loads change their data)
        key = tuple((p._version, p.data_ptr()) for p in self._params)  # a move or a cast gives new storage
        if self._stacked is None or self._stacked[0] != key:
            w = stack_gpt2([m.backbone for m in self.members])
            with torch.no_grad():  # the code head's norm and level projections: (K, 1, D) and (K, D, L * D)
                w["head.w"] = torch.stack([m.head_norm.weight for m in self.members])[:, None]
                w["head.b"] = torch.stack([m.head_norm.bias for m in self.members])[:, None]
                w["proj.w"] = torch.stack([torch.cat([p.weight for p in m.level_proj]).T for m in self.members])
                w["proj.b"] = torch.stack([torch.cat([p.bias for p in m.level_proj]) for m in self.members])[:, None]
                if self.has_dense:  # the dense head's query projections: (K, D, d) and (K, 1, d)
                    w["query.w"] = torch.stack([m.dense_head.query_proj.weight.T for m in self.members])
                    w["query.b"] = torch.stack([m.dense_head.query_proj.bias for m in self.members])[:, None]
            self._stacked = (key, w)
        if self.released:
            self._stacked = (None, self._stacked[1])
        return self._stacked[1]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's)
        self._params, self._stacked, self._input_table = None, None, None  # a conversion may replace Parameters
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args: Any, **kwargs: Any):  # noqa: ANN201 (nn.Module's)
        self._params, self._stacked, self._input_table = None, None, None  # assign=True replaces the Parameters
        return super().load_state_dict(*args, **kwargs)

    def last_hidden(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, K * D): each member's state after each history's last item. Outside training, with gradients off, the
        members' backbones run as one and their last block for that position alone (``stacked_states(at=)``)."""
        if self.training or torch.is_grad_enabled() or not all(m.lean_forward for m in self.members):
            h = self.hidden(histories)
            return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
        B, T = histories.shape
        if T > self.config.max_history:
            raise ValueError(f"histories of {T} positions exceed the model's max_history {self.config.max_history}")
        h = stacked_states([m.backbone for m in self.members], self._stacked_weights(), self._inputs(histories),
                           at=lengths - 1)  # (K, B, D)
        return h.permute(1, 0, 2).reshape(B, -1)

    def level_queries(self, h: torch.Tensor) -> torch.Tensor:
        """(..., K * D) -> (K, ..., L, D): each member's level queries, members first. Outside training, with
        gradients off, one batched product for all members and levels (their weights stacked with the backbones')."""
        parts = self._split(h)
        if self.training or torch.is_grad_enabled():
            return torch.stack([m.level_queries(x) for m, x in zip(self.members, parts, strict=True)])
        K, D, L = len(self.members), self.config.d_model, self.layout.num_levels
        w = self._stacked_weights()
        x = torch.stack(parts).reshape(K, -1, D)  # (K, R, D)
        z = torch.addcmul(w["head.b"], F.layer_norm(x, (D,), eps=self.members[0].head_norm.eps), w["head.w"])
        return torch.baddbmm(w["proj.b"], z, w["proj.w"]).view(K, *h.shape[:-1], L, D)

    def code_logits(self, level: int, hq: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """Each member's raw logits over level ``level``'s block, (K, ..., K_l), from its queries hq (K, ..., D)."""
        return torch.stack([m.code_logits(level, q, prefix_tokens) for m, q in zip(self.members, hq, strict=True)])

    def dense_queries(self, h: torch.Tensor) -> torch.Tensor:
        """(..., K * D) -> (..., K * d): the members' dense queries side by side. Outside training, with gradients
        off, one batched product for all members (their projections stacked; normalised heads, never the causal
        design's, go member by member)."""
        if self.training or torch.is_grad_enabled() or self.members[0].dense_head.config.normalize:
            return torch.cat([m.dense_queries(x) for m, x in zip(self.members, self._split(h), strict=True)], dim=-1)
        K, D, w = len(self.members), self.config.d_model, self._stacked_weights()  # (equal to the members' own up to
        q = torch.baddbmm(w["query.b"], torch.stack(self._split(h)).reshape(K, -1, D), w["query.w"])  # float rounding)
        return q.permute(1, 0, 2).reshape(*h.shape[:-1], -1)

    @staticmethod
    def _query_projs(member: CausalGenerator) -> tuple[nn.Module, ...]:
        return (member.dense_head.query_proj,) if member.has_dense else ()

    def item_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N or C rows, K * dense_dim): a query's inner product with them is the sum of the members' dense logits."""
        return torch.cat([m.item_vectors(rows) for m in self.members], dim=-1)

    def release_tables(self, levels: list[int] | range, *, item_table: bool = False) -> None:
        for m in self.members:
            m.release_tables(levels, item_table=item_table)

    @torch.no_grad()
    def add_items(self, item_tokens: torch.Tensor, content: torch.Tensor | None = None) -> None:
        for m in self.members:
            m.add_items(item_tokens, content)


def member_models(model: Any) -> list[CausalGenerator]:
    """The causal generators a model trains: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, EnsembleGenerator) else [model]


def build_causal(config: CausalConfig, layout: TokenLayout, item_tokens: torch.Tensor,
                 content: torch.Tensor | None = None) -> CausalGenerator | EnsembleGenerator:
    """The causal model ``config`` describes: one generator, or an ensemble of ``config.members``."""
    cls = EnsembleGenerator if config.members > 1 else CausalGenerator
    return cls(config, layout, item_tokens, content)
