"""The ensemble design (``CausalConfig.members``): an item's score is the sum of the members' log-likelihoods, each
level normalised per member, in the beam, exact scoring (whole and chunked) and the beam over the model's own code
head; the dense head is the sum of the members' logits; training adds the members' own losses; a run trains, saves,
loads (every member checked) and serves end to end."""

from __future__ import annotations

import copy
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import generator.decoding.causal as causal_decoding
from generator.decoding.beam import TreeConstraint, leaf_search
from generator.decoding.causal import CausalDecoders, EdgeLevels, beam_search, exact_scores
from generator.decoding.chunked import exact_topk
from generator.designs.causal import causal_config
from generator.designs.registry import load_checkpoint
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.checkpoint import INTEGRITY_KEY, with_integrity
from generator.models.ensemble import EnsembleGenerator, build_causal, member_models
from generator.runs.evaluate import evaluate_run
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.recommend import recommend
from generator.runs.recommender import Recommender
from generator.training.causal_data import SeqBatch
from generator.training.causal_system import CausalSystem
from semid.tree import PrefixTree
from semid_cli import main
from tests.test_causal import make, reference_logprob
from tests.test_generator_helpers import write_ids, write_random_dataset


def two_members(num_items: int = 40, added: int = 0):  # noqa: ANN201
    """Two generators of one config and catalogue with other weights, their ensemble, the IDs, the tree (and, with
    ``added`` items added after training, the trained items' tree)."""
    first, ids, tree = make(num_items=num_items, seed=0, sizes=(4, 6))
    second = copy.deepcopy(first)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    ens = EnsembleGenerator.of([first, second]).eval()
    trained_tree = None
    if added:
        rng = np.random.default_rng(3)
        ids = ids.add_items(rng.integers(0, (4, 6), size=(added, 2)), np.arange(10_000, 10_000 + added))
        tokens = torch.as_tensor(ens.layout.codes_to_tokens(ids.codes[-added:]))
        for m in (first, second, ens):
            m.add_items(tokens)
        trained_tree, tree = tree, PrefixTree.from_semantic_ids(ids, ens.layout)
    return [first, second], ens, ids, tree, trained_tree


def states(B: int = 5, D: int = 16, members: int = 2) -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(B, members * D)


def test_exact_scores_are_the_sum_of_each_members_own_log_likelihood() -> None:
    (first, second), ens, ids, tree, _ = two_members()
    h = states(D=first.config.d_model)
    h1, h2 = h.chunk(2, dim=1)
    want = reference_logprob(first, ids, h1) + reference_logprob(second, ids, h2)  # loops over items and levels
    dec = CausalDecoders(ens, tree, torch.as_tensor(ids.item_ids)).refresh()
    got = exact_scores(ens, h, dec.paths, dec.tables)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # level by level too (what the hybrid's `levels` fusion reads): each member's terms, added
    want_levels = reference_logprob(first, ids, h1, per_level=True) + reference_logprob(second, ids, h2, per_level=True)
    torch.testing.assert_close(exact_scores(ens, h, dec.paths, dec.tables, per_level=True).double(), want_levels, rtol=1e-5, atol=1e-4)
    assert ens.level_queries(h).shape == (2, 5, ens.layout.num_levels, first.config.d_model)  # members first


