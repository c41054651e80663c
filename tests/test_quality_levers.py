"""The quality study's mechanisms: the tied item-ID input, its per-position dropout, the constant schedule, and the
plain SASRec reference (experiments.sasrec) that the study measures against."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.sasrec import SASRec, _IdRows
from generator.models.causal import CausalConfig, CausalGenerator
from generator.training.optim import OptimConfig, lr_factor
from semid.ids import SemanticIDs

CFG = CausalConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, dropout=0.0, max_history=8, dense_dim=16, id_input=True)


def _model(cfg: CausalConfig = CFG, n: int = 12) -> CausalGenerator:
    rng = np.random.default_rng(0)
    ids = SemanticIDs.from_codes(rng.integers(0, (3, 4), size=(n, 2)), (3, 4), extra_level_size=n)
    layout = ids.layout(0)
    torch.manual_seed(0)
    return CausalGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)))


def test_id_input_adds_the_tied_dense_table_row_and_nothing_at_padding() -> None:
    model = _model().eval()
    rows1 = torch.tensor([[3, 1, 0]])
    codes_only = model.code_emb(model.item_tokens[rows1]).sum(-2)
    x = model.item_inputs(rows1)
    torch.testing.assert_close(x[0, :2], codes_only[0, :2] + model.dense_head.item_table[[2, 0]])
    assert torch.equal(x[0, 2], torch.zeros(16))  # padding: no code and no ID vector
    with torch.no_grad():  # tied: the input moves with the dense head's item vector
        model.dense_head.item_table[2] += 1.0
    torch.testing.assert_close(model.item_inputs(rows1)[0, 0], x[0, 0] + 1.0)
    torch.testing.assert_close(model.item_inputs(rows1)[0, 1], x[0, 1])


def test_without_id_input_the_input_is_the_codes_alone() -> None:
    model = _model(CausalConfig.from_dict({**CFG.to_dict(), "id_input": False})).eval()
    rows1 = torch.tensor([[3, 1]])
    torch.testing.assert_close(model.item_inputs(rows1), model.code_emb(model.item_tokens[rows1]).sum(-2))


def test_item_dropout_drops_the_id_vector_per_position_while_training_only() -> None:
    model = _model(CausalConfig.from_dict({**CFG.to_dict(), "item_dropout": 0.5}))
    rows1 = torch.full((1, 400), 5)
    codes_only = model.code_emb(model.item_tokens[rows1]).sum(-2)
    torch.manual_seed(1)
    x = model.train().item_inputs(rows1)
    dropped = torch.isclose(x, codes_only).all(-1)[0]  # positions that got the codes alone
    kept = torch.isclose(x, codes_only + model.dense_head.item_table[4]).all(-1)[0]
    assert bool((dropped ^ kept).all()), "each position gets either the codes alone or codes + ID vector"
    assert 150 < int(dropped.sum()) < 250, "about half the positions drop the ID vector"
    assert torch.isclose(model.eval().item_inputs(rows1), codes_only + model.dense_head.item_table[4]).all()


def test_id_input_needs_a_dense_table_as_wide_as_the_model_and_old_configs_load_without_it() -> None:
    with pytest.raises(ValueError, match="`dense_dim` must equal `d_model`"):
        CausalConfig(d_model=16, num_heads=2, dense_dim=8, id_input=True)
    with pytest.raises(ValueError, match="`id_input` must be a bool"):
        CausalConfig(d_model=16, num_heads=2, dense_dim=16, id_input=1)
    old = {k: v for k, v in CFG.to_dict().items() if k != "id_input"}  # a checkpoint written before the option
    assert CausalConfig.from_dict(old).id_input is False


def test_constant_schedule_warms_up_then_holds_the_peak() -> None:
    f = [lr_factor(s, 10, "constant") for s in range(40)]
    assert f[:10] == [lr_factor(s, 10) for s in range(10)]  # the same warmup
    assert f[10:] == [1.0] * 30
    assert lr_factor(39, 10) < 1.0  # the default still decays
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        OptimConfig(schedule="step")


def test_sasrec_reference_is_causal_and_scores_every_item() -> None:
    torch.manual_seed(0)
    model = SASRec(20, d=16, layers=1, heads=2, max_len=6, dropout=0.0).eval()
    x = torch.tensor([[4, 7, 9, 2, 0, 0]])
    h = model(x)
    changed = x.clone()
    changed[0, 3] = 11  # a later item must not change earlier states
    h2 = model(changed)
    torch.testing.assert_close(h[0, :3], h2[0, :3])
    assert not torch.allclose(h[0, 3], h2[0, 3])
    assert model.scores(h[0, 2]).shape == (20,)
    torch.testing.assert_close(model.scores(h[0, 2])[8], h[0, 2] @ model.item.weight[9])  # item id 9 is row 8
    with pytest.raises(ValueError, match="item ids must be in"):
        _IdRows(20).rows_of(np.array([0, 3]))


def test_cpu_time_limit_counts_this_process_cpu_time_not_the_wall_clock() -> None:
    import time
    from types import SimpleNamespace

    from generator.training.callbacks import CpuTimeLimit

    limit, trainer = CpuTimeLimit(0.05), SimpleNamespace(should_stop=False)
    limit.on_train_start(trainer, None)
    time.sleep(0.2)  # waiting (as on a busy machine) uses no CPU time
    limit.on_train_batch_end(trainer, None)
    assert trainer.should_stop is False
    t = time.process_time()
    while time.process_time() - t < 0.06:  # work
        sum(range(1000))
    limit.on_train_batch_end(trainer, None)
    assert trainer.should_stop is True
    with pytest.raises(ValueError, match="`max_cpu_time` must be positive"):
        CpuTimeLimit(0)


def _tiny(seed: int = 3, n: int = 40):
    from generator.models.causal import CausalGenerator

    rng = np.random.default_rng(seed)
    ids = SemanticIDs.from_codes(rng.integers(0, (3, 4, 2), size=(n, 3)), (3, 4, 2), extra_level_size=n)
    layout = ids.layout(0)
    torch.manual_seed(seed)
    model = CausalGenerator(CausalConfig(d_model=16, num_heads=2, d_ff=32, dropout=0.0, max_history=8, dense_dim=16),
                            layout, torch.as_tensor(layout.codes_to_tokens(ids.codes))).eval()
    with torch.no_grad():
        for level in range(layout.num_levels):
            getattr(model, f"node_vec_{level}").normal_(0, 0.5)
        for mlp in model.prefix_mlp:
            mlp[2].weight.normal_(0, 0.5)
    return model, ids


def _reference_soft_loss(model, ids, hq, targets, teacher):
    """Per level: cross-entropy of the children of the target's parent against the teacher's renormalised mass on
    them, by loops over positions, levels and items (codes from the IDs, not the model's tables)."""
    tokens = np.asarray(model.layout.codes_to_tokens(ids.codes))
    total = 0.0
    for p, row in enumerate(targets.tolist()):
        for level in range(model.layout.num_levels):
            lo, _ = model.layout.level_range(level)
            prefix = tokens[row, :level]
            under = [i for i in range(len(tokens)) if (tokens[i, :level] == prefix).all()]
            children = sorted({int(tokens[i, level]) for i in under})
            if len(children) < 2:
                continue
            logits = model.code_logits(level, hq[p: p + 1, level], torch.as_tensor(prefix[None]))[0]
            logp = logits[[c - lo for c in children]].double().log_softmax(0)
            mass = torch.tensor([sum(float(teacher[p, i]) for i in under if tokens[i, level] == c) for c in children],
                                dtype=torch.float64)
            total += float(-(mass / mass.sum() * logp).sum())
    return total / len(targets)


def test_distilled_code_loss_is_the_cross_entropy_against_the_teachers_mass_on_each_child() -> None:
    from generator.models.causal_loss import code_loss

    model, ids = _tiny()
    g = torch.Generator().manual_seed(0)
    hq = torch.randn(6, model.layout.num_levels, 16, generator=g)
    targets = torch.tensor([0, 5, 9, 17, 33, 39])
    target_tokens = model.item_tokens[targets + 1]
    teacher = torch.randn(6, 40, generator=g).mul(2).softmax(-1)
    got = code_loss(model, hq, target_tokens, teacher=teacher, distill=1.0)
    assert float(got) == pytest.approx(_reference_soft_loss(model, ids, hq, targets, teacher), rel=1e-5)
    # a teacher sure of the target is the plain likelihood; distill 0 ignores the teacher
    onehot = torch.nn.functional.one_hot(targets, 40).float()
    hard = code_loss(model, hq, target_tokens)
    torch.testing.assert_close(code_loss(model, hq, target_tokens, teacher=onehot, distill=1.0), hard)
    torch.testing.assert_close(code_loss(model, hq, target_tokens, teacher=teacher, distill=0.0), hard)
    mixed = code_loss(model, hq, target_tokens, teacher=teacher, distill=0.25)
    torch.testing.assert_close(mixed, 0.75 * hard + 0.25 * got)
    with pytest.raises(ValueError, match="needs a `teacher`"):
        code_loss(model, hq, target_tokens, distill=0.5)
    with pytest.raises(ValueError, match="`distill`"):
        CausalConfig(d_model=16, num_heads=2, dense_dim=0, distill=0.5)


def test_without_code_input_the_input_is_the_id_vector_alone() -> None:
    model = _model(CausalConfig.from_dict({**CFG.to_dict(), "code_input": False})).eval()
    rows1 = torch.tensor([[3, 1, 0]])
    torch.testing.assert_close(model.item_inputs(rows1)[0, :2], model.dense_head.item_table[[2, 0]])
    assert torch.equal(model.item_inputs(rows1)[0, 2], torch.zeros(16))
    with pytest.raises(ValueError, match="`code_input` False needs `id_input`"):
        CausalConfig(d_model=16, num_heads=2, dense_dim=16, code_input=False)
    assert CausalConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k != "code_input"}).code_input is True


