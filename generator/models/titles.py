"""Title targets on the causal backbone: the next item is named by its title's tokens (GENRE-style), not its codes.

The history side is the default design's: one position per history item (the sum of its code embeddings), a
causal GPT-2 stack, a state ``h_t`` at every position (``generator.models.causal.CausalGenerator``, used for its
backbone only). The title head is a small autoregressive decoder conditioned on ``h_t``::

    s_0 = tanh(W_init LN(h_t))                        GRU state
    x_0 = start + W_cond LN(h_t);  x_j = E[y_{j-1}] + W_cond LN(h_t)
    s_{j+1} = GRU(x_j, s_j);  logits_j = LN(s_{j+1}) . E^T + b          (E: token embeddings, tied)

trained with teacher forcing on the next item's title tokens + eos (the duplicate rule's disambiguation token
included, ``semid.titles``) at every position of a window in one pass: the backbone runs once per window, the
head once over all (position, title token) pairs. Loss: the title's negative log-likelihood (sum over its tokens),
full softmax over the vocabulary (the constrained decoder renormalises over the tokens the title tree allows).

Shapes: B histories, T positions, P target positions, J title tokens, D d_model, E title_dim, V title vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.config import BACKBONE_KEYS, BackboneConfig, check_fields, from_known
from semid.layout import TokenLayout

DESIGN = "title"


@dataclass(frozen=True)
class TitleConfig(BackboneConfig):
    """The backbone's size (as :class:`CausalConfig`) and the title head's. ``vocab_size`` and ``max_title_tokens``
    come from the tokenizer and the catalogue (set by the trainer)."""

    title_dim: int = 128  # the head's GRU width and token embedding size
    title_dropout: float = 0.1
    vocab_size: int = 0  # V: tokenizer + disambiguation tokens (0 until set)
    pad_id: int = 0
    eos_id: int = 1
    tokenizer_vocab: int = 4096  # the trained BPE's size (ignored with a local tokenizer)
    max_title_tokens: int = 32  # titles are cut to this many tokens before the duplicate rule

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("title_dim", "max_title_tokens", "tokenizer_vocab"), non_negative=("vocab_size",),
                     unit=("title_dropout",))
        if self.tokenizer_vocab < 260:  # (refused by the BPE's training only, after the run folder was made)
            raise ValueError(f"`tokenizer_vocab` (--model-option tokenizer_vocab) must be at least 260 (256 bytes and the "
                             f"specials), got {self.tokenizer_vocab}")

    def backbone(self) -> CausalConfig:
        """The causal backbone's config: no code-head extras, no dense head."""
        return CausalConfig(**{k: getattr(self, k) for k in BACKBONE_KEYS}, dense_dim=0, node_vectors=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TitleConfig:
        return from_known(cls, d, "title config keys", ignore=("design",))

    def to_dict(self) -> dict[str, Any]:
        return {"design": DESIGN, **asdict(self)}


class TitleGenerator(nn.Module):
    """Histories of item rows -> the next item's title, token by token, at every position.

    Args:
        config: sizes (``vocab_size`` set).
        layout: the semantic IDs' token layout (the history input is the items' code embeddings).
        item_tokens: LongTensor (N, L), every item's code tokens (row r is the item ``ids.item_ids[r]``).
        title_targets: LongTensor (N, J) every item's title tokens + eos, padded with pad (``TitleIndex.padded_targets``).
    """

    def __init__(self, config: TitleConfig, layout: TokenLayout, item_tokens: torch.Tensor, title_targets: torch.Tensor) -> None:
        super().__init__()
        if config.vocab_size < 2:
            raise ValueError(f"`config.vocab_size` must be set (>= 2), got {config.vocab_size}")
        title_targets = torch.as_tensor(title_targets, dtype=torch.long)
        item_tokens = torch.as_tensor(item_tokens, dtype=torch.long)
        if title_targets.ndim != 2 or title_targets.shape[0] != item_tokens.shape[0]:
            raise ValueError(f"`title_targets` must be ({item_tokens.shape[0]}, J), got {tuple(title_targets.shape)}")
        if int(title_targets.min()) < 0 or int(title_targets.max()) >= config.vocab_size:
            raise ValueError(f"`title_targets` must be in [0, {config.vocab_size}), got [{int(title_targets.min())}, {int(title_targets.max())}]")
        self.config = config
        self.backbone = CausalGenerator(config.backbone(), layout, item_tokens)
        self.register_buffer("title_targets", title_targets, persistent=True)  # (N, J)
        self.register_buffer("title_lengths", (title_targets != config.pad_id).sum(1), persistent=True)  # (N,) incl. eos
        D, E, V = config.d_model, config.title_dim, config.vocab_size
        self.cond_norm = nn.LayerNorm(D)
        self.init_proj = nn.Linear(D, E)
        self.cond_proj = nn.Linear(D, E)
        self.start = nn.Parameter(torch.zeros(E))
        self.tok_emb = nn.Embedding(V, E)
        nn.init.normal_(self.tok_emb.weight, std=E**-0.5)
        self.gru = nn.GRU(E, E, batch_first=True)
        self.out_norm = nn.LayerNorm(E)
        self.out_bias = nn.Parameter(torch.zeros(V))
        self.drop = nn.Dropout(config.title_dropout)

    @property
    def layout(self) -> TokenLayout:
        return self.backbone.layout

    @property
    def num_items(self) -> int:
        return self.backbone.num_items

    # ---- the backbone --------------------------------------------------------------------------------------------
    def hidden(self, histories: torch.Tensor) -> torch.Tensor:
        """(B, T) item rows + 1, right-padded -> (B, T, D)."""
        return self.backbone.hidden(histories)

    def last_hidden(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.backbone.last_hidden(histories, lengths)

    # ---- the title head ------------------------------------------------------------------------------------------
    def title_start(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(GRU state (B, E), per-step conditioning (B, E)) from backbone states (B, D)."""
        z = self.cond_norm(h)
        return torch.tanh(self.init_proj(z)), self.cond_proj(z)

    def token_logits(self, out: torch.Tensor) -> torch.Tensor:
        """GRU outputs (..., E) -> logits (..., V)."""
        return self.out_norm(out) @ self.tok_emb.weight.T + self.out_bias

    def step(self, prev: torch.Tensor | None, state: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step for R rows: previous tokens (R,) (None: the first step), state (R, E), cond (R, E)
        -> (logits (R, V), new state (R, E))."""
        x = (self.start.expand_as(cond) if prev is None else self.tok_emb(prev)) + cond
        out, s = self.gru(x[:, None, :], state[None].contiguous())
        return self.token_logits(out[:, 0]), s[0]

    def title_nll(self, h: torch.Tensor, rows: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Negative log-likelihood of each target item's title (sum over its tokens and eos). h (P, D), rows (P,) -> (P,).
        ``label_smoothing``: each token's target spreads that share uniformly over the title vocabulary (training)."""
        tgt = self.title_targets[rows]  # (P, J)
        lengths = self.title_lengths[rows]
        J = int(lengths.max())
        tgt = tgt[:, :J]
        state, cond = self.title_start(h)
        inputs = torch.cat([self.start.expand(tgt.shape[0], 1, -1), self.tok_emb(tgt[:, :-1])], dim=1) + cond[:, None]
        out, _ = self.gru(self.drop(inputs), state[None].contiguous())  # (P, J, E); causal, so padding never leaks back
        real = torch.arange(J, device=h.device)[None, :] < lengths[:, None]  # (P, J)
        nll = F.cross_entropy(self.token_logits(self.drop(out[real])), tgt[real], reduction="none",
                              label_smoothing=label_smoothing)  # (R,) real tokens only
        owner = torch.arange(tgt.shape[0], device=h.device)[:, None].expand(-1, J)[real]
        return nll.new_zeros(tgt.shape[0]).index_add(0, owner, nll)