def test_served_states_run_the_members_backbones_as_one_and_follow_every_weight_change() -> None:
    """Outside training the members' states come from one stacked forward: the same states as each member's own
    (up to float rounding), and after a weight changes in place (an optimiser step, the average's swap) the next call
    reads the new weights, not the stack made before. In training the members run one by one (dropout and all)."""
    _, ens, _, _, _ = two_members()
    first, second = ens.members
    hist = torch.tensor([[3, 7, 1, 9, 0], [4, 2, 0, 0, 0], [5, 6, 7, 8, 9]])
    lengths = torch.tensor([4, 2, 5])

    def own() -> torch.Tensor:
        return torch.cat([first.eval().hidden(hist), second.eval().hidden(hist)], dim=-1)

    with torch.no_grad():
        torch.testing.assert_close(ens.hidden(hist), own(), rtol=1e-5, atol=1e-5)
        stacked = ens._stacked
        torch.testing.assert_close(ens.last_hidden(hist, lengths), own()[torch.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
        assert ens._stacked is stacked  # nothing changed: the stack is reused
        for weight in (second.backbone.h[1].mlp.c_fc.weight, first.backbone.wpe.weight, second.backbone.ln_f.bias):
            weight.add_(0.5)
            torch.testing.assert_close(ens.hidden(hist), own(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ens.last_hidden(hist, lengths), own()[torch.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
    ens.hidden(hist).sum().backward()  # served states with gradients on: the members' own weights get them
    assert second.backbone.h[0].attn.c_attn.weight.grad is not None
    ens.train()
    torch.manual_seed(0)
    a = ens.hidden(hist)
    torch.manual_seed(0)
    b = torch.cat([first.hidden(hist), second.hidden(hist)], dim=-1)  # dropout drawn member by member
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("added", [0, 7])
def test_a_beam_over_every_item_gives_the_exact_ranking_and_scores(added: int) -> None:
    _, ens, ids, tree, trained_tree = two_members(added=added)
    h = states(D=ens.config.d_model)
    N = ids.num_items
    dec = CausalDecoders(ens, tree, torch.as_tensor(ids.item_ids), num_beams=N, trained_tree=trained_tree).refresh()
    beam = dec.decode("beam", h, k=10, num_beams=N)
    exact = dec.decode("exact", h, k=10)
    torch.testing.assert_close(beam.scores, exact.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(beam.items, exact.items)
    # the beam over the model's own code head (prefix FiLM and node vectors per beam) gives the same
    if not added:
        items, scores, _ = beam_search(ens, h, tree, k=10, num_beams=N)
        torch.testing.assert_close(scores, exact.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(items, exact.items)


@pytest.mark.parametrize("dense_factor, table_dtype", [(0, "float32"), (10**9, "float32"), (0, "bfloat16"), (10**9, "bfloat16")])
@pytest.mark.parametrize("pair_chunk", [None, 7])
def test_both_beam_steps_read_every_members_edges_with_any_table_dtype(dense_factor: int, table_dtype: str,
                                                                        pair_chunk: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The beam step's gathered pairs (dense_factor 0; ``pair_chunk`` of them at a time) and its one product per level
    (a large factor) both give the exact ranking of an ensemble, with 32- and 16-bit tables."""
    if pair_chunk:
        monkeypatch.setattr(causal_decoding, "PAIR_CHUNK", pair_chunk)
    _, ens, ids, tree, _ = two_members()
    h = states(D=ens.config.d_model)
    N = ids.num_items
    dec = CausalDecoders(ens, tree, torch.as_tensor(ids.item_ids), num_beams=N, table_dtype=table_dtype).refresh()
    on_tree = TreeConstraint(tree, h.shape[0], h.device)
    items, scores, _ = leaf_search(EdgeLevels(dec, h, on_tree, dense_factor=dense_factor), tree,
                                   levels=ens.layout.num_levels, k=10, num_beams=N, constraint=on_tree)
    exact = dec.decode("exact", h, k=10)
    torch.testing.assert_close(scores, exact.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(items, exact.items)


def test_exact_in_chunks_under_a_memory_budget_gives_the_whole_matrix_top_k() -> None:
    _, ens, ids, tree, _ = two_members(num_items=60)
    h = states(B=7, D=ens.config.d_model)
    dec = CausalDecoders(ens, tree, torch.as_tensor(ids.item_ids)).refresh()
    whole_s, whole_r = exact_scores(ens, h, dec.paths, dec.tables).topk(10, dim=1)
    s, r = exact_topk(ens, h, dec.paths, dec.tables, 10, max_score_bytes=2 * 4 * 13, item_chunk=13)
    torch.testing.assert_close(s, whole_s, rtol=1e-5, atol=1e-5)
    assert torch.equal(r, whole_r)


def test_the_dense_head_scores_by_the_sum_of_the_members_logits_as_one_inner_product() -> None:
    (first, second), ens, ids, tree, _ = two_members()
    h = states(D=first.config.d_model)
    h1, h2 = h.chunk(2, dim=1)
    with torch.no_grad():
        want = first.dense_queries(h1) @ first.item_vectors().T + second.dense_queries(h2) @ second.item_vectors().T
        got = ens.dense_queries(h) @ ens.item_vectors().T
        one, two = ens.members  # (copies of first and second)
        two.dense_head.query_proj.weight.mul_(-2.0)  # in place: the stacked projections follow (one product)
        torch.testing.assert_close(ens.dense_queries(h), torch.cat([one.dense_queries(h1), two.dense_queries(h2)], -1),
                                   rtol=1e-6, atol=1e-6)
        two.dense_head.query_proj.weight.div_(-2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    served = copy.deepcopy(ens)
    with torch.no_grad():
        served.dense_queries(h)  # a stack made before the release ...
        served.members[1].dense_head.query_proj.weight.mul_(-2.0)  # ... then a weight changed, then the release
        CausalDecoders(served, tree, torch.as_tensor(ids.item_ids)).refresh(release=True)
        one, two = served.members
        torch.testing.assert_close(served.dense_queries(h), torch.cat([one.dense_queries(h1), two.dense_queries(h2)], -1),
                                   rtol=1e-6, atol=1e-6)
    dec = CausalDecoders(ens, tree, torch.as_tensor(ids.item_ids)).refresh()
    assert torch.equal(dec.decode("dense", h, k=5).items, torch.as_tensor(ids.item_ids)[want.topk(5, dim=1).indices])


def test_training_adds_the_members_own_losses() -> None:
    """The ensemble's training loss is the sum of each member's loss as a model of its own (dropout off, full
    softmax: nothing random), so each member's gradient is its own loss's."""
    cfg = replace(CausalConfig(d_model=16, num_heads=2, d_ff=32, dense_dim=16, dropout=0.0), members=2)
    _, ids, tree = make(num_items=30, seed=0)
    layout = ids.layout(0)
    tokens = torch.as_tensor(layout.codes_to_tokens(ids.codes))
    torch.manual_seed(0)
    ens = CausalSystem(cfg, layout, tokens, torch.as_tensor(ids.item_ids), "digest", tree, objective="joint")
    assert isinstance(ens.model, EnsembleGenerator)
    m0, m1 = ens.model.members
    assert not torch.equal(m0.code_emb.weight, m1.code_emb.weight)  # each member from its own initialisation
    singles = []
    for member in (m0, m1):
        one = CausalSystem(replace(cfg, members=1), layout, tokens, torch.as_tensor(ids.item_ids), "digest", tree, objective="joint")
        one.model.load_state_dict(member.state_dict())
        singles.append(one)
    histories = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    batch = SeqBatch(histories, torch.tensor([3, 4]), torch.tensor([[1, 2, -1, -1], [4, 5, 6, 7]]))
    for s in (ens, *singles):
        s.log = lambda *a, **k: None  # no trainer here
    total = ens.training_step(batch, 0)
    parts = [s.training_step(batch, 0) for s in singles]
    torch.testing.assert_close(total, parts[0] + parts[1])
    total.backward()
    parts[0].backward()
    parts[1].backward()
    for member, single in zip((m0, m1), singles, strict=True):  # each member's gradient is its own loss's
        for (name, p), q in zip(member.named_parameters(), single.model.parameters(), strict=True):
            if p.grad is not None or q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_member_counts_and_mixed_members_are_refused() -> None:
    with pytest.raises(ValueError, match="`members` must be a positive int"):
        CausalConfig(members=0)
    with pytest.raises(ValueError, match="`members` must be at most 16"):
        CausalConfig(members=17)
    assert CausalConfig(members=12).members == 12  # three four-member runs combined
    model, ids, _ = make()
    with pytest.raises(ValueError, match="is an ensemble: build it with"):
        CausalGenerator(replace(model.config, members=2), model.layout, model.item_tokens[1:])
    assert isinstance(build_causal(replace(model.config, members=2), model.layout, model.item_tokens[1:]), EnsembleGenerator)
    other = make(cfg=replace(model.config, d_ff=model.config.d_ff * 2))[0]
    with pytest.raises(ValueError, match="member 1's config differs"):
        EnsembleGenerator.of([model, other])
    assert member_models(model) == [model]


FLAGS = ["--max-epochs", "2", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0",
         "--model-option", "members=2"]


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(run), *FLAGS]) == 0
    return {"run": run, "root": root}


def test_an_ensemble_run_trains_loads_and_decodes_with_every_decoder(ensemble_run: dict[str, Path]) -> None:
    run = load_run(ensemble_run["run"])
    assert isinstance(run.model, EnsembleGenerator) and run.model_config.members == 2
    for name in ("beam", "exact", "dense", "hybrid"):
        m = evaluate_run(ensemble_run["run"], "test", decoder=name, num_beams=10)
        assert m["users_evaluated"] == 24 and m["invalid_items"] == 0 and m["duplicate_items"] == 0


def test_a_served_ensemble_frees_every_members_tables_and_ranks_as_the_whole_model(ensemble_run: dict[str, Path]) -> None:
    """`Recommender.from_run` releases each member's node vectors once the tables hold them; its rankings are the
    ones a run loaded whole gives."""
    served = Recommender.from_run(ensemble_run["run"])
    assert all({"node_vec_0", "node_vec_1"} <= m.released for m in served.run.model.members)
    whole = load_run(ensemble_run["run"])
    histories = [[1, 2, 3], [10, 12, 14, 16], [5]]
    for name in ("beam", "exact", "dense", "hybrid"):
        got, want = served.recommend(histories, 5, name), recommend(whole, histories, k=5, decoder=name)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a.items, b.items)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__("model.members.2.code_bias", sd["model.members.0.code_bias"].clone()),
     r"tensor `members.2.code_bias` belongs to none of the ensemble's 2 members"),
    (lambda sd: sd.__setitem__("model.code_bias", sd["model.members.0.code_bias"].clone()),
     r"tensor `code_bias` belongs to none of the ensemble's 2 members"),
    (lambda sd: sd["model.members.1.child_index_1"].__setitem__((0, 0), 10**6),
     r"tensor `child_index_1` is not the prefix-tree table"),
    (lambda sd: sd.pop("model.members.1.item_tokens"), r"tensor `item_tokens` must be int64"),
])
def test_a_crafted_ensemble_checkpoint_is_refused_naming_the_tensor(ensemble_run: dict[str, Path], tmp_path: Path,
                                                                    edit, message: str) -> None:  # noqa: ANN001
    run = Path(shutil.copytree(ensemble_run["run"], tmp_path / "run"))
    path = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop(INTEGRITY_KEY)
    edit(ckpt["state_dict"])
    torch.save(with_integrity(ckpt), path)
    with pytest.raises(ValueError, match=message):
        load_run(run)


def test_members_with_another_catalogue_are_refused_before_the_ensemble_is_built(ensemble_run: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """Without the IDs at hand (``load_checkpoint(path)``), member 1's item tokens must still be member 0's."""
    ckpt = torch.load(ensemble_run["run"] / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt.pop(INTEGRITY_KEY)
    tokens = ckpt["state_dict"]["model.members.1.item_tokens"]
    assert not torch.equal(tokens[1], tokens[2])
    tokens[[1, 2]] = tokens[[2, 1]]  # valid tokens, another catalogue order
    path = tmp_path / "crafted.ckpt"
    torch.save(with_integrity(ckpt), path)
    with pytest.raises(ValueError, match=r"tensor `members.1.item_tokens` differs from member 0's"):
        load_checkpoint(path)


@pytest.mark.parametrize("budget, members", [(None, 1), ("00:08:00", 1), ("00:14:59", 1), ("00:15:00", 2),
                                             ("00:22:30", 3), ("00:30:00", 4), ("01:00:00", 4), ("01:14:59", 4),
                                             ("01:15:00", 5), ("01:30:00", 6), ("02:00:00", 8), ("1:00:00:00", 8)])
def test_the_defaults_members_follow_the_time_budget(budget: str | None, members: int) -> None:
    """One member per 7.5 minutes of the CPU (else wall) budget, 1 to 4, then beyond an hour one per 15 minutes, at
    most 8; what `--model-option members` or another preset says wins."""
    assert causal_config(TrainOptions(max_cpu_time=budget)).members == members
    assert causal_config(TrainOptions(max_time=budget)).members == members
    assert causal_config(TrainOptions(max_cpu_time=budget, max_time="00:01:00")).members == members  # CPU time first
    assert causal_config(TrainOptions(max_cpu_time=budget, model_options={"members": 3})).members == 3
    assert causal_config(TrainOptions(preset="causal-64", max_cpu_time=budget)).members == 1


def test_the_stacked_weights_follow_parameters_replaced_by_a_load() -> None:
    """``load_state_dict(assign=True)`` replaces the Parameters themselves: the served states read the new ones."""
    _, ens, _, _, _ = two_members()
    hist, lengths = torch.tensor([[3, 7, 1, 9], [4, 2, 0, 0]]), torch.tensor([4, 2])
    with torch.no_grad():
        ens.last_hidden(hist, lengths)  # the stack made from the weights now
        state = {k: v + 0.25 if ".backbone." in k else v for k, v in ens.state_dict().items()}
        ens.load_state_dict(state, assign=True)
        own = torch.cat([m.eval().hidden(hist) for m in ens.members], dim=-1)[torch.arange(2), lengths - 1]
        torch.testing.assert_close(ens.last_hidden(hist, lengths), own, rtol=1e-5, atol=1e-5)


def test_a_released_ensemble_keeps_its_stacked_weights_without_reading_versions() -> None:
    """Serving (``release_tables``) never trains the model again: the stack made at the first call is kept, and the
    states it gives are still each member's own."""
    _, ens, ids, tree, _ = two_members()
    hist, lengths = torch.tensor([[3, 7, 1, 9], [4, 2, 0, 0]]), torch.tensor([4, 2])
    CausalDecoders(ens, tree, torch.as_tensor(ids.item_ids)).refresh(release=True)
    assert ens.released
    with torch.no_grad():
        first = ens.last_hidden(hist, lengths)
        stack = ens._stacked
        ens.members[0].backbone.h[0].ln_1.weight.add_(0.0)  # a version bump: an unreleased model would stack again
        torch.testing.assert_close(ens.last_hidden(hist, lengths), first, rtol=0, atol=0)
        assert ens._stacked is stack
        own = torch.cat([m.eval().hidden(hist) for m in ens.members], dim=-1)[torch.arange(2), lengths - 1]
        torch.testing.assert_close(first, own, rtol=1e-5, atol=1e-5)


def test_served_level_queries_are_one_product_for_all_members_and_follow_their_weights() -> None:
    """Outside training an ensemble's level queries come from its members' head weights stacked (one batched product
    for all members and levels): each member's own queries, also after a head weight changes in place."""
    _, ens, _, _, _ = two_members()
    first, second = ens.members
    h = torch.randn(3, 2, 2 * first.config.d_model)

    def own() -> torch.Tensor:
        return torch.stack([m.level_queries(x) for m, x in zip(ens.members, h.chunk(2, dim=-1), strict=True)])

    with torch.no_grad():
        torch.testing.assert_close(ens.level_queries(h), own(), rtol=1e-5, atol=1e-5)
        for weight in (second.level_proj[1].weight, first.head_norm.bias, second.level_proj[0].bias):
            weight.add_(0.5)
            torch.testing.assert_close(ens.level_queries(h), own(), rtol=1e-5, atol=1e-5)
    assert ens.level_queries(h).requires_grad  # with gradients on: the members' own heads, which get them
