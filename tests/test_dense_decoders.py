"""The dense head on a (tiny) T5 encoder: joint loss, checkpoint round trip, dense and hybrid decoders, cold items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from generator.beam import fast_topk
from generator.dense import (
    STATE_PREFIX,
    DenseHead,
    DenseHeadConfig,
    encode_queries,
    joint_loss,
    load_dense_head,
)
from generator.hybrid import DenseDecoder, HybridDecoder
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.tree import PrefixTree

N, D_MODEL, D_CONTENT = 12, 16, 10


@pytest.fixture
def world() -> tuple[T5ForConditionalGeneration, SemanticIDs, TokenLayout, DenseHead, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = SemanticIDs.from_codes(rng.integers(0, 4, (N, 2)), (4, 4), extra_level_size=8)
    layout = ids.layout(num_user_tokens=0)
    t5 = T5Config(
        vocab_size=layout.vocab_size, d_model=D_MODEL, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=layout.pad_token_id, eos_token_id=layout.eos_token_id,
        decoder_start_token_id=layout.bos_token_id,
    )
    model = T5ForConditionalGeneration(t5).eval()
    head = DenseHead(
        DenseHeadConfig(input_dim=D_MODEL, dim=8, mode="both", normalize=False),
        torch.from_numpy(ids.item_ids), torch.randn(N, D_CONTENT),
    ).eval()
    histories = torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes[[[0, 1], [2, 3], [4, 4]]]))).reshape(3, -1)
    mask = torch.ones_like(histories)
    mask[2, 3:] = 0  # one right-padded history
    return model, ids, layout, head, histories, mask


def test_dense_decoder_is_brute_force_mips(world) -> None:
    model, ids, layout, head, x, mask = world
    res = DenseDecoder(head, ids)(model, x, mask, k=5)
    with torch.no_grad():
        scores = encode_queries(model, head, x, mask) @ head.item_vectors().T  # (B, N)
    want = torch.from_numpy(ids.item_ids)[scores.topk(5, dim=1).indices]
    assert torch.equal(res.items, want)
    torch.testing.assert_close(res.scores, scores.topk(5, dim=1).values)
    assert np.array_equal(res.codes.numpy(), ids.codes_of(res.items.numpy()))


def test_dense_decoder_faiss_flat_matches_exact(world) -> None:
    pytest.importorskip("faiss")
    model, ids, _, head, x, mask = world
    exact = DenseDecoder(head, ids)(model, x, mask, k=4)
    flat = DenseDecoder(head, ids, kind="faiss-flat")(model, x, mask, k=4)
    assert torch.equal(flat.items, exact.items)
    torch.testing.assert_close(flat.scores, exact.scores, atol=1e-5, rtol=0)


def test_hybrid_decoder_ends_are_beam_and_dense_orders(world) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    beam = fast_topk(model, x, mask, tree, layout, k=6, num_beams=6)
    assert torch.equal(HybridDecoder(head, ids, alpha=1.0, num_candidates=6)(model, x, mask, tree, layout, k=6, num_beams=6).items, beam.items)
    res = HybridDecoder(head, ids, alpha=0.0, num_candidates=6)(model, x, mask, tree, layout, k=3, num_beams=6)
    with torch.no_grad():
        dense = encode_queries(model, head, x, mask) @ head.item_vectors().T
    cand_scores = dense.gather(1, head.rows_of(beam.items))
    want = beam.items.gather(1, cand_scores.argsort(dim=1, descending=True, stable=True)[:, :3])
    assert torch.equal(res.items, want)
    assert np.array_equal(res.codes.numpy(), ids.codes_of(res.items.numpy()))


def test_joint_loss_parts(world) -> None:
    model, ids, layout, head, x, mask = world
    model.train()
    head.train()
    labels = torch.cat([torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes[[5, 6, 7]]))), torch.ones(3, 1, dtype=torch.long)], 1)
    rows = torch.tensor([5, 6, 7])
    out = joint_loss(model, head, x, mask, labels, rows)
    want_gen = model(input_ids=x, attention_mask=mask, labels=labels).loss
    want_dense = F.cross_entropy(encode_queries(model, head, x, mask) @ head.item_vectors().T, rows)
    torch.testing.assert_close(out.generative, want_gen)
    torch.testing.assert_close(out.dense, want_dense)
    torch.testing.assert_close(out.total, want_gen + want_dense)
    dense_only = joint_loss(model, head, x, mask, labels, rows, objective="dense")
    assert dense_only.generative == 0
    dense_only.total.backward()
    assert model.decoder.block[0].layer[0].SelfAttention.q.weight.grad is None  # the decoder is not trained
    assert model.encoder.block[0].layer[0].SelfAttention.q.weight.grad is not None
    with pytest.raises(ValueError, match="`objective` must be one of"):
        joint_loss(model, head, x, mask, labels, rows, objective="both")


def test_load_dense_head_round_trip(world) -> None:
    _, _, _, head, _, _ = world
    ckpt = {"semid": {"dense": head.config.to_dict()}, "state_dict": {STATE_PREFIX + k: v for k, v in head.state_dict().items()}}
    loaded = load_dense_head(ckpt)
    assert loaded is not None and not loaded.training
    torch.testing.assert_close(loaded.item_vectors(), head.item_vectors())
    assert load_dense_head({"semid": {}, "state_dict": {}}) is None


def test_cold_items_are_recommended_by_every_decoder_after_adding(world) -> None:
    model, ids, layout, head, x, mask = world
    # two new items: base codes from "the quantizer", content made so the first is the dense favourite of history 0
    with torch.no_grad():
        q0 = encode_queries(model, head, x[:1], mask[:1])[0]
        W, b = head.content_proj.weight, head.content_proj.bias
        favourite = torch.linalg.lstsq(W, (100 * q0 - b).unsqueeze(1)).solution.squeeze(1)
    new_content = torch.stack([favourite, torch.randn(D_CONTENT)])
    ids2 = ids.add_items(np.array([[1, 2], [3, 3]]), np.array([N + 1, N + 2]))
    head.add_items(new_content)
    tree2 = PrefixTree.from_semantic_ids(ids2, layout)  # same layout: the vocabulary does not change

    dense = DenseDecoder(head, ids2)(model, x, mask, k=3)
    assert dense.items[0, 0] == N + 1
    beam = fast_topk(model, x, mask, tree2, layout, k=N + 2, num_beams=N + 2)
    assert set(beam.items[0].tolist()) == set(range(1, N + 3))  # the new items are reachable in the tree
    hybrid = HybridDecoder(head, ids2, alpha=0.0, num_candidates=N + 2)(model, x, mask, tree2, layout, k=1, num_beams=N + 2)
    assert hybrid.items[0, 0] == N + 1
    with pytest.raises(ValueError, match="not the semantic IDs' 12 items"):
        DenseDecoder(head, ids)


def test_exact_decoders_compute_item_vectors_once_until_the_head_changes(world, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    calls = []
    item_vectors = head.item_vectors
    monkeypatch.setattr(head, "item_vectors", lambda rows=None: calls.append(rows) or item_vectors(rows))
    dense = DenseDecoder(head, ids)
    hybrid = HybridDecoder(head, ids, alpha=0.5, num_candidates=6, beam=fast_topk)
    first = dense(model, x, mask, k=5)
    hyb = hybrid(model, x, mask, tree, layout, k=5, num_beams=6)
    for _ in range(3):  # more batches: no recomputation
        dense(model, x, mask, k=5)
        assert torch.equal(hybrid(model, x, mask, tree, layout, k=5, num_beams=6).items, hyb.items)
    assert len(calls) == 2
    with torch.no_grad():  # an optimiser step updates the weights in place: both decoders see it
        head.item_table.mul_(-1)
    after = dense(model, x, mask, k=5)
    hybrid(model, x, mask, tree, layout, k=5, num_beams=6)
    assert len(calls) == 4 and not torch.equal(after.scores, first.scores)
    with torch.no_grad():
        want = (encode_queries(model, head, x, mask) @ item_vectors().T).topk(5, dim=1).values
    torch.testing.assert_close(after.scores, want)