def test_a_checkpoint_of_a_distilled_model_passes_the_structural_checks() -> None:
    """The load-time checks rebuild the config's model without node vectors; distillation (training only) must not
    make that skeleton invalid."""
    from generator.models.checkpoint_checks import check_causal

    cfg = CausalConfig.from_dict({**CFG.to_dict(), "distill": 0.5})
    model = _model(cfg)
    check_causal(cfg, model.layout, model.state_dict(), "best.ckpt", None)  # raises on a mismatch



@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sibling_smoothing_spreads_each_levels_target_over_the_true_parents_children(eps: float) -> None:
    """The default's code loss: per level, (1 - eps) x -log p(true code) + eps x the mean of -log p over the children
    the tree allows after the true prefix, log p normalised over those children (checked by brute force)."""
    from generator.models.causal_loss import code_loss

    model = _model(CausalConfig.from_dict({**CFG.to_dict(), "id_input": False}), n=30).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for level in range(model.layout.num_levels):  # node vectors away from their zero init
            getattr(model, f"node_vec_{level}").normal_()
        hq = torch.randn(7, model.layout.num_levels, 16)
        rows = torch.tensor([0, 3, 5, 9, 14, 22, 29])
        target = model.item_tokens[rows + 1]
        got = code_loss(model, hq, target, label_smoothing=eps)
        want = torch.zeros(())
        for level in range(model.layout.num_levels):
            lo, _ = model.layout.level_range(level)
            prefix = target[:, :level]
            logits = model.code_logits(level, hq[:, level], prefix)
            for p in range(7):  # brute force: the children of this position's true prefix, from the item table
                same = (model.item_tokens[1:, :level] == prefix[p]).all(1)
                children = torch.unique(model.item_tokens[1:][same, level]) - lo
                logp = logits[p, children].log_softmax(0)
                nll = -logp[(children == target[p, level] - lo).nonzero()[0, 0]]
                want = want + ((1 - eps) * nll + eps * -logp.mean()) / 7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
