"""The T5 generator's decoding step, written once: shared by beam search, teacher-forced scoring and the hybrid.

Semantic IDs need much less than stock ``model.generate`` does: exactly L tokens, level l drawn from level l's block
of K_l tokens, every hypothesis a path of the prefix tree. So a :class:`T5Step`

1. runs the encoder once per history and computes each decoder layer's cross-attention keys/values once per
   history, (B, H, S, d_kv); the m rows of a history (its beams, or its candidates) attend to them together as m
   query positions, so nothing is expanded or copied per row;
2. keeps only the decoder self-attention cache per row, (L, n_layers, 2, R, H, d_kv), R = B * m rows;
3. computes level l's logits against level l's rows of the output embedding only, (R, K_l): it is the
   :class:`~generator.decoding.beam.Backbone` of the one beam search (``window``, ``logits``, ``reorder``);
   ``beam.TreeConstraint`` masks them and renormalises over what the tree allows, for the beam and teacher forcing.

The step is written from the T5 modules' weights (``q``/``k``/``v``/``o``, layer norms, relative position bias,
feed-forward blocks called as they are) because ``T5Stack`` takes one batch dimension for self- and cross-attention
alike and would need the cross-attention cache copied per row. It is exact: beam search over it equals stock
``generate`` with the same beams (tests/test_beam.py).

:func:`score_codes` is teacher forcing on the same step: the log-likelihood of given code tuples.

Shapes: B histories, S encoder tokens, m rows per history, R = B * m, L levels, K_l level l's block, D d_model,
H heads.
"""

from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from generator.decoding.beam import TreeConstraint
from semid.layout import TokenLayout
from semid.tree import PrefixTree

CPU_MEMORY_BUDGET = 64 << 20  # bytes per chunk on CPU: chunks that stay cache-friendly are faster than big ones
GPU_MEMORY_FRACTION = 0.25  # of the free device memory per chunk on an accelerator
MAX_BATCH_SIZE = 4096


class T5Step:
    """One T5 decoder position at a time for R = B * m rows; row b * m + j is row j of history b; holds their cache.

    Args:
        model: a ``T5ForConditionalGeneration`` in eval mode; layout: its token layout.
        input_ids, attention_mask: (B, S) encoder inputs on the model's device.
    """

    def __init__(self, model: T5ForConditionalGeneration, layout: TokenLayout, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> None:
        c, dec = model.config, model.decoder
        B, S = input_ids.shape
        L, H, dk, device = layout.num_levels, c.num_heads, c.d_kv, input_ids.device
        self.model, self.layout, self.B, self.H, self.dk = model, layout, B, H, dk
        # encoder once per history; cross-attention keys/values once per history and layer, shared by its rows
        enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, D)
        self.cross = []
        for block in dec.block:  # loop over layers
            att = block.layer[1].EncDecAttention
            keys_t = att.k(enc).view(B, S, H, dk).permute(0, 2, 3, 1).contiguous()  # (B, H, dk, S)
            values = att.v(enc).view(B, S, H, dk).transpose(1, 2).contiguous()  # (B, H, S, dk)
            self.cross.append((keys_t, values))
        self.enc_bias = torch.zeros(B, 1, 1, S, dtype=enc.dtype, device=device)  # additive, as T5's eager mask
        self.enc_bias.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(enc.dtype).min)
        pos_bias = dec.block[0].layer[0].SelfAttention.compute_bias(L, L, device=device)  # (1, H, L, L)
        self.pos_bias = pos_bias[0].permute(1, 2, 0)[:, :, None, :].contiguous()  # (L query, L key, 1, H)
        # output embedding and its T5 rescale (tied embeddings: d_model ** -0.5 on the decoder output)
        self.head = model.get_output_embeddings()
        self.scale = c.d_model**-0.5 if getattr(c, "scale_decoder_outputs", c.tie_word_embeddings) else 1.0
        self.dtype, self.device, self.n_layers = enc.dtype, device, len(dec.block)

    # ---- the Backbone of generator.decoding.beam: rows are a history's beams, or its candidates -----------------
    def window(self, level: int) -> tuple[int, int]:
        return self.layout.level_range(level)

    def logits(self, level: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None = None) -> torch.Tensor:
        """Level ``level``'s logits (R, K_l) float32 of every row after ``prefix`` LongTensor (R, level), its code
        tokens so far: one decoder position, whose input is the previous code's token (bos at level 0); the
        position's keys/values are written into the rows' self-attention cache (a new one at level 0)."""
        R = prefix.shape[0]
        if level == 0:
            self.cache = torch.empty(self.layout.num_levels, self.n_layers, 2, R, self.H, self.dk, dtype=self.dtype, device=self.device)
            tokens = torch.full((R,), self.layout.bos_token_id, dtype=torch.long, device=self.device)
        else:
            tokens = prefix[:, -1]
        lo, hi = self.layout.level_range(level)
        hidden = _decoder_step(self.model.decoder, tokens, self.cache, level, self.pos_bias, self.cross, self.enc_bias, m)  # (R, D)
        logits = (hidden * self.scale) @ self.head.weight[lo:hi].T  # (R, K)
        if self.head.bias is not None:
            logits = logits + self.head.bias[lo:hi]
        return logits.float()

    def reorder(self, level: int, rows: torch.Tensor) -> None:
        """The cache of new rows taken from ``rows`` (R',) of the old ones; only the filled positions move."""
        if level + 1 < self.layout.num_levels:  # nothing reads the cache after the last level
            out = self.cache.new_empty(*self.cache.shape[:3], rows.numel(), *self.cache.shape[4:])
            torch.index_select(self.cache[: level + 1], 3, rows, out=out[: level + 1])
            self.cache = out


