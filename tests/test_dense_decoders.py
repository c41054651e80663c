"""The dense head on a (tiny) T5 encoder: joint loss, checkpoint round trip, dense and hybrid decoders, cold items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from generator.decoding.fusion import fuse, pool
from generator.decoding.protocol import BLEND, FUSED, INNER_PRODUCT, Histories
from generator.models.checkpoint import ids_digest
from generator.models.dense import STATE_PREFIX, DenseHead, DenseHeadConfig, encode_queries, load_dense_head
from generator.models.dense_loss import joint_loss
from generator.t5.beam import beam_search
from generator.t5.dense import T5Dense
from generator.t5.hybrid import T5Hybrid
from generator.t5.model import GeneratorConfig
from generator.t5.step import score_codes
from generator.t5.system import GeneratorSystem
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
    res = T5Dense(model, head, ids)(Histories(x, mask.bool()), 5)
    with torch.no_grad():
        scores = encode_queries(model, head, x, mask) @ head.item_vectors().T  # (B, N)
    want = torch.from_numpy(ids.item_ids)[scores.topk(5, dim=1).indices]
    assert torch.equal(res.items, want)
    torch.testing.assert_close(res.scores, scores.topk(5, dim=1).values)
    assert np.array_equal(res.codes.numpy(), ids.codes_of(res.items.numpy()))
    assert (res.score, res.leaves) == (INNER_PRODUCT, False)


def test_dense_decoder_faiss_flat_matches_exact(world) -> None:
    pytest.importorskip("faiss")
    model, ids, _, head, x, mask = world
    h = Histories(x, mask.bool())
    exact = T5Dense(model, head, ids)(h, 4)
    flat = T5Dense(model, head, ids, kind="faiss-flat")(h, 4)
    assert torch.equal(flat.items, exact.items)
    torch.testing.assert_close(flat.scores, exact.scores, atol=1e-5, rtol=0)


def test_hybrid_decoder_ends_are_beam_and_dense_orders(world) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    h = Histories(x, mask.bool())
    # every item a candidate: alpha 1 is the exhaustive beam's order
    beam = beam_search(model, x, mask, tree, layout, k=N, num_beams=N)
    res = T5Hybrid(model, tree, layout, head, ids, fusion=("blend", {"alpha": 1.0}), num_candidates=N, num_beams=N)(h, 6)
    assert torch.equal(res.items, beam.items[:, :6])
    assert (res.score, res.leaves) == (BLEND, False)
    # alpha 0 is the dense top-k exactly: the pool holds the dense top C, whatever the beam found
    for C in (3, 6):
        res = T5Hybrid(model, tree, layout, head, ids, fusion=("blend", {"alpha": 0.0}), num_candidates=C, num_beams=2)(h, 3)
        want = T5Dense(model, head, ids)(h, 3)
        assert torch.equal(res.items, want.items)
        assert np.array_equal(res.codes.numpy(), ids.codes_of(res.items.numpy()))


def test_hybrid_pool_is_union_of_beam_and_dense_with_teacher_forced_scores(world) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    h = Histories(x, mask.bool())
    C = 4
    parts = T5Hybrid(model, tree, layout, head, ids, fusion=("blend", {"alpha": 0.5}), num_candidates=C, num_beams=C).parts(h)
    p = pool(parts)
    beam = beam_search(model, x, mask, tree, layout, k=C, num_beams=C)
    dense = T5Dense(model, head, ids)(h, C)
    exhaustive = beam_search(model, x, mask, tree, layout, k=N, num_beams=N)  # every item's generative score
    with torch.no_grad():
        dense_all = torch.log_softmax(encode_queries(model, head, x, mask) @ head.item_vectors().T, dim=1)
    assert p.rows.shape == (3, 2 * C) and parts.exact.shape == parts.dense.shape == (3, N)
    for b in range(3):  # the test may loop; the decoder does not
        rows = p.rows[b][p.valid[b]]
        got = torch.from_numpy(ids.item_ids)[rows].tolist()
        want = beam.items[b].tolist() + [i for i in dense.items[b].tolist() if i not in beam.items[b].tolist()]
        assert got == want  # beam's items in its order, then the dense head's new ones; no duplicates
        outside = torch.ones(N, dtype=torch.bool)
        outside[rows] = False
        assert torch.isneginf(parts.exact[b][outside]).all()  # the generative score is known for the pool only
        gen_of = dict(zip(exhaustive.items[b].tolist(), exhaustive.scores[b].tolist(), strict=True))
        torch.testing.assert_close(parts.exact[b, rows], torch.tensor([gen_of[i] for i in got]), atol=1e-5, rtol=0)
        torch.testing.assert_close(parts.dense[b], dense_all[b])


def test_teacher_forced_scores_equal_the_beam_scores(world) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    for M in (1, 5, N):
        beam = beam_search(model, x, mask, tree, layout, k=M, num_beams=M)
        tf = score_codes(model, x, mask, tree, layout, beam.codes)
        torch.testing.assert_close(tf, beam.scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(score_codes(model, x, mask, tree, layout, beam.codes, batch_size=1), tf, atol=1e-6, rtol=0)
    # against the stock T5 call on B*M rows: log-softmax of each level's block restricted to the allowed tokens
    codes = beam.codes  # (B, N, L)
    B, M, L = codes.shape
    tokens = torch.as_tensor(layout.codes_to_tokens(codes)).reshape(B * M, L)
    dec_in = torch.cat([torch.full((B * M, 1), layout.bos_token_id), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=x.repeat_interleave(M, 0), attention_mask=mask.repeat_interleave(M, 0), decoder_input_ids=dec_in).logits
    nodes, want = torch.zeros(B * M, dtype=torch.long), torch.zeros(B * M)
    for level in range(L):
        lo, hi = layout.level_range(level)
        allowed = tree.allowed_mask(nodes, token_range=(lo, hi))
        logp = logits[:, level, lo:hi].masked_fill(~allowed, float("-inf")).log_softmax(-1)
        want += logp.gather(1, (tokens[:, level] - lo)[:, None]).squeeze(1)
        nodes = tree.next_nodes(nodes, tokens[:, level])
    torch.testing.assert_close(score_codes(model, x, mask, tree, layout, codes), want.view(B, M), atol=1e-5, rtol=0)
    # a code tuple outside the tree scores -inf
    bad = codes[:, :1].clone()
    bad[..., 0] = (bad[..., 0] + 1) % 4
    bad[..., -1] = layout.codebook_sizes[-1] - 1
    out = score_codes(model, x, mask, tree, layout, bad)
    in_tree = tree.lookup(torch.as_tensor(layout.codes_to_tokens(bad)).reshape(B, L)) >= 0
    assert torch.isinf(out[~in_tree]).all() and not torch.isnan(out).any()


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
    h = Histories(x, mask.bool())
    # two new items: base codes from "the quantizer", content made so the first is the dense favourite of history 0
    with torch.no_grad():
        q0 = encode_queries(model, head, x[:1], mask[:1])[0]
        W, b = head.content_proj.weight, head.content_proj.bias
        favourite = torch.linalg.lstsq(W, (100 * q0 - b).unsqueeze(1)).solution.squeeze(1)
    new_content = torch.stack([favourite, torch.randn(D_CONTENT)])
    cold_codes = np.array([[1, 2], [3, 3]])
    ids2 = ids.add_items(cold_codes, np.array([N + 1, N + 2]))
    head.add_items(new_content)
    tree2 = PrefixTree.from_semantic_ids(ids2, layout)  # same layout: the vocabulary does not change
    with torch.no_grad():
        scores = encode_queries(model, head, x, mask) @ head.item_vectors().T  # (B, N + 2), brute force q . v
    k = 3  # far fewer than the N + 2 items: the cold item must be *ranked*, not merely present
    top = scores.topk(k, dim=1)

    dense = T5Dense(model, head, ids2)(h, k)
    assert dense.items[0, 0] == N + 1  # the cold favourite at rank 1
    assert torch.equal(dense.items, torch.from_numpy(ids2.item_ids)[top.indices])  # every row's top-k, in order
    torch.testing.assert_close(dense.scores, top.values)
    assert np.array_equal(dense.codes.numpy(), ids2.codes_of(dense.items.numpy()))  # the cold item's codes too
    assert dense.codes[0, 0].tolist() == ids2.codes_of(np.array([N + 1]))[0].tolist()

    # the new items are leaves of the new tree (teacher forcing scores them), not of the old one
    L = layout.num_levels
    tuples = torch.from_numpy(ids2.codes_of(np.array([N + 1, N + 2]))).expand(3, 2, L)
    assert torch.isfinite(score_codes(model, x, mask, tree2, layout, tuples)).all()
    assert torch.isinf(score_codes(model, x, mask, PrefixTree.from_semantic_ids(ids, layout), layout, tuples)).all()
    beam = beam_search(model, x, mask, tree2, layout, k=N + 2, num_beams=N + 2)
    assert set(beam.items[0].tolist()) == set(range(1, N + 3))  # reachable by the beam

    # a small candidate pool (C = k = 3 of 14): alpha 0 is the dense top-k exactly, the cold favourite first
    hybrid = T5Hybrid(model, tree2, layout, head, ids2, fusion=("blend", {"alpha": 0.0}), num_candidates=k, num_beams=k)(h, k)
    assert hybrid.items[0, 0] == N + 1
    assert torch.equal(hybrid.items, dense.items)
    assert np.array_equal(hybrid.codes.numpy(), dense.codes.numpy())
    with pytest.raises(ValueError, match="not the semantic IDs' 12 items"):
        T5Dense(model, head, ids)


def test_dense_decoders_compute_item_vectors_once_and_refresh_on_demand(world, monkeypatch: pytest.MonkeyPatch) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    h = Histories(x, mask.bool())
    calls = []
    item_vectors = head.item_vectors
    monkeypatch.setattr(head, "item_vectors", lambda rows=None: calls.append(rows) or item_vectors(rows))
    dense = T5Dense(model, head, ids)
    hybrid = T5Hybrid(model, tree, layout, head, ids, fusion=("blend", {"alpha": 0.5}), num_candidates=6, num_beams=6, search=beam_search)
    assert calls == []  # computed on first call, not when built
    first = dense(h, 5)
    hyb = hybrid(h, 5)
    for _ in range(3):  # more batches: no recomputation
        assert torch.equal(dense(h, 5).scores, first.scores)
        assert torch.equal(hybrid(h, 5).items, hyb.items)
    assert len(calls) == 2
    with torch.no_grad():  # an optimiser step updates the weights in place
        head.item_table.mul_(-1)
    assert torch.equal(dense(h, 5).scores, first.scores) and len(calls) == 2  # no change detection: until refresh()
    dense.refresh()
    after = dense(h, 5)
    assert len(calls) == 3 and not torch.equal(after.scores, first.scores)
    with torch.no_grad():
        want = (encode_queries(model, head, x, mask) @ item_vectors().T).topk(5, dim=1)
    assert torch.equal(after.items, torch.from_numpy(ids.item_ids)[want.indices])
    torch.testing.assert_close(after.scores, want.values)


def test_validation_builds_a_new_dense_decoder_every_pass(world) -> None:
    _, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    config = GeneratorConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=D_MODEL, num_heads=2, d_kv=8, d_ff=32, dropout=0.0)
    system = GeneratorSystem(config, layout, ids_digest(ids), tree, num_beams=N, decoder="dense", dense_head=head,
                             objective="joint", ids=ids).eval()
    h = Histories(x, mask.bool())

    def brute_force() -> torch.return_types.topk:
        with torch.no_grad():
            return (encode_queries(system.model, head, x, mask) @ head.item_vectors().T).topk(5, dim=1)

    system.on_validation_epoch_start()
    first_decoder = system._decoder
    assert isinstance(first_decoder, T5Dense)
    first, want = first_decoder(h, 5), brute_force()
    torch.testing.assert_close(first.scores, want.values)
    with torch.no_grad():  # training between two validation passes changes the head in place
        head.item_table.mul_(-1)
    system.on_validation_epoch_start()  # the next pass
    assert isinstance(system._decoder, T5Dense) and system._decoder is not first_decoder
    second, want = system._decoder(h, 5), brute_force()
    assert not torch.equal(second.scores, first.scores)
    assert torch.equal(second.items, torch.from_numpy(ids.item_ids)[want.indices])
    torch.testing.assert_close(second.scores, want.values)


def test_t5_hybrid_serves_the_pool_fusions_and_refuses_the_full_catalogue_blend(world) -> None:
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    h = Histories(x, mask.bool())
    learned = [0.5, 0.5, 0.1, -0.1, -0.2, -0.1, 0.0, 0.3]
    for fusion in (("rrf", {"k0": 5.0}), ("liger", {}), ("learned", {"weights": learned})):
        dec = T5Hybrid(model, tree, layout, head, ids, fusion=fusion, num_candidates=4, num_beams=4)
        res = dec(h, 3)
        rows, scores = fuse(*fusion, dec.parts(h), 3)  # the fusion every design shares, on the T5 pool
        assert torch.equal(res.items, torch.where(rows >= 0, torch.from_numpy(ids.item_ids)[rows.clamp_min(0)], -1))
        torch.testing.assert_close(res.scores, scores)
        assert (res.score, res.leaves) == (FUSED, False)
        assert np.array_equal(res.codes.numpy(), ids.codes_of(res.items.numpy()))
    with pytest.raises(ValueError, match="fusion 'full' needs every item's generative score"):
        T5Hybrid(model, tree, layout, head, ids, fusion=("full", {"alpha": 0.5}), num_candidates=4, num_beams=4)


def test_joint_loss_passes_log_q_to_the_sampled_head(world) -> None:  # (a mutation audit: dropping it went unseen)
    from dataclasses import replace

    from generator.models.dense_loss import joint_loss
    model, ids, layout, head, x, mask = world
    head.config = replace(head.config, loss="sampled", num_random_negatives=2)
    labels = torch.cat([torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes[[5, 6, 7]]))), torch.ones(3, 1, dtype=torch.long)], 1)
    rows = torch.tensor([5, 6, 7])
    log_q = torch.log_softmax(torch.randn(12, generator=torch.Generator().manual_seed(3)), 0)
    out = joint_loss(model, head, x, mask, labels, rows, objective="dense", log_q=log_q, generator=torch.Generator().manual_seed(0))
    enc = model.get_encoder()(input_ids=x, attention_mask=mask)
    want = head.loss(head(enc.last_hidden_state, mask), rows, log_q=log_q, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.dense, want)
