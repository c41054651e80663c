"""Fast constrained beam search for fixed-length semantic IDs (the default decoder of ``recommend``).

Stock ``model.generate`` (``generator.decoding.t5_generate.generate_topk``) treats every beam as its own sequence: it expands the
encoder output to B*M rows, computes and stores the cross-attention keys/values for every beam, reorders that whole
cache at every step and projects onto the full vocabulary. Semantic IDs need much less: exactly L tokens, level l
drawn from level l's block of K_l tokens, and every hypothesis ends at a leaf of the prefix tree. So here

1. the encoder runs once per history and each decoder layer's cross-attention keys/values are computed once per
   history, (B, H, S, d_kv); the M beams of a history attend to them together as M query positions, so nothing
   is expanded or copied per beam;
2. only the decoder self-attention cache is per beam, (L, n_layers, 2, B*M, H, d_kv), and only its filled
   positions are reordered; attention over <= L positions is a multiply-add, not a batch of tiny matmuls;
3. level l's logits are computed against level l's rows of the output embedding only, (B*M, K_l);
4. the tree masks them with one gather (``PrefixTree.allowed_mask``), the log-softmax is renormalised over the
   allowed tokens, and one ``topk`` over M x K_l candidates per history picks the next beams;
5. the eos step is skipped: after the last level the tree allows only eos, which adds log 1 = 0.

The decoder step is written from the T5 modules' weights (``q``/``k``/``v``/``o``, layer norms, relative position
bias, feed-forward blocks called as they are) because ``T5Stack`` takes one batch dimension for self- and
cross-attention alike and would need the cross-attention cache copied per beam. It is exact: the result equals
``generate_topk`` with the same M (items identical, scores equal to float rounding; see tests/test_beam.py).

Shapes: B histories, S encoder tokens, M beams, L levels, K_l level l's block, D d_model, H heads, V vocabulary.
"""

from __future__ import annotations

import logging

import torch
from transformers import T5ForConditionalGeneration

from generator.decoding.t5_generate import BeamResult, check_beam_args
from semid.layout import TokenLayout
from semid.tree import PrefixTree

log = logging.getLogger(__name__)

CPU_MEMORY_BUDGET = 64 << 20  # bytes per chunk on CPU: chunks that stay cache-friendly are faster than big ones
GPU_MEMORY_FRACTION = 0.25  # of the free device memory per chunk on an accelerator
MAX_BATCH_SIZE = 4096


@torch.inference_mode()
def fast_topk(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    *,
    k: int,
    num_beams: int,
    batch_size: int | None = None,
) -> BeamResult:
    """Top-k items per history by beam search over the prefix tree, exact w.r.t. the model.

    Args:
        model: a ``T5ForConditionalGeneration`` in eval mode whose decoder starts with ``layout.bos_token_id``;
            runs on the model's device.
        input_ids: LongTensor (B, S), encoder tokens.
        attention_mask: (B, S), 1 for real tokens, 0 for padding.
        tree: the tree of every item's code tokens + eos (``PrefixTree.from_semantic_ids``); copied to the
            model's device if it is elsewhere (move it once yourself to avoid the copy per call).
        layout: the token layout the model was trained with (L = ``layout.num_levels``).
        k: items to return per history; num_beams: M >= k beams kept at every level.
        batch_size: histories decoded together; None picks it from a memory budget.
    Returns:
        BeamResult: items (B, k), scores (B, k) float32 = sum over levels of the code log-probability renormalised
        over the tokens the tree allows (as ``generate_topk``), codes (B, k, L); best first.
    """
    _check_inputs(model, input_ids, attention_mask, tree, layout, batch_size)
    # one item per eos node (the last code's node holds the same value)
    num_items = tree.num_sequences
    check_beam_args(k, num_beams, num_items)
    device = model.device
    if tree.device != device:
        log.debug("copying the prefix tree to %s for this call", device)
        tree = tree.to(device)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    B, S = input_ids.shape
    if B == 0:
        L = layout.num_levels
        empty = torch.empty(0, k, dtype=torch.long, device=device)
        return BeamResult(empty, empty.float(), torch.empty(0, k, L, dtype=torch.long, device=device))
    chunk = batch_size or auto_batch_size(model, S, num_beams, layout)
    log.debug("fast_topk: %d histories in chunks of %d, %d beams", B, chunk, num_beams)
    parts = [
        _decode_chunk(model, input_ids[i : i + chunk], attention_mask[i : i + chunk], tree, layout, k, num_beams)
        for i in range(0, B, chunk)
    ]
    return BeamResult(*(torch.cat(p, dim=0) for p in zip(*parts, strict=True)))


