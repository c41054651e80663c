"""The causal backbone's states without transformers' per-call bookkeeping, in training and at inference.

``GPT2Model.forward`` builds a causal mask, checks for packed sequences, wraps its output in a ``ModelOutput`` and
goes through deprecation wrappers on every call: for one short history (Beauty's median is 6 items) that costs more
than the arithmetic, and its packed-sequence check reads a tensor back to the host (on a GPU, a synchronisation in
every training step). :func:`gpt2_states` runs the same arithmetic on the same weights (positions, then per block
``x + attn(ln_1(x))`` and ``x + mlp(ln_2(x))`` with causal scaled-dot-product attention, then ``ln_f``), with GPT-2's
dropout in the same places when training, and nothing else; :func:`lean_forward_fits` says whether a GPT-2 config is
one it reproduces (the causal design's always is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Model


def lean_forward_fits(config: GPT2Config) -> bool:
    """Whether :func:`gpt2_states` computes what ``GPT2Model`` computes for this config."""
    return (config.activation_function == "gelu_new" and config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
            and not config.reorder_and_upcast_attn and not config.add_cross_attention)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new`` (the tanh approximation of GELU) as one fused operation, where transformers' takes five:
    equal up to float rounding, 2.3x faster on a served history's states (4 members x 20 positions x 512)."""
    return F.gelu(x, approximate="tanh")


def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """``F.dropout(x, p, train)``: each entry zeroed with probability p, the rest scaled by 1 / (1 - p). On a CPU and in
    float32 the mask comes from uniform draws compared with p, one float mask the backward multiplies by: 2.4x faster
    forward and backward than F.dropout's Bernoulli draws there (4.7 against 11.2 ms for 6,400 x 128 entries, one
    thread); elsewhere F.dropout (one fused kernel on a GPU). The same distribution, other draws."""
    if not train or p == 0.0:
        return x
    if x.device.type != "cpu" or x.dtype != torch.float32 or p >= 1.0:
        return F.dropout(x, p, True)
    return x * torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


