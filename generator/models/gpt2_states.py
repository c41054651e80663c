"""The causal backbone's states at inference without transformers' per-call bookkeeping.

``GPT2Model.forward`` builds a causal mask, checks for packed sequences, wraps its output in a ``ModelOutput`` and
goes through deprecation wrappers on every call: for one short history (Beauty's median is 6 items) that costs more
than the arithmetic. :func:`gpt2_states` runs the same arithmetic on the same weights (positions, then per block
``x + attn(ln_1(x))`` and ``x + mlp(ln_2(x))`` with causal scaled-dot-product attention, then ``ln_f``) and nothing
else; :func:`lean_forward_fits` says whether a GPT-2 config is one it reproduces (the causal design's always is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Model


def lean_forward_fits(config: GPT2Config) -> bool:
    """Whether :func:`gpt2_states` computes what ``GPT2Model`` computes for this config."""
    return (config.activation_function == "gelu_new" and config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
            and not config.reorder_and_upcast_attn and not config.add_cross_attention)


def _conv1d(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D`` (x @ W + b with W stored (in, out)), with its arithmetic."""
    return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight).view(*x.shape[:-1], -1)


def gpt2_states(gpt: GPT2Model, x: torch.Tensor) -> torch.Tensor:
    """``gpt(inputs_embeds=x).last_hidden_state`` in eval mode (no dropout, no cache, no padding mask: a causal
    model's right padding never reaches a real position). x: (B, T, D) -> (B, T, D)."""
    B, T, D = x.shape
    h = x + gpt.wpe.weight[:T]
    for block in gpt.h:  # loop over layers (a few)
        heads = block.attn.num_heads
        q, k, v = _conv1d(block.attn.c_attn, block.ln_1(h)).split(D, dim=2)
        q, k, v = (t.view(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.attn.scaling)
        h = h + _conv1d(block.attn.c_proj, a.transpose(1, 2).reshape(B, T, D))
        h = h + _conv1d(block.mlp.c_proj, block.mlp.act(_conv1d(block.mlp.c_fc, block.ln_2(h))))
    return gpt.ln_f(h)
