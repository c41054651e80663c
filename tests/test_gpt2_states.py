"""The causal backbone's lean forward (generator.models.gpt2_states) computes what transformers' GPT2Model computes,
in eval mode and in training (with F.dropout, the same draws from the same seed; its own dropout is the same
distribution), and the model uses it in both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2Model
from transformers.activations import NewGELUActivation

import generator.models.gpt2_states as gpt2_states_module
from generator.models.gpt2_states import dropout, gpt2_states, lean_forward_fits
from tests.test_causal import CFG, make


def library_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean forward with the library's dropout (F.dropout: its Bernoulli draws) and activation (transformers'
    five-operation gelu_new): the same arithmetic as GPT2Model's, draw for draw and bit for bit."""
    monkeypatch.setattr(gpt2_states_module, "dropout", lambda x, p, train: F.dropout(x, p, train))
    monkeypatch.setattr(gpt2_states_module, "gelu_new", NewGELUActivation())


@pytest.mark.parametrize(("layers", "heads", "width", "length"), [(1, 1, 8, 1), (2, 2, 16, 5), (3, 4, 32, 12)])
def test_lean_states_equal_gpt2_model_states(layers: int, heads: int, width: int, length: int) -> None:
    torch.manual_seed(layers)
    config = GPT2Config(vocab_size=1, n_positions=16, n_embd=width, n_layer=layers, n_head=heads, n_inner=3 * width,
                        activation_function="gelu_new", use_cache=False)
    gpt = GPT2Model(config).eval()
    with torch.no_grad():  # weights away from their initial values (biases start at zero, layer norms at one)
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = torch.randn(3, length, width)
    with torch.inference_mode():
        torch.testing.assert_close(gpt2_states(gpt, x), gpt(inputs_embeds=x).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert lean_forward_fits(config)
    for other in ({"activation_function": "relu"}, {"scale_attn_by_inverse_layer_idx": True},
                  {"reorder_and_upcast_attn": True}, {"scale_attn_weights": False}):
        assert not lean_forward_fits(GPT2Config(**{**config.to_dict(), **other}))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_in_training_the_lean_states_and_gradients_are_gpt2_models_draw_for_draw(dropout: float,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Training mode: GPT-2's dropout in the same places and order (input, attention weights, both branches of each
    block): with the library's dropout and activation in the lean path, from one seed the states and the gradients
    are the library's bit for bit."""
    library_ops(monkeypatch)
    config = GPT2Config(vocab_size=1, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=48, activation_function="gelu_new",
                        use_cache=False, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=None,
                        eos_token_id=None)
    torch.manual_seed(0)
    gpt = GPT2Model(config).train()
    x = torch.randn(3, 7, 16)
    grads = []
    for forward in (lambda: gpt(inputs_embeds=x).last_hidden_state, lambda: gpt2_states(gpt, x)):
        torch.manual_seed(1)
        out = forward()
        gpt.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in gpt.parameters() if p.grad is not None]))
    (library, lib_grads), (lean, lean_grads) = grads
    assert torch.equal(lean, library)
    assert len(lean_grads) == len(lib_grads) == len(list(gpt.parameters())) - 1  # all but the unused token table
    for a, b in zip(lean_grads, lib_grads, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # and with dropout, training did drop something
        assert torch.allclose(lean, gpt2_states(gpt.eval(), x), atol=1e-6) == (dropout == 0.0)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_the_lean_dropout_zeroes_a_share_p_and_scales_the_rest_in_both_passes(p: float) -> None:
    torch.manual_seed(0)
    x = (torch.rand(400, 2500) + 0.5).requires_grad_()
    y = dropout(x, p, True)
    kept = y != 0
    assert abs(1 - kept.double().mean().item() - p) < 0.003  # 1M draws: the share dropped is p
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p), atol=0, rtol=1e-6)
    g = torch.randn_like(x)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(kept, g / (1 - p), 0.0), atol=0, rtol=1e-6)  # the same mask
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert dropout(x, p, False) is x and dropout(x, 0.0, True) is x  # nothing outside training or at p = 0
    assert not bool((dropout(x, 1.0, True) != 0).any())
    half = dropout(x.detach().bfloat16(), p, True)  # other dtypes: F.dropout (the dtype kept)
    assert half.dtype == torch.bfloat16 and 0 < (half == 0).double().mean().item() < 1


def test_the_model_takes_the_lean_path_in_eval_and_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = make(30, cfg=CFG)
    assert model.lean_forward
    hist = torch.tensor([[3, 7, 1, 9], [4, 2, 0, 0]])  # right padded
    calls = []
    import generator.models.causal as causal

    monkeypatch.setattr(causal, "gpt2_states", lambda gpt, x: calls.append(x.shape) or gpt2_states(gpt, x))
    with torch.inference_mode():
        lean = model.eval().hidden(hist)
        model.lean_forward = False
        library = model.hidden(hist)
    assert calls == [(2, 4, CFG.d_model)]
    torch.testing.assert_close(lean, library, atol=1e-5, rtol=1e-5)
    model.lean_forward = True
    library_ops(monkeypatch)
    torch.manual_seed(3)
    lean = model.train().hidden(hist)
    assert len(calls) == 2
    model.lean_forward = False
    torch.manual_seed(3)
    assert torch.equal(lean, model.hidden(hist))  # the library's training forward, draw for draw (its ops in the lean path)


def test_states_at_one_position_per_history_are_the_full_passes_states_there() -> None:
    """``at``: the last block runs for each history's position alone (its query, projection and MLP), one model or
    K stacked; the states there are the full pass's up to float rounding. Refused in training (dropout)."""
    from generator.models.gpt2_states import stack_gpt2, stacked_states

    config = GPT2Config(vocab_size=1, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=48,
                        activation_function="gelu_new", use_cache=False)
    gpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        gpt = GPT2Model(config).eval()
        with torch.no_grad():
            for p in gpt.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        gpts.append(gpt)
    x = torch.randn(2, 4, 9, 16)
    at = torch.tensor([0, 8, 3, 5])
    rows = torch.arange(4)
    with torch.inference_mode():
        full = torch.stack([gpt2_states(g, x[k]) for k, g in enumerate(gpts)])[:, rows, at]  # (2, 4, 16)
        library = gpts[0](inputs_embeds=x[0]).last_hidden_state[rows, at]
        one = gpt2_states(gpts[0], x[0], at=at)
        stacked = stacked_states(gpts, stack_gpt2(gpts), x, at=at)
    assert one.shape == (4, 16) and stacked.shape == (2, 4, 16)
    torch.testing.assert_close(one, full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, library, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="for inference"):
        gpt2_states(gpts[0].train(), x[0], at=at)


def test_last_hidden_runs_the_last_block_at_the_last_item_only_outside_training(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = make(30, cfg=CFG)
    hist = torch.tensor([[3, 7, 1, 9], [4, 2, 0, 0]])  # right padded
    lengths = torch.tensor([4, 2])
    seen = []
    import generator.models.causal as causal

    monkeypatch.setattr(causal, "gpt2_states", lambda gpt, x, at=None: seen.append(at) or gpt2_states(gpt, x, at))
    with torch.inference_mode():
        fast = model.eval().last_hidden(hist, lengths)
        assert seen[-1] is not None and seen[-1].tolist() == [3, 1]
        model.lean_forward = False
        torch.testing.assert_close(fast, model.last_hidden(hist, lengths), rtol=1e-5, atol=1e-5)  # the library's
    model.lean_forward = True
    model.train().last_hidden(hist, lengths)
    assert seen[-1] is None  # training: the whole pass, dropout and all