def _conv1d(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``Conv1D`` (x @ W + b with W stored (in, out)), with its arithmetic."""
    return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight).view(*x.shape[:-1], -1)


def gpt2_states(gpt: GPT2Model, x: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
    """``gpt(inputs_embeds=x).last_hidden_state`` (no cache, no padding mask: a causal model's right padding never
    reaches a real position). x: (B, T, D) -> (B, T, D). In training mode (``gpt.training``) GPT-2's dropout applies
    where ``GPT2Model`` applies it: on the input after the positions (``embd_pdrop``), on the attention weights
    (``attn_pdrop``) and on each block's two branches (``resid_pdrop``), in the library's order (with F.dropout in
    :func:`dropout`, the library's draws: ``tests/test_gpt2_states.py``); the MLP's activation is :func:`gelu_new`.

    ``at`` (B,) positions in [0, T) on x's device, outside training: only each history's state at its position,
    (B, D); the last block runs its attention's query, its projection and its MLP for that position alone
    (:func:`_last_block`). Not checked here (a check would read the device): the callers refuse empty histories."""
    B, T, D = x.shape
    train, cfg = gpt.training, gpt.config
    if at is not None and train:
        raise ValueError("`at` (states at given positions only) is for inference: the model is in training mode")
    h = dropout(x + gpt.wpe.weight[:T], cfg.embd_pdrop, train)
    p_attn, p_resid = (cfg.attn_pdrop, cfg.resid_pdrop) if train else (0.0, 0.0)
    for i, block in enumerate(gpt.h):  # loop over layers (a few)
        heads = block.attn.num_heads
        q, k, v = _conv1d(block.attn.c_attn, block.ln_1(h)).split(D, dim=2)
        if at is not None and i == len(gpt.h) - 1:
            def linear(name: str, y: torch.Tensor, block=block) -> torch.Tensor:  # noqa: ANN001
                layer = {"c_proj": block.attn.c_proj, "c_fc": block.mlp.c_fc, "mlp_proj": block.mlp.c_proj}[name]
                return _conv1d(layer, y)
            out = _last_block(h[None], q[None], k[None], v[None], at, heads, block.attn.scaling, linear,
                              lambda y, block=block: block.ln_2(y), gelu_new)
            return gpt.ln_f(out[0])
        q, k, v = (t.view(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p_attn, is_causal=True, scale=block.attn.scaling)
        h = h + dropout(_conv1d(block.attn.c_proj, a.transpose(1, 2).reshape(B, T, D)), p_resid, train)
        h = h + dropout(_conv1d(block.mlp.c_proj, gelu_new(_conv1d(block.mlp.c_fc, block.ln_2(h)))), p_resid, train)
    return gpt.ln_f(h)


def _last_block(h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor, heads: int,
                scale: float, linear, norm2, act) -> torch.Tensor:  # noqa: ANN001
    """The last block of K stacks (K = 1 for one model) for one position per history: h, q, k, v (K, B, T, D), at (B,)
    -> (K, B, D) the block's output there. Its attention reads every key up to the position (the causal mask's row)
    with the position's query only; the projection and the MLP then run on B rows instead of B x T. ``linear(name,
    y)`` applies the block's c_proj / c_fc / mlp_proj to y (K, B, ...); ``norm2`` its ln_2; ``act`` its activation."""
    K, B, T, D = h.shape
    rows = torch.arange(B, device=h.device)
    q = q[:, rows, at].reshape(K * B, 1, heads, D // heads).transpose(1, 2)  # (K * B, heads, 1, d)
    k, v = (t.reshape(K * B, T, heads, D // heads).transpose(1, 2) for t in (k, v))
    seen = (torch.arange(T, device=h.device) <= at[:, None]).repeat(K, 1)[:, None, None]  # (K * B, 1, 1, T)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale).reshape(K, B, D)
    out = h[:, rows, at] + linear("c_proj", a)
    return out + linear("mlp_proj", act(linear("c_fc", norm2(out))))


def stack_gpt2(gpts: list[GPT2Model]) -> dict[str, torch.Tensor]:
    """The weights of K GPT-2 models of one config stacked on a leading member dimension, for :func:`stacked_states`
    (a copy: made again when a weight changes, see ``EnsembleGenerator``)."""
    def st(get) -> torch.Tensor:  # noqa: ANN001
        return torch.stack([get(g).detach() for g in gpts])

    w = {"wpe": st(lambda g: g.wpe.weight), "ln_f.w": st(lambda g: g.ln_f.weight)[:, None], "ln_f.b": st(lambda g: g.ln_f.bias)[:, None]}
    for i in range(len(gpts[0].h)):  # loop over layers (a few)
        for name, get in (("ln_1", lambda g, i=i: g.h[i].ln_1), ("ln_2", lambda g, i=i: g.h[i].ln_2)):
            w[f"{i}.{name}.w"], w[f"{i}.{name}.b"] = st(lambda g, get=get: get(g).weight)[:, None], st(lambda g, get=get: get(g).bias)[:, None]
        for name, get in (("c_attn", lambda g, i=i: g.h[i].attn.c_attn), ("c_proj", lambda g, i=i: g.h[i].attn.c_proj),
                          ("c_fc", lambda g, i=i: g.h[i].mlp.c_fc), ("mlp_proj", lambda g, i=i: g.h[i].mlp.c_proj)):
            w[f"{i}.{name}.w"], w[f"{i}.{name}.b"] = st(lambda g, get=get: get(g).weight), st(lambda g, get=get: get(g).bias)[:, None]
    return w


def stacked_states(gpts: list[GPT2Model], w: dict[str, torch.Tensor], x: torch.Tensor,
                   at: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`gpt2_states` of K models at once from their stacked weights ``w`` (:func:`stack_gpt2`): x (K, B, T, D)
    member by member -> (K, B, T, D). One batched matrix product per layer and projection, whatever K: the members'
    per-call overhead is paid once (equal to the members' own states up to float rounding). ``at`` (B,): only the
    states at those positions, (K, B, D), as :func:`gpt2_states`'s."""
    K, B, T, D = x.shape
    first = gpts[0]
    heads, eps = first.h[0].attn.num_heads, first.ln_f.eps

    def norm(h: torch.Tensor, key: str) -> torch.Tensor:
        return torch.addcmul(w[f"{key}.b"], F.layer_norm(h, (D,), eps=eps), w[f"{key}.w"])

    h = (x + w["wpe"][:, None, :T]).reshape(K, B * T, D)
    for i, block in enumerate(first.h):  # loop over layers (a few)
        q, k, v = torch.baddbmm(w[f"{i}.c_attn.b"], norm(h, f"{i}.ln_1"), w[f"{i}.c_attn.w"]).split(D, dim=2)
        if at is not None and i == len(first.h) - 1:
            def linear(name: str, y: torch.Tensor, i=i) -> torch.Tensor:  # noqa: ANN001
                return torch.baddbmm(w[f"{i}.{name}.b"], y, w[f"{i}.{name}.w"])
            four = (t.reshape(K, B, T, -1) for t in (h, q, k, v))
            out = _last_block(*four, at, heads, block.attn.scaling, linear, lambda y, i=i: norm(y, f"{i}.ln_2"), gelu_new)
            return norm(out, "ln_f")
        q, k, v = (t.reshape(K * B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.attn.scaling)
        h = h + torch.baddbmm(w[f"{i}.c_proj.b"], a.transpose(1, 2).reshape(K, B * T, D), w[f"{i}.c_proj.w"])
        m = gelu_new(torch.baddbmm(w[f"{i}.c_fc.b"], norm(h, f"{i}.ln_2"), w[f"{i}.c_fc.w"]))
        h = h + torch.baddbmm(w[f"{i}.mlp_proj.b"], m, w[f"{i}.mlp_proj.w"])
    return norm(h, "ln_f").view(K, B, T, D)
