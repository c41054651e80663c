"""Assertions a second mutation audit found missing: each fails on one planted bug that the rest of the suite let
through (ids in the comments: the audit's mutant ids; December 2026, 50 planted, 9 survived: these 8 and
tests/test_combine.py's test_combine_counts_no_trained_model_twice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from generator.decoding.causal import CausalDecoders
from generator.decoding.grounding import CodeGrounder
from generator.models.causal import CausalGenerator
from rqvae.kmeans import ResidualKMeans
from rqvae.model import RQVAE, RQVAEConfig
from semid.layout import TokenLayout
from semid.prefix_index import rank_within_groups
from tests.test_causal import CFG, make
from tests.test_titles import tiny_causal


def test_rank_within_groups_compares_whole_rows():  # M06
    rank, size = rank_within_groups(np.array([[1, 2], [1, 3], [1, 2], [0, 5]]))
    assert rank.tolist() == [0, 0, 1, 0] and size.tolist() == [2, 1, 2, 1]


def test_tokens_to_codes_refuses_the_token_just_past_a_levels_block():  # M09
    layout = TokenLayout((2, 3), num_user_tokens=4)
    (lo0, hi0), (lo1, hi1) = layout.level_range(0), layout.level_range(1)
    with pytest.raises(ValueError, match="not in level 0's block"):
        layout.tokens_to_codes(np.array([hi0, lo1]))  # hi0 is level 1's first token
    with pytest.raises(ValueError, match="not in level 1's block"):
        layout.tokens_to_codes(np.array([lo0, hi1]))  # hi1 is the first user token


def test_rqkmeans_decode_maps_back_to_input_space():  # M18
    x = (np.random.default_rng(0).standard_normal((200, 4)) + 100.0).astype(np.float32)
    km = ResidualKMeans(2, 8, seed=0).fit(x)
    assert np.abs(km.decode(km.codes_) - x).mean() < np.abs(x - x.mean(0)).mean()


def test_each_rqkmeans_level_is_seeded_with_seed_plus_level():  # M19
    x = np.random.default_rng(1).standard_normal((300, 6)).astype(np.float32)
    km = ResidualKMeans(2, 8, seed=5, standardize=False, max_iter=50).fit(x)
    residual = x - km.cluster_centers_[0][km.codes_[:, 0]]
    ref = KMeans(n_clusters=8, n_init=1, max_iter=50, tol=1e-4, random_state=6).fit(residual)
    np.testing.assert_allclose(km.cluster_centers_[1], ref.cluster_centers_, atol=1e-4)


def test_rqvae_encode_standardises_as_the_forward_pass_does():  # M20
    torch.manual_seed(0)
    cfg = RQVAEConfig(levels=2, codebook_size=4, hidden_dims=(8,), latent_dim=4, kmeans_init=False)
    model = RQVAE(cfg, input_dim=3)
    model.set_standardization(np.array([1.0, -2.0, 0.5]), np.array([4.0, 0.25, 3.0]))
    x = torch.randn(64, 3) * 3
    model.eval()
    with torch.no_grad():
        forward_codes = model(x).codes
    assert model.encode(x.numpy()).tolist() == forward_codes.tolist()


def test_every_decoders_codes_are_its_items_codes():  # M23
    model, ids, tree = make()
    dec = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids)).refresh()
    h = torch.randn(3, CFG.d_model)
    for name, k in (("exact", ids.num_items), ("dense", ids.num_items), ("beam", 10)):
        r = dec.decode(name, h, k=k)
        assert np.array_equal(r.codes.numpy(), ids.codes_of(r.items.numpy())), name


def test_the_grounding_fill_nearest_an_items_own_tuple_starts_with_that_item():  # M31
    model, _, _ = tiny_causal()
    tokens = model.item_tokens[1:]
    with torch.no_grad():
        near = CodeGrounder(model).nearest(tokens[:5], 3)
    assert near[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_a_fresh_code_head_starts_without_prefix_conditioning():  # M32
    _, ids, _ = make()
    layout = ids.layout(0)
    torch.manual_seed(0)
    model = CausalGenerator(CFG, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes))).eval()
    hq, prefix = torch.randn(4, CFG.d_model), model.item_tokens[1:5, :1]
    lo, hi = layout.level_range(1)
    with torch.no_grad():
        torch.testing.assert_close(model.code_logits(1, hq, prefix), hq @ model.code_emb.weight[lo:hi].T + model.code_bias[lo:hi])
