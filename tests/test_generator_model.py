"""The T5 generator: built from the layout, loss, learning-rate schedule, checkpoint round trip and refusal."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.decoding.registry import Ingredients, build, build_many, resolve
from generator.designs.registry import load_checkpoint
from generator.models.checkpoint import CHECKPOINT_KEY, checkpoint_meta, ids_digest
from generator.t5.beam import T5Beam
from generator.t5.decoders import T5
from generator.t5.generate import T5Generate
from generator.t5.model import GeneratorConfig, build_model, preset, seq2seq_loss
from generator.t5.system import GeneratorSystem
from generator.training.optim import OptimConfig, lr_factor
from semid.ids import SemanticIDs
from semid.tree import PrefixTree
from tests.test_generator_helpers import random_ids

TINY = GeneratorConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32)
IDS = random_ids()
LAYOUT = IDS.layout(num_user_tokens=8)


def test_presets_and_vocabulary_come_from_the_layout() -> None:
    assert preset("tiger") == GeneratorConfig()
    tiger = preset("tiger")
    assert (tiger.num_encoder_layers, tiger.num_decoder_layers, tiger.d_model, tiger.num_heads, tiger.d_kv, tiger.d_ff) == (4, 4, 128, 6, 64, 1024)
    model = build_model(TINY, LAYOUT)
    c = model.config
    assert c.vocab_size == LAYOUT.vocab_size
    assert (c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="`preset` must be one of"):
        preset("huge")
    with pytest.raises(ValueError, match="`d_model` must be a positive int, got 0"):
        GeneratorConfig(d_model=0)
    with pytest.raises(ValueError, match="`dropout` must be in"):
        GeneratorConfig(dropout=1.5)


def test_loss_is_finite_and_label_smoothing_raises_it() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, LAYOUT).eval()
    x = torch.randint(3, LAYOUT.user_offset, (4, 7))
    labels = torch.cat([torch.from_numpy(np.asarray(LAYOUT.codes_to_tokens(IDS.codes[:4]))), torch.ones(4, 1, dtype=torch.long)], 1)
    plain = seq2seq_loss(model, x, torch.ones_like(x), labels)
    smooth = seq2seq_loss(model, x, torch.ones_like(x), labels, label_smoothing=0.1)
    assert torch.isfinite(plain) and abs(plain.item() - math.log(LAYOUT.vocab_size)) < 1.0
    ref = model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
    assert torch.allclose(plain, ref, atol=1e-5)  # same as transformers' own loss without smoothing
    assert smooth.item() != plain.item()


def test_lr_schedule_warms_up_then_decays_as_inverse_sqrt() -> None:
    f = [lr_factor(s, 10) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[39] == pytest.approx(math.sqrt(10 / 40))
    assert all(a < b for a, b in zip(f[:9], f[1:10], strict=True)) and all(a > b for a, b in zip(f[10:-1], f[11:], strict=True))
    with pytest.raises(ValueError, match="`lr` must be a finite number > 0"):
        OptimConfig(lr=0)


def _save_like_lightning(system: GeneratorSystem, path: Path) -> None:
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


def test_checkpoint_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tree = PrefixTree.from_semantic_ids(IDS, LAYOUT)
    system = GeneratorSystem(TINY, LAYOUT, ids_digest(IDS), tree, num_beams=10, decoder="generate")
    path = tmp_path / "m.ckpt"
    _save_like_lightning(system, path)
    loaded = load_checkpoint(path, IDS)
    assert loaded.config == TINY and loaded.layout == LAYOUT and not loaded.model.training
    x = torch.randint(3, LAYOUT.user_offset, (3, 9))
    dec = torch.full((3, 1), LAYOUT.bos_token_id)
    system.model.eval()
    with torch.no_grad():
        a = system.model(input_ids=x, decoder_input_ids=dec).logits
        b = loaded.model(input_ids=x, decoder_input_ids=dec).logits
    assert torch.equal(a, b)
    assert torch.load(path, weights_only=False)[CHECKPOINT_KEY] == checkpoint_meta(TINY, LAYOUT, ids_digest(IDS))


def test_a_checkpoint_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    tree = PrefixTree.from_semantic_ids(IDS, LAYOUT)
    path = tmp_path / "m.ckpt"
    _save_like_lightning(GeneratorSystem(TINY, LAYOUT, ids_digest(IDS), tree, num_beams=10, decoder="generate"), path)
    bigger = SemanticIDs.from_codes(IDS.codes[:, :3], (8, 4, 4), extra_level_size=8)
    with pytest.raises(ValueError, match=r"codebook sizes \[4, 4, 4, 8\].*semantic IDs have \[8, 4, 4, 8\]"):
        load_checkpoint(path, bigger)
    shuffled = SemanticIDs(IDS.codes[::-1].copy(), IDS.item_ids, IDS.codebook_sizes)
    with pytest.raises(ValueError, match="trained with other semantic IDs"):
        load_checkpoint(path, shuffled)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a semid generator checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_the_registry_builds_t5_decoders_and_refuses_others_with_a_clear_message() -> None:
    tree = PrefixTree.from_semantic_ids(IDS, LAYOUT)
    ing = Ingredients(T5, build_model(TINY, LAYOUT).eval(), tree, LAYOUT, IDS, num_beams=10)
    assert resolve(T5, "auto") == "beam" and resolve(T5, "generate") == "generate"
    assert isinstance(build(ing, "auto"), T5Beam) and isinstance(build(ing, "generate"), T5Generate)
    assert set(build_many(ing, ["beam", "generate"])) == {"beam", "generate"}
    with pytest.raises(ValueError, match=r"`decoder` must be one of \['auto', 'beam', .*got 'greedy'"):
        resolve(T5, "greedy")
    with pytest.raises(ValueError, match=r"decoder 'exact' is for causal runs; this t5 run has \['auto', 'beam', 'dense', 'hybrid', 'cold-beam', 'generate'"):
        build(ing, "exact")
    with pytest.raises(ValueError, match="decoder 'title-beam' is for title runs; this t5 run has"):
        resolve(T5, "title-beam")
    with pytest.raises(ValueError, match="`backbone` must be one of"):
        resolve("lstm", "beam")
    with pytest.raises(ValueError, match="decoder 'dense' needs a dense head, and this run has none"):
        build(ing, "dense")
    with pytest.raises(ValueError, match="`decoder` must be one of"):  # training refuses it before the first epoch
        GeneratorSystem(TINY, LAYOUT, ids_digest(IDS), tree, num_beams=10, decoder="greedy")
    with pytest.raises(ValueError, match="decoder 'exact' is for causal runs"):
        GeneratorSystem(TINY, LAYOUT, ids_digest(IDS), tree, num_beams=10, decoder="exact")