def _decoder_step(dec: torch.nn.Module, tokens: torch.Tensor, cache: torch.Tensor, t: int, pos_bias: torch.Tensor,
                  cross: list[tuple[torch.Tensor, torch.Tensor]], enc_bias: torch.Tensor, m: int) -> torch.Tensor:
    """One decoder position for every row, T5's forward pass (eval mode: no dropout).

    Args:
        dec: the model's decoder ``T5Stack``.
        tokens: LongTensor (R,) decoder input at position t, R = B*m rows, history-major.
        cache: (L, n_layers, 2, R, H, dk) self-attention keys/values by position; position t is written here.
        pos_bias: (L, L, 1, H) decoder relative position bias [query, key] (shared by all layers, as in T5).
        cross: per layer (keys transposed (B, H, dk, S), values (B, H, S, dk)), shared by a history's m rows.
        enc_bias: (B, 1, 1, S) additive encoder padding mask.
    Returns:
        (R, D) the final-layer-normed decoder output at position t.
    """
    R = tokens.shape[0]
    B = R // m
    x = dec.embed_tokens(tokens)  # (R, D)
    bias_t = pos_bias[t, : t + 1]  # (t+1, 1, H)
    for i, block in enumerate(dec.block):
        # self-attention over positions 0..t of the row's own cache; T5 does not scale q.k
        sa = block.layer[0]
        att = sa.SelfAttention
        H, dk = att.n_heads, att.key_value_proj_dim
        h = sa.layer_norm(x)
        q = att.q(h).view(R, H, dk)
        cache[t, i, 0] = att.k(h).view(R, H, dk)
        cache[t, i, 1] = att.v(h).view(R, H, dk)
        w = ((cache[: t + 1, i, 0] * q).sum(-1) + bias_t).softmax(0)  # (t+1, R, H)
        x = x + att.o((w[..., None] * cache[: t + 1, i, 1]).sum(0).view(R, H * dk))
        # cross-attention: the m rows of a history are m query positions against its keys/values
        ca = block.layer[1]
        att = ca.EncDecAttention
        h = ca.layer_norm(x)
        q = att.q(h).view(B, m, H, dk).transpose(1, 2)  # (B, H, m, dk)
        keys_t, values = cross[i]
        w = (q @ keys_t + enc_bias).softmax(-1)  # (B, H, m, S)
        x = x + att.o((w @ values).transpose(1, 2).reshape(R, H * dk))
        x = block.layer[-1](x)  # T5LayerFF: layer norm, feed-forward, residual
    return dec.final_layer_norm(x)


