"""The item-level T5 (`--preset item-t5`): one encoder position per history item, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.t5.beam import beam_search
from generator.t5.generate import generate_beam_search
from generator.t5.model import ItemLevelEncoder, build_model, preset
from semid.ids import SemanticIDs
from semid.tree import PrefixTree
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset


def _model() -> tuple[torch.nn.Module, SemanticIDs, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = SemanticIDs.from_codes(rng.integers(0, 4, size=(30, 3)), (4, 4, 4), extra_level_size=8)
    torch.manual_seed(0)
    model = build_model(preset("item-t5"), ids.layout(0)).eval()
    tokens = torch.as_tensor(np.asarray(ids.layout(0).codes_to_tokens(ids.codes[:6]))).reshape(2, 12)  # 3 items each
    return model, ids, tokens


def test_the_encoder_runs_once_per_item_on_the_sum_of_its_code_embeddings() -> None:
    model, _, tokens = _model()
    assert isinstance(model.encoder, ItemLevelEncoder)
    mask = torch.ones_like(tokens)
    out = model.encoder(input_ids=tokens, attention_mask=mask).last_hidden_state  # (2, 12, D)
    items = model.shared(tokens).view(2, 3, 4, -1).sum(2)
    ref = model.encoder.stack(inputs_embeds=items, attention_mask=torch.ones(2, 3, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(out[:, ::4], ref)  # one state per item ...
    torch.testing.assert_close(out, ref.repeat_interleave(4, dim=1))  # ... repeated over its 4 tokens


def test_the_decoder_sees_exactly_the_item_level_states() -> None:
    model, _, tokens = _model()
    mask = torch.ones_like(tokens)
    dec_in = torch.full((2, 1), model.config.decoder_start_token_id)
    full = model(input_ids=tokens, attention_mask=mask, decoder_input_ids=dec_in).logits
    compact = model.encoder.stack(inputs_embeds=model.shared(tokens).view(2, 3, 4, -1).sum(2)).last_hidden_state
    from transformers.modeling_outputs import BaseModelOutput

    once = model(encoder_outputs=BaseModelOutput(last_hidden_state=compact), attention_mask=torch.ones(2, 3, dtype=torch.long),
                 decoder_input_ids=dec_in).logits
    torch.testing.assert_close(full, once, atol=1e-5, rtol=0)  # attention over 4 copies = attention over one


def test_beam_search_equals_generate_and_user_tokens_are_refused() -> None:
    model, ids, tokens = _model()
    layout = ids.layout(0)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    mask = torch.ones_like(tokens)
    a = generate_beam_search(model, tokens, mask, tree, layout, k=5, num_beams=5)
    b = beam_search(model, tokens, mask, tree, layout, k=5, num_beams=5)
    assert torch.equal(a.items, b.items) and torch.equal(a.codes, b.codes) and torch.allclose(a.scores, b.scores, atol=1e-4)
    with pytest.raises(ValueError, match="no user token"):
        build_model(preset("item-t5"), ids.layout(16))


def test_item_t5_trains_and_evaluates_from_the_cli(tmp_path: Path) -> None:
    data = write_random_dataset(tmp_path / "data")
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    run = tmp_path / "run"
    flags = ["--preset", "item-t5", "--max-epochs", "1", "--batch-size", "16", "--val-users", "all", "--num-beams", "10",
             "--warmup-steps", "2", "--no-progress", "--final-val-users", "0"]
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(run), *flags]) == 0
    assert main(["evaluate", "--run", str(run), "--split", "test", "--num-beams", "10", "--no-progress"]) == 0
    m = json.loads((run / "metrics_test.json").read_text())
    assert m["users_evaluated"] == 24 and m["invalid_items"] == 0 and m["duplicate_items"] == 0
