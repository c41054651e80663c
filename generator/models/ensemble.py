"""An ensemble of causal generators that decodes as one causal model (``CausalConfig.members`` > 1).

K members of one config (each a :class:`~generator.models.causal.CausalGenerator`, each from its own random
initialisation and dropout) are trained side by side on the same batches, each on its own loss, and served as one
model whose code head's logit of each tree edge is the *sum* of the members' logits:

    logit(c | h, p) = sum_k logit_k(c | h_k, p)   =>   p(c | h, p) ∝ prod_k p_k(c | h_k, p)

a product of the members' distributions, renormalised over the allowed codes at every level (a product of experts).
Because each member's logit is an inner product (``q_k . v_k(p, c) + b_k(p, c)``), the sum is one inner product of
the concatenated queries ``[q_1; ...; q_K]`` (``K * d_model`` wide) with the concatenated edge vectors, plus the summed
biases: every decoder of the causal model (the beam's edge tables, exact scoring, the dense head's MIPS over the
concatenated item vectors, their hybrid) runs on the ensemble unchanged, at K times the width. The state ``h`` of a
history is the members' states side by side, (..., K * d_model).

Why: two runs of the default from two seeds (60 CPU-minutes in all) rank better than one run of 60 (beam R@10
0.0779 against 0.0733 on Beauty, ``experiments/results/ensemble_seeds30.md``); one model of K members makes that the
design, with one checkpoint, one run folder and one beam.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from generator.models.causal import CausalConfig, CausalGenerator
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
        """(B, T) item rows + 1 -> (B, T, K * D): every member's states, side by side."""
        return torch.cat([m.hidden(histories) for m in self.members], dim=-1)  # loop over members

    def last_hidden(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.last_hidden(histories, lengths) for m in self.members], dim=-1)

    def level_queries(self, h: torch.Tensor) -> torch.Tensor:
        """(..., K * D) -> (..., L, K * D): each member's level queries, side by side."""
        return torch.cat([m.level_queries(x) for m, x in zip(self.members, self._split(h), strict=True)], dim=-1)

    def code_logits(self, level: int, hq: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
        """The sum of the members' raw logits over level ``level``'s block. hq: (..., K * D) the level's queries."""
        parts = [m.code_logits(level, q, prefix_tokens) for m, q in zip(self.members, self._split(hq), strict=True)]
        return torch.stack(parts).sum(0)

    def dense_queries(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.dense_queries(x) for m, x in zip(self.members, self._split(h), strict=True)], dim=-1)

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
