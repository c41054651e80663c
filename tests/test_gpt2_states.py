"""The causal backbone's lean inference forward (generator.models.gpt2_states) computes what transformers' GPT2Model
computes, and the model uses it exactly when it is not training."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from generator.models.gpt2_states import gpt2_states, lean_forward_fits
from tests.test_causal import CFG, make


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


def test_the_model_takes_the_lean_path_in_eval_and_the_library_path_in_training(monkeypatch: pytest.MonkeyPatch) -> None:
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
    model.train().hidden(hist)  # dropout lives in the library's forward: training never takes the lean one
    assert len(calls) == 1
