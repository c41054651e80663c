"""Every registered decoder (generator.decoding.registry.SPECS, each backbone it serves) through the same contract
checks: shapes, scores sorted descending, 0 invalid items (all in the catalogue, distinct per history), what the
scores are and whether items are leaves as the registry says, inputs left unchanged, k larger than the catalogue
refused. A decoder added to the registry is checked here without a new test (a backbone without a world fails)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from generator.decoding import registry
from generator.decoding.protocol import BLEND, FUSED, SCORES, Histories, Ranking
from generator.decoding.registry import CAUSAL, SPECS, TITLE, Ingredients
from generator.models.dense import DenseHead, DenseHeadConfig
from generator.models.ensemble import EnsembleGenerator
from generator.models.titles import TitleConfig, TitleGenerator
from generator.t5.decoders import T5
from semid.embed import embed_texts, load_encoder
from semid.ids import SemanticIDs
from semid.titles import TitleIndex, TitleTokenizer
from semid.tree import PrefixTree
from tests.conftest import TINY_ITEMS
from tests.test_causal import make
from tests.test_embed import model_dir  # noqa: F401 (a tiny local BERT folder: tokenizer and grounding encoder)
from tests.test_generator_helpers import random_ids

K = 5
CASES = [(backbone, name) for name, spec in SPECS.items() for backbone in spec.backbones]


def _item_histories(ids: SemanticIDs) -> Histories:
    """Three histories of item rows + 1, right-padded with 0 (causal and title backbones)."""
    rows = torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [ids.num_items, 7, 0, 0]])
    return Histories(rows, rows > 0)


def _t5_world() -> tuple[Ingredients, Histories]:
    torch.manual_seed(0)
    ids = SemanticIDs.from_codes(np.random.default_rng(0).integers(0, 4, (12, 2)), (4, 4), extra_level_size=8)
    layout = ids.layout(num_user_tokens=0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=layout.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=layout.pad_token_id, eos_token_id=layout.eos_token_id,
        decoder_start_token_id=layout.bos_token_id)).eval()
    head = DenseHead(DenseHeadConfig(input_dim=16, dim=8, mode="both", normalize=False), torch.from_numpy(ids.item_ids),
                     torch.randn(ids.num_items, 10)).eval()
    tokens = torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes[[[0, 1], [2, 3], [4, 4]]]))).reshape(3, -1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[2, 3:] = False  # one right-padded history
    tokens[2, 3:] = layout.pad_token_id
    ing = Ingredients(T5, model, PrefixTree.from_semantic_ids(ids, layout), layout, ids, num_beams=8, num_candidates=6,
                      dense_head=head, fusion=("blend", {"alpha": 0.5}), cold_items=ids.item_ids[-3:])
    return ing, Histories(tokens, mask)


def _causal_world(ensemble: bool = False) -> tuple[Ingredients, Histories]:
    model, ids, tree = make(num_items=30)
    if ensemble:
        torch.manual_seed(1)
        model = EnsembleGenerator.of([model, copy.deepcopy(model)]).eval()
        with torch.no_grad():  # a second member with other weights
            for p in model.members[1].parameters():
                p.add_(torch.randn_like(p) * 0.3)
    ing = Ingredients(CAUSAL, model, tree, model.layout, ids, num_beams=8, num_candidates=10,
                      fusion=("blend", {"alpha": 0.5}), cold_items=ids.item_ids[-3:])
    return ing, _item_histories(ids)


def _title_world(folder: Path) -> tuple[Ingredients, Histories]:
    titles = [t.lower() for t, _ in TINY_ITEMS] + ["red cream", "blue spray", "red cream"]  # a duplicate title
    tok = TitleTokenizer.from_pretrained(folder)
    ids = random_ids(len(titles), 0)
    index = TitleIndex.build(tok, titles, ids.item_ids)
    layout = ids.layout(0)
    cfg = TitleConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, title_dim=16, vocab_size=index.vocab_size,
                      pad_id=tok.pad_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    model = TitleGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)),
                           torch.from_numpy(index.padded_targets())).eval()
    encoder = load_encoder(folder, "cpu")
    emb = torch.from_numpy(embed_texts(titles, encoder, progress=False))
    ing = Ingredients(TITLE, model, index.tree, layout, ids, num_beams=6,
                      title={"length_penalty": 0.5, "tokenizer": tok, "encoder": encoder, "item_emb": emb})
    return ing, _item_histories(ids)


@pytest.fixture(scope="module")
def worlds(model_dir: Path) -> dict[str, tuple[Ingredients, Histories]]:  # noqa: F811
    return {T5: _t5_world(), CAUSAL: _causal_world(), TITLE: _title_world(model_dir)}


@pytest.mark.parametrize(("backbone", "name"), CASES, ids=[f"{b}-{n}" for b, n in CASES])
def test_every_registered_decoder_keeps_the_contract(worlds: dict[str, tuple[Ingredients, Histories]], backbone: str,
                                                     name: str) -> None:
    assert backbone in worlds, f"no world to check {backbone!r} decoders in: add one to this test"
    check_contract(*worlds[backbone], name)


@pytest.mark.parametrize("name", [n for b, n in CASES if b == CAUSAL])
def test_every_causal_decoder_keeps_the_contract_on_an_ensemble(name: str) -> None:
    """The same checks on a causal ensemble (``CausalConfig.members``): its members on a leading dimension of the
    queries and tables reach every causal decoder."""
    check_contract(*_causal_world(ensemble=True), name)


def check_contract(ing: Ingredients, hist: Histories, name: str) -> None:
    dec = registry.build(ing, name)
    spec = SPECS[name]
    before = (hist.tokens.clone(), hist.mask.clone())
    res = dec(hist, K)
    assert isinstance(res, Ranking)
    B, N, L = hist.tokens.shape[0], ing.ids.num_items, ing.ids.codes.shape[1]
    # shapes and dtypes
    assert res.items.shape == (B, K) and res.items.dtype == torch.long
    assert res.scores.shape == (B, K) and res.scores.is_floating_point()
    assert res.codes.shape == (B, K, L)
    # scores best first
    assert (res.scores[:, 1:] <= res.scores[:, :-1] + 1e-5).all(), res.scores
    assert torch.isfinite(res.scores).all()
    # 0 invalid items: every item in the catalogue, distinct per history, its codes its own
    items = res.items.numpy()
    assert np.isin(items, ing.ids.item_ids).all(), items
    assert all(len(set(row)) == K for row in items.tolist()), items
    np.testing.assert_array_equal(res.codes.numpy(), ing.ids.codes[ing.ids.rows_of(items.reshape(-1))].reshape(B, K, L))
    # what the scores are and whether items are leaves, as the registry says
    assert res.score in SCORES and res.score in ((BLEND, FUSED) if name == "hybrid" else (spec.score,))
    assert res.leaves is spec.leaves and dec.leaves is spec.leaves
    # the histories were read, not changed
    assert torch.equal(hist.tokens, before[0]) and torch.equal(hist.mask, before[1])
    # k larger than the catalogue is refused, naming k
    with pytest.raises(ValueError, match="`k`"):
        dec(hist, N + 1)


def test_every_backbone_with_a_decoder_has_a_case() -> None:  # the parametrisation above is not vacuous
    assert {b for b, _ in CASES} == set(registry.BACKBONES) and len(CASES) == sum(len(s.backbones) for s in SPECS.values())