def auto_batch_size(model: T5ForConditionalGeneration, seq_len: int, num_beams: int, layout: TokenLayout) -> int:
    """Histories per chunk so that one chunk's working memory fits the budget.

    The budget is ``CPU_MEMORY_BUDGET`` on CPU and ``GPU_MEMORY_FRACTION`` of the free memory on an accelerator;
    the estimate per history counts the encoder's activations (attention scores and feed-forward, S x S and
    S x d_ff), the cross-attention keys/values and the per-beam decoder state, logits and candidates.
    """
    c = model.config
    inner = c.num_heads * c.d_kv
    K = max(layout.codebook_sizes)
    encoder = seq_len * (4 * c.d_model + c.d_ff + 2 * c.num_heads * seq_len)
    cross = 2 * c.num_decoder_layers * inner * seq_len
    beams = num_beams * (2 * c.num_decoder_layers * inner * layout.num_levels + c.d_ff + 4 * c.d_model + 6 * K)
    per_history = (encoder + cross + beams) * model.dtype.itemsize
    device = model.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_MEMORY_FRACTION)
    else:
        budget = CPU_MEMORY_BUDGET
    return int(max(1, min(MAX_BATCH_SIZE, budget // per_history)))


# ---- one chunk ------------------------------------------------------------------------------------------------------
def _decode_chunk(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    k: int,
    M: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam search for one chunk of B histories; returns items (B, k), scores (B, k), codes (B, k, L)."""
    c, dec = model.config, model.decoder
    B, S = input_ids.shape
    L, H, dk, device = layout.num_levels, c.num_heads, c.d_kv, input_ids.device
    neg_inf = float("-inf")

    # 1. encoder once per history; cross-attention keys/values once per history and layer, shared by its beams
    enc = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, S, D)
    cross = []
    for block in dec.block:
        att = block.layer[1].EncDecAttention
        keys_t = att.k(enc).view(B, S, H, dk).permute(0, 2, 3, 1).contiguous()  # (B, H, dk, S)
        values = att.v(enc).view(B, S, H, dk).transpose(1, 2).contiguous()  # (B, H, S, dk)
        cross.append((keys_t, values))
    enc_bias = torch.zeros(B, 1, 1, S, dtype=enc.dtype, device=device)  # (B, 1, 1, S), additive, as T5's eager mask
    enc_bias.masked_fill_(attention_mask[:, None, None, :] == 0, torch.finfo(enc.dtype).min)
    pos_bias = dec.block[0].layer[0].SelfAttention.compute_bias(L, L, device=device)  # (1, H, L, L)
    pos_bias = pos_bias[0].permute(1, 2, 0)[:, :, None, :].contiguous()  # (L query, L key, 1, H)

    # 2. output embedding and its T5 rescale (tied embeddings: d_model ** -0.5 on the decoder output)
    head = model.get_output_embeddings()
    scale = c.d_model**-0.5 if getattr(c, "scale_decoder_outputs", c.tie_word_embeddings) else 1.0

    # 3. level by level; rows are history-major: row b * m + j is beam j of history b (m = 1 before level 0)
    n_layers = len(dec.block)
    cache = torch.empty(L, n_layers, 2, B, H, dk, dtype=enc.dtype, device=device)  # self-attention K/V by position
    tokens = torch.full((B,), layout.bos_token_id, dtype=torch.long, device=device)  # (B*m,) decoder input
    nodes = torch.zeros(B, dtype=torch.long, device=device)  # (B*m,) tree node of each beam, -1 = dead beam
    scores = torch.zeros(B, 1, dtype=torch.float32, device=device)  # (B, m)
    codes = torch.empty(B, 0, dtype=torch.long, device=device)  # (B*m, l)
    m = 1
    for level in range(L):  # the only loop: over levels
        lo, hi = layout.level_range(level)
        K = hi - lo
        hidden = _decoder_step(dec, tokens, cache, level, pos_bias, cross, enc_bias, m)  # (B*m, D)
        logits = (hidden * scale) @ head.weight[lo:hi].T  # (B*m, K)
        if head.bias is not None:
            logits = logits + head.bias[lo:hi]
        allowed = tree.allowed_mask(nodes, token_range=(lo, hi))  # (B*m, K)
        logp = logits.float().masked_fill(~allowed, neg_inf).log_softmax(-1).masked_fill(~allowed, neg_inf)
        cand = (scores[:, :, None] + logp.view(B, m, K)).view(B, m * K)  # (B, m*K)
        if m * K < M:  # fewer candidates than beams (first levels of a small codebook): pad with dead ones
            cand = torch.nn.functional.pad(cand, (0, M - m * K), value=neg_inf)
        scores, idx = cand.topk(M, dim=1)  # (B, M), best first
        parent = (idx // K).clamp_max(m - 1)  # (B, M) in [0, m)
        code = (idx % K).view(-1)  # (B*M,)
        rows = (torch.arange(B, device=device)[:, None] * m + parent).view(-1)  # (B*M,) parent row
        tokens = code + lo
        nodes = torch.where(scores.view(-1) > neg_inf, tree.next_nodes(nodes[rows], tokens), -1)
        codes = torch.cat([codes[rows], code[:, None]], dim=1)  # (B*M, level + 1)
        if level + 1 < L:  # reorder the per-beam self-attention cache (its filled positions) only
            reordered = cache.new_empty(L, n_layers, 2, B * M, H, dk)
            torch.index_select(cache[: level + 1], 3, rows, out=reordered[: level + 1])
            cache = reordered
        m = M

    # 4. the best k beams (topk is sorted); every one is a leaf of the tree
    top = nodes.view(B, M)[:, :k]
    items = torch.where(top >= 0, tree.node_value[top.clamp_min(0)], -1)
    if (items < 0).any():
        raise AssertionError("fast_topk kept a beam outside the prefix tree among the top k: is the tree fixed-length?")
    return items, scores[:, :k].contiguous(), codes.view(B, M, L)[:, :k].contiguous()


def _decoder_step(
    dec: torch.nn.Module,
    tokens: torch.Tensor,
    cache: torch.Tensor,
    t: int,
    pos_bias: torch.Tensor,
    cross: list[tuple[torch.Tensor, torch.Tensor]],
    enc_bias: torch.Tensor,
    m: int,
) -> torch.Tensor:
    """One decoder position for every beam, T5's forward pass (eval mode: no dropout).

    Args:
        dec: the model's decoder ``T5Stack``.
        tokens: LongTensor (R,) decoder input at position t, R = B*m rows, history-major.
        cache: (L, n_layers, 2, R, H, dk) self-attention keys/values by position; position t is written here.
        pos_bias: (L, L, 1, H) decoder relative position bias [query, key] (shared by all layers, as in T5).
        cross: per layer (keys transposed (B, H, dk, S), values (B, H, S, dk)), shared by a history's m beams.
        enc_bias: (B, 1, 1, S) additive encoder padding mask.
    Returns:
        (R, D) the final-layer-normed decoder output at position t.
    """
    R = tokens.shape[0]
    B = R // m
    x = dec.embed_tokens(tokens)  # (R, D)
    bias_t = pos_bias[t, : t + 1]  # (t+1, 1, H)
    for i, block in enumerate(dec.block):
        # self-attention over positions 0..t of the beam's own cache; T5 does not scale q.k
        sa = block.layer[0]
        att = sa.SelfAttention
        H, dk = att.n_heads, att.key_value_proj_dim
        h = sa.layer_norm(x)
        q = att.q(h).view(R, H, dk)
        cache[t, i, 0] = att.k(h).view(R, H, dk)
        cache[t, i, 1] = att.v(h).view(R, H, dk)
        w = ((cache[: t + 1, i, 0] * q).sum(-1) + bias_t).softmax(0)  # (t+1, R, H)
        x = x + att.o((w[..., None] * cache[: t + 1, i, 1]).sum(0).view(R, H * dk))
        # cross-attention: the m beams of a history are m query positions against its keys/values
        ca = block.layer[1]
        att = ca.EncDecAttention
        h = ca.layer_norm(x)
        q = att.q(h).view(B, m, H, dk).transpose(1, 2)  # (B, H, m, dk)
        keys_t, values = cross[i]
        w = (q @ keys_t + enc_bias).softmax(-1)  # (B, H, m, S)
        x = x + att.o((w @ values).transpose(1, 2).reshape(R, H * dk))
        x = block.layer[-1](x)  # T5LayerFF: layer norm, feed-forward, residual
    return dec.final_layer_norm(x)


# ---- input checks (public boundary only) --------------------------------------------------------------------------
def _check_inputs(
    model: T5ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tree: PrefixTree,
    layout: TokenLayout,
    batch_size: int | None,
) -> None:
    if not isinstance(model, T5ForConditionalGeneration):
        raise TypeError(f"`model` must be a T5ForConditionalGeneration, got {type(model).__name__}")
    if model.training:
        raise ValueError("`model` must be in eval mode (call `model.eval()`): decoding with dropout is not exact")
    if not isinstance(tree, PrefixTree):
        raise TypeError(f"`tree` must be a PrefixTree, got {type(tree).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"`layout` must be a TokenLayout, got {type(layout).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"`input_ids` must be a LongTensor (B, S), got {_describe(input_ids)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` must be a tensor of shape {tuple(input_ids.shape)}, got {_describe(attention_mask)}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}")
    V = model.get_output_embeddings().weight.shape[0]
    if layout.vocab_size > V or tree.vocab_size > V:
        raise ValueError(f"`layout` ({layout.vocab_size} tokens) and `tree` ({tree.vocab_size}) must fit the model's vocabulary of {V}")
    if tree.max_depth != layout.num_levels + 1:
        raise ValueError(f"`tree` must hold {layout.num_levels} code tokens + eos per item (depth {layout.num_levels + 1}), got depth {tree.max_depth}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(type(x).__name__)
