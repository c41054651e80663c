"""The semid library called directly from Python: what a caller passes by mistake is refused by name, and the few
edge cases a stock ``generate`` reaches give the right items (a helper's audit, December 2026)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semid import SemanticIDs, TokenLayout
from semid.coldstart import relabel_warm_first
from semid.metrics import RankingMetrics
from semid.processor import masked_log_softmax
from semid.tree import PrefixTree


@pytest.fixture
def ids() -> SemanticIDs:
    return SemanticIDs.from_codes(np.array([[0, 1], [1, 0], [1, 1]]), [2, 2], extra_level_size=1)


def test_save_refuses_the_files_own_keys(ids: SemanticIDs, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"must not name \['codebook_sizes'\]"):
        ids.save(tmp_path / "a.npz", codebook_sizes=[8, 8, 8])  # (it was saved, and loaded as other IDs)
    with pytest.raises(ValueError, match="allow_pickle"):
        ids.save(tmp_path / "b.npz", arrays={"allow_pickle": np.arange(3)})  # (dropped without a word)
    ids.save(tmp_path / "c.npz", source="rqvae")  # other metadata is kept
    assert SemanticIDs.read(tmp_path / "c.npz").meta["source"] == "rqvae"


def test_lookups_refuse_floats_and_negative_ids(ids: SemanticIDs) -> None:
    with pytest.raises(TypeError, match="`item_ids` must hold integers"):
        ids.rows_of([1.9, 2.6])  # (was rows [0, 1]: items 1 and 2)
    with pytest.raises(TypeError, match="`codes` must hold integers"):
        ids.items_of(np.array([0.9, 1.9, 0.7]))
    with pytest.raises(ValueError, match="full tuples of 3 codes"):
        ids.items_of(ids.codes[:, :2])  # base codes without the extra level
    with pytest.raises(TypeError, match="`codebook_sizes` must be ints"):
        SemanticIDs.from_codes(np.array([[1, 0]]), [2.9, True], extra_level_size=1)
    with pytest.raises(ValueError, match="`item_ids` must be non-negative, got -1"):
        SemanticIDs.from_codes(np.array([[0], [1]]), [2], extra_level_size=1, item_ids=np.array([-1, 0]))
    assert ids.rows_of(np.array([3, 1], dtype=np.uint8)).tolist() == [2, 0]


def test_layout_conversions_take_ints_only_and_return_int64() -> None:
    lay = TokenLayout((4, 4, 2), 100)
    with pytest.raises(TypeError, match="`codes` must hold integers"):
        lay.codes_to_tokens(np.array([[1.5, 2.2, 1.9]]))  # (was float tokens [4.5, 9.2, 12.9])
    tokens = lay.codes_to_tokens(np.array([[1, 2, 1]], dtype=np.uint64))
    assert tokens.dtype == np.int64 and tokens.tolist() == [[4, 9, 12]]
    assert lay.tokens_to_codes(torch.tensor([[4, 9, 12]], dtype=torch.int32)).dtype == torch.int64
    with pytest.raises(TypeError, match="`user_ids` must hold integers"):
        lay.user_tokens(np.array([7.1, 7.9]))  # (both were user 7)
    with pytest.raises(TypeError, match="`tokens` must hold integers"):
        lay.tokens_to_codes(torch.tensor([[4.0, 9.0, 12.0]]))
    with pytest.raises(ValueError, match="`level` must be in"):
        lay.level_range(1.5)


def test_lookup_reads_a_generated_beam_padded_with_eos() -> None:
    """transformers pads a finished beam with eos where the pad id is 0 (falsy): still the beam's item."""
    tree = PrefixTree.from_sequences([(5,), (5, 6), (7, 8, 9)], [100, 101, 102], 12, end_token=1, pad_token=0)
    seqs = torch.tensor([[5, 6, 1, 1], [5, 1, 1, 1], [7, 8, 9, 1], [5, 1, 0, 0], [5, 6, 6, 1], [7, 8, 1, 1]])
    assert tree.lookup(seqs).tolist() == [101, 100, 102, 100, -1, -1]
    assert tree.lookup(seqs.numpy()).tolist() == [101, 100, 102, 100, -1, -1]  # numpy tokens too
    assert tree.walk(seqs[:1]).tolist() == [-1]  # walk reads every token (eos after eos leads nowhere)
    with pytest.raises(TypeError, match="`prefixes` must hold integers"):
        tree.lookup(seqs.float())


def test_generate_with_the_processor_maps_back_to_items() -> None:
    from transformers import LogitsProcessorList, T5Config, T5ForConditionalGeneration

    from semid.processor import PrefixTreeLogitsProcessor

    torch.manual_seed(1)
    tree = PrefixTree.from_sequences([(5,), (5, 6), (7, 8, 9)], [100, 101, 102], 12, end_token=1, pad_token=0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=12, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1,
                                                num_heads=2, d_kv=8, decoder_start_token_id=2, pad_token_id=0,
                                                eos_token_id=1)).eval()
    out = model.generate(input_ids=torch.randint(3, 12, (1, 5)), num_beams=3, num_return_sequences=3, max_new_tokens=6,
                         decoder_start_token_id=2, pad_token_id=0, eos_token_id=1,
                         logits_processor=LogitsProcessorList([PrefixTreeLogitsProcessor(tree, 1)]))
    assert sorted(tree.lookup(out[:, 1:]).tolist()) == [100, 101, 102]


def test_metrics_update_takes_lists_and_names_a_wrong_shape() -> None:
    m = RankingMetrics((1, 2))
    m.update([[3, 2], [1, 4]], [2, 5])
    assert m.compute() == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@2": 0.5, "ndcg@2": pytest.approx(0.5 / np.log2(3))}
    with pytest.raises(ValueError, match=r"`ranked` must be \(users, k\) item ids, got shape \(2,\)"):
        m.update(np.array([3, 2]), np.array([2]))


def test_masked_log_softmax_with_an_empty_normaliser_normalises_over_allowed() -> None:
    """A node whose children were all added after training: its row was +inf for every allowed child."""
    logits, allowed = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, False]])
    out = masked_log_softmax(logits, allowed, torch.tensor([[False, False, False]]))
    assert torch.allclose(out, masked_log_softmax(logits, allowed))
    assert torch.isfinite(out[0, :2]).all() and out[0, 2] == float("-inf")


def test_embed_texts_refuses_one_string() -> None:
    from semid.embed import embed_texts

    with pytest.raises(TypeError, match="`texts` must be a sequence of strings, got one str"):
        embed_texts("red lipstick", encoder=None, progress=False)  # (embedded one item per character)


def test_relabel_refuses_ids_outside_the_catalogue() -> None:
    with pytest.raises(ValueError, match=r"`cold_items` must be item ids in 1..5, got \[-1\]"):
        relabel_warm_first(5, np.array([-1]))  # (-1 marked item 5 cold)
    assert relabel_warm_first(5, np.array([2])).new_to_old.tolist() == [0, 1, 3, 4, 5, 2]