def auto_batch_size(model: T5ForConditionalGeneration, seq_len: int, rows: int, layout: TokenLayout) -> int:
    """Histories per chunk so that one chunk's working memory fits the budget (``rows`` per history).

    The budget is ``CPU_MEMORY_BUDGET`` on CPU and ``GPU_MEMORY_FRACTION`` of the free memory on an accelerator;
    the estimate per history counts the encoder's activations (attention scores and feed-forward, S x S and
    S x d_ff), the cross-attention keys/values and the per-row decoder state, logits and candidates.
    """
    c = model.config
    inner = c.num_heads * c.d_kv
    K = max(layout.codebook_sizes)
    encoder = seq_len * (4 * c.d_model + c.d_ff + 2 * c.num_heads * seq_len)
    cross = 2 * c.num_decoder_layers * inner * seq_len
    per_row = rows * (2 * c.num_decoder_layers * inner * layout.num_levels + c.d_ff + 4 * c.d_model + 6 * K)
    per_history = (encoder + cross + per_row) * model.dtype.itemsize
    device = model.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_MEMORY_FRACTION)
    else:
        budget = CPU_MEMORY_BUDGET
    return int(max(1, min(MAX_BATCH_SIZE, budget // per_history)))


@torch.inference_mode()
def score_codes(model: T5ForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tree: PrefixTree, layout: TokenLayout, codes: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Log-likelihood of given code tuples by teacher forcing: the score beam search gives the items it finds.

    For each history and candidate the decoder reads [bos, c_1 .. c_{L-1}]; at level l the candidate's code is
    gathered from the step's log-softmax renormalised over what the tree allows after its prefix (as in the beam), and
    the levels are summed. The encoder runs once per history; its C candidates are C rows of one step.

    Args:
        model: ``T5ForConditionalGeneration`` in eval mode; input_ids, attention_mask: (B, S).
        tree: the items' prefix tree on any device; codes: LongTensor (B, C, L) code tuples (-1 in an empty slot).
        batch_size: histories per chunk; None picks it from the memory budget.
    Returns:
        FloatTensor (B, C); -inf where a tuple is not in the tree.
    """
    device = model.device
    tree = tree.to(device)  # itself where it is already there
    input_ids, attention_mask, codes = input_ids.to(device), attention_mask.to(device), codes.to(device)
    B, S = input_ids.shape
    if codes.ndim != 3 or codes.shape[0] != B or codes.shape[2] != layout.num_levels:
        raise ValueError(f"`codes` must be a LongTensor (B={B}, C, L={layout.num_levels}), got shape {tuple(codes.shape)}")
    C = codes.shape[1]
    if B == 0 or C == 0:
        return torch.zeros(B, C, dtype=torch.float32, device=device)
    chunk = batch_size or auto_batch_size(model, S, C, layout)
    return torch.cat([_score_chunk(T5Step(model, layout, input_ids[i : i + chunk], attention_mask[i : i + chunk]), tree, codes[i : i + chunk])
                      for i in range(0, B, chunk)])  # loop over chunks of histories


def _score_chunk(step: T5Step, tree: PrefixTree, codes: torch.Tensor) -> torch.Tensor:
    """score_codes for one chunk of B histories with C candidates each: (B, C)."""
    B, C, L = codes.shape
    flat = codes.reshape(B * C, L)  # row b * C + j is candidate j of history b
    prefix = torch.empty_like(flat)  # (B*C, L) their tokens (a code out of range clamped into its level's block)
    on_tree = TreeConstraint(tree, B * C, step.device)  # node -1 once a candidate leaves the tree
    rows = torch.arange(B * C, device=step.device)
    total = torch.zeros(B * C, dtype=torch.float32, device=step.device)
    for level in range(L):  # the only loop: over levels
        lo, hi = step.window(level)
        logp = on_tree.logp(step.logits(level, prefix[:, :level], C), lo, hi)  # (B*C, K)
        code = flat[:, level]
        ok = (code >= 0) & (code < hi - lo)
        safe = code.clamp(0, hi - lo - 1)
        total = total + torch.where(ok, logp.gather(1, safe[:, None]).squeeze(1), float("-inf"))
        prefix[:, level] = safe + lo
        on_tree.advance(rows, prefix[:, level], ok, level)
    return total.view(B, C)
