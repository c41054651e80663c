"""The sampled dense softmax of both heads: the causal design's option against its full softmax, the negatives'
proposals and their log-Q correction by hand, accidental hits."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from generator.models.causal import CausalConfig
from generator.models.causal_loss import dense_loss
from generator.models.dense_loss import candidate_softmax_loss, sample_candidates, softmax_loss
from generator.training.causal_system import CausalSystem
from tests.test_causal import CFG, make


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("correction", [True, False])
def test_causal_sampled_gradient_equals_full_when_every_item_is_sampled(correction: bool) -> None:
    """P = N positions whose targets are every item once, in-batch negatives only: every item is a column exactly
    once, so the sampled softmax is the full softmax (a uniform log Q shifts every logit alike), and such a step takes
    the full softmax itself (C = N columns; the sampled arithmetic in that case: ``test_dense.py``)."""
    N = 12
    model, _, _ = make(N, cfg=replace(CFG, dense_loss="sampled", dense_negatives="in-batch", logq_correction=correction))
    full_model, _, _ = make(N)  # the same seed: the same weights, full softmax
    torch.testing.assert_close(dict(model.named_parameters())["dense_head.item_table"], dict(full_model.named_parameters())["dense_head.item_table"])
    torch.manual_seed(1)
    h = torch.randn(N, CFG.d_model)
    targets = torch.randperm(N)
    log_q = torch.full((N,), -math.log(N))
    sampled = dense_loss(model, h, targets, log_q=log_q)
    full = dense_loss(full_model, h, targets)
    torch.testing.assert_close(sampled, full)
    g_sampled, g_full = _grads(model, sampled), _grads(full_model, full)
    assert set(g_sampled) == set(g_full) and {"dense_head.item_table", "dense_head.query_proj.weight"} <= set(g_full)
    for name in g_full:
        torch.testing.assert_close(g_sampled[name], g_full[name], msg=name)


def test_causal_sampled_loss_reaches_only_the_sampled_items() -> None:
    """The item table's gradient is non-zero on the sampled rows (the targets and the seeded draws) only."""
    N = 30
    model, _, _ = make(N, cfg=replace(CFG, dense_loss="sampled", num_negatives=3))
    targets = torch.tensor([4, 7])
    gen = torch.Generator().manual_seed(0)
    loss = dense_loss(model, torch.randn(2, CFG.d_model), targets, log_q=torch.full((N,), -math.log(N)), generator=gen)
    negatives = torch.randint(N, (3,), generator=torch.Generator().manual_seed(0))
    touched = torch.zeros(N, dtype=torch.bool)
    touched[torch.cat([targets, negatives])] = True
    grad = _grads(model, loss)["dense_head.item_table"]
    assert (grad[~touched] == 0).all() and (grad[touched].abs().sum(1) > 0).all()


def test_popularity_negatives_log_q_by_hand() -> None:
    """B = 2 in-batch draws and R = 2 popularity draws, both from q: item j's expected count is (B + R) q_j."""
    targets = torch.tensor([0, 2])
    log_q = torch.tensor([0.5, 0.25, 0.25]).log()
    cand = sample_candidates(targets, 2, 3, log_q=log_q, negatives=torch.tensor([1, 2]), proposal="popularity")
    want = torch.tensor([4 * 0.5, 4 * 0.25, 4 * 0.25, 4 * 0.25]).log()  # rows 0, 2, 1, 2
    torch.testing.assert_close(cand.log_correct, want)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vecs = torch.tensor([[1.0, 1.0], [0.0, 3.0], [2.0, 0.0], [0.0, 3.0]])
    logits = q @ vecs.T - want
    logits[1, 3] = -math.inf  # row 1's target (item 2) again among the negatives: an accidental hit, masked
    torch.testing.assert_close(candidate_softmax_loss(q, vecs, cand, targets), F.cross_entropy(logits, torch.arange(2)))
    # the same columns without the correction
    plain = sample_candidates(targets, 2, 3, log_q=log_q, negatives=torch.tensor([1, 2]), proposal="popularity", correct=False)
    assert torch.equal(plain.log_correct, torch.zeros(4))


def test_in_batch_duplicate_targets_are_masked_by_hand() -> None:
    """Two rows with the same target: each row's other copy is an accidental hit; log Q is log(B q_j)."""
    targets = torch.tensor([1, 1, 0])
    log_q = torch.tensor([0.25, 0.75, 0.0, 0.0]).log()  # four items, two of them never a target
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    loss = softmax_loss(query, lambda rows: vecs if rows is None else vecs[rows], targets, 4, loss="sampled",
                        negatives="in-batch", num_negatives=99, log_q=log_q)
    cols = vecs[targets]  # columns: items 1, 1, 0
    logits = query @ cols.T - torch.tensor([3 * 0.75, 3 * 0.75, 3 * 0.25]).log()
    logits[0, 1] = logits[1, 0] = -math.inf
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(3)))


def test_popularity_negatives_follow_q_and_are_seeded() -> None:
    log_q = torch.tensor([1e-6, 1.0 - 2e-6, 1e-6]).log()
    a = sample_candidates(torch.tensor([0]), 200, 3, log_q=log_q, proposal="popularity", generator=torch.Generator().manual_seed(5))
    b = sample_candidates(torch.tensor([0]), 200, 3, log_q=log_q, proposal="popularity", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.rows, b.rows)
    assert (a.rows[1:] == 1).float().mean() > 0.99
    u = sample_candidates(torch.tensor([0]), 300, 3, log_q=log_q, generator=torch.Generator().manual_seed(5))
    assert set(u.rows[1:].tolist()) == {0, 1, 2}  # uniform ignores q


def test_sampled_option_errors() -> None:
    with pytest.raises(ValueError, match="`dense_loss` must be one of"):
        CausalConfig(dense_loss="sample")
    with pytest.raises(ValueError, match="`dense_negatives` must be one of"):
        CausalConfig(dense_negatives="batch")
    with pytest.raises(ValueError, match="`num_negatives` must be a non-negative int"):
        CausalConfig(num_negatives=-1)
    with pytest.raises(ValueError, match="'popularity' draws from the target distribution"):
        sample_candidates(torch.tensor([0]), 2, 3, proposal="popularity")
    model, ids, tree = make(10, cfg=replace(CFG, dense_loss="sampled"))
    with pytest.raises(ValueError, match="needs `log_q`"):
        CausalSystem(model.config, model.layout, model.item_tokens[1:], torch.from_numpy(ids.item_ids), "d", tree)
    with pytest.raises(ValueError, match="`log_q` must be log-probabilities"):
        CausalSystem(model.config, model.layout, model.item_tokens[1:], torch.from_numpy(ids.item_ids), "d", tree,
                     log_q=torch.zeros(10))


def test_semid_train_with_the_sampled_dense_head(tmp_path, monkeypatch) -> None:
    """`--model-option dense_loss=sampled` trains end to end (log Q from the training targets), is stored in the
    checkpoint's config, and the run serves the dense decoder over the whole catalogue. Batches of two windows (at
    most 2 x 11 targets + 5 draws, fewer than the 40 items) keep every step on the sampled loss."""
    import generator.models.dense_loss as dense_loss_module
    from generator.runs.evaluate import evaluate_run
    from generator.runs.folder import load_run
    from semid_cli import main
    from tests.test_causal_run import FLAGS
    from tests.test_generator_helpers import write_ids, write_random_dataset

    data = write_random_dataset(tmp_path / "data")
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    run = tmp_path / "run"
    flags = [*FLAGS, "--model-option", "dense_loss=sampled", "--model-option", "dense_negatives=popularity",
             "--model-option", "num_negatives=5", "--final-val-users", "0", "--batch-size", "2"]
    steps = {"sampled": 0, "full": 0}
    for name, real in (("sampled", dense_loss_module.candidate_softmax_loss), ("full", dense_loss_module.full_softmax_loss)):
        def counted(*args, name=name, real=real):  # noqa: ANN002, ANN202
            steps[name] += 1
            return real(*args)
        monkeypatch.setattr(dense_loss_module, f"{'candidate' if name == 'sampled' else 'full'}_softmax_loss", counted)
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(run), *flags]) == 0
    assert steps["sampled"] > 0 and steps["full"] == 0  # every training step on the sampled loss
    loaded = load_run(run)
    assert loaded.model_config.dense_loss == "sampled" and loaded.model_config.num_negatives == 5
    metrics = evaluate_run(run, "test", decoder="dense")
    assert 0.0 <= metrics["recall@10"] <= 1.0


def test_sampled_takes_the_full_softmax_once_columns_would_number_the_catalogue() -> None:
    """B + R >= N: the sampled loss would cost more than the exact one, so the step is the full softmax (no draws);
    one column fewer than the catalogue and it samples again."""
    vecs = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    query = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2, 2, 5])
    asked: list[torch.Tensor | None] = []

    def vectors_of(rows: torch.Tensor | None) -> torch.Tensor:
        asked.append(rows)
        return vecs if rows is None else vecs[rows]

    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    loss = softmax_loss(query, vectors_of, targets, 6, loss="sampled", negatives="uniform", num_negatives=2, generator=gen)
    torch.testing.assert_close(loss, F.cross_entropy(query @ vecs.T, targets))
    assert asked == [None] and torch.equal(gen.get_state(), state)  # all N vectors asked for, nothing drawn
    asked.clear()
    softmax_loss(query, vectors_of, targets, 6, loss="sampled", negatives="uniform", num_negatives=1, generator=gen)
    assert asked[0] is not None and asked[0].shape == (5,)  # B + R = 5 < 6: the four targets and one draw
    asked.clear()
    softmax_loss(query, vectors_of, targets, 4, loss="sampled", negatives="in-batch", num_negatives=9, generator=gen)
    assert asked == [None]  # in-batch: B = 4 columns against 4 items


def test_history_columns_are_each_positions_own_history_by_hand() -> None:
    from generator.models.causal_loss import history_columns

    histories = torch.tensor([[3, 1, 4, 0], [2, 2, 5, 1]])  # item rows + 1, 0: pad
    real = torch.tensor([0, 1, 2, 4, 5, 6, 7])  # flat positions (b * T + t) trained
    targets = torch.tensor([0, 3, 1, 1, 4, 0, 2])  # each position's next item row (position (1, 0)'s: a repeat)
    masked = history_columns(histories, real, targets, num_items=6)
    want = torch.zeros(7, 6, dtype=torch.bool)
    for p, (b, t) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]):  # loop over positions (a test)
        for item in histories[b, : t + 1].tolist():
            if item and item - 1 != targets[p]:  # the history's items, never the target itself
                want[p, item - 1] = True
    assert torch.equal(masked(None), want)
    cols = torch.tensor([2, 0, 5, 1, 0, 2])  # a sampled column set may hold an item twice
    assert torch.equal(masked(cols), want[:, cols])
    assert not want[3, 1] and want[4, 1]  # row 1 is (1, 0)'s target though in its history: kept; (1, 1) leaves it out


def test_masked_columns_leave_the_softmax_by_hand() -> None:
    """Full and sampled: a masked column is no negative (its logit -inf), the rest as before."""
    vecs = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    query = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2])
    keep_out = torch.zeros(2, 6, dtype=torch.bool)
    keep_out[0, 4] = keep_out[1, 1] = keep_out[1, 3] = True

    def masked(cols: torch.Tensor | None) -> torch.Tensor:
        return keep_out if cols is None else keep_out[:, cols]

    def vectors_of(rows: torch.Tensor | None) -> torch.Tensor:
        return vecs if rows is None else vecs[rows]

    full = softmax_loss(query, vectors_of, targets, 6, loss="full", masked=masked)
    torch.testing.assert_close(full, F.cross_entropy((query @ vecs.T).masked_fill(keep_out, float("-inf")), targets))
    negatives = torch.tensor([4, 1, 3])
    cand = sample_candidates(targets, 3, 6, negatives=negatives)  # columns 0, 2, 4, 1, 3
    got = candidate_softmax_loss(query, vecs[cand.rows], cand, targets, masked)
    logits = query @ vecs[cand.rows].T
    logits[0, 2] = logits[1, 3] = logits[1, 4] = float("-inf")  # row 0: item 4; row 1: items 1 and 3
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.arange(2)))
    assert not torch.allclose(got, candidate_softmax_loss(query, vecs[cand.rows], cand, targets))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_a_training_step_without_seen_negatives(loss: str) -> None:
    """The dense loss of a training batch with each position's history left out of its softmax: full, the logits
    masked by hand; sampled (in-batch columns), below the loss with every column a negative."""
    from generator.models.causal_loss import history_columns

    model, _, _ = make(12, cfg=replace(CFG, dense_loss=loss, dense_negatives="in-batch"))
    histories = torch.tensor([[3, 7, 1, 9, 0], [5, 2, 8, 4, 6]])  # item rows + 1, 0: pad
    targets = torch.tensor([[6, 0, 8, -1, -1], [1, 7, 3, 5, 10]])  # next rows, -1 after the last
    real = torch.nonzero(targets.flatten() >= 0).squeeze(1)
    rows = targets.flatten()[real]
    h = model.hidden(histories).flatten(0, 1)[real]
    masked = history_columns(histories, real, rows, model.num_items)
    assert masked(None).any()
    got = dense_loss(model, h, rows, masked=masked)
    q = model.dense_queries(h)
    if loss == "full":
        logits = (q @ model.item_vectors().T).masked_fill(masked(None), float("-inf"))
        torch.testing.assert_close(got, F.cross_entropy(logits, rows))
    else:  # in-batch: the columns are the positions' targets; a target again elsewhere is an accidental hit
        out = (rows[None, :] == rows[:, None]) | masked(rows)
        out.fill_diagonal_(False)
        logits = (q @ model.item_vectors(rows).T).masked_fill(out, float("-inf"))
        torch.testing.assert_close(got, F.cross_entropy(logits, torch.arange(rows.numel())))
    assert got < dense_loss(model, h, rows)  # fewer negatives, a smaller loss


def test_semid_train_without_seen_negatives(tmp_path, monkeypatch) -> None:
    """`--model-option seen_negatives=false` reaches every training step's dense loss and is stored in the run."""
    import generator.training.causal_system as system_module
    from generator.runs.folder import load_run
    from semid_cli import main
    from tests.test_causal_run import FLAGS
    from tests.test_generator_helpers import write_ids, write_random_dataset

    data = write_random_dataset(tmp_path / "data")
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    calls = []
    real = system_module.history_columns
    monkeypatch.setattr(system_module, "history_columns", lambda *a: calls.append(1) or real(*a))
    flags = [*FLAGS, "--final-val-users", "0"]
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(tmp_path / "on"), *flags]) == 0
    assert not calls  # the default: the history's items are negatives like any other
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(tmp_path / "off"), *flags,
                 "--model-option", "seen_negatives=false"]) == 0
    assert calls and load_run(tmp_path / "off").model_config.seen_negatives is False


def test_the_distillation_teacher_gives_no_mass_to_the_left_out_history(tmp_path, monkeypatch) -> None:
    """With `distill` and the full softmax, the code head's teacher is the masked dense softmax: nothing the
    position's dense loss leaves out gets mass in it."""
    import generator.training.causal_system as system_module
    from semid_cli import main
    from tests.test_causal_run import FLAGS
    from tests.test_generator_helpers import write_ids, write_random_dataset

    data = write_random_dataset(tmp_path / "data")
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    seen = {"masks": [], "teachers": []}
    real_columns, real_code_loss = system_module.history_columns, system_module.code_loss

    def columns(*a):  # noqa: ANN002, ANN202
        seen["masks"].append(real_columns(*a))
        return seen["masks"][-1]

    def code_loss(*a, teacher=None, **kw):  # noqa: ANN002, ANN003, ANN202
        seen["teachers"].append(teacher)
        return real_code_loss(*a, teacher=teacher, **kw)

    monkeypatch.setattr(system_module, "history_columns", columns)
    monkeypatch.setattr(system_module, "code_loss", code_loss)
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(tmp_path / "run"), *FLAGS,
                 "--final-val-users", "0", "--model-option", "seen_negatives=false", "--model-option", "distill=0.5",
                 "--model-option", "dense_loss=full"]) == 0
    assert seen["masks"] and len(seen["teachers"]) == len(seen["masks"])
    for masked, teacher in zip(seen["masks"], seen["teachers"], strict=True):  # loop over steps (a few)
        out = masked(None)
        assert out.any() and float(teacher[out].abs().max()) == 0.0 and torch.allclose(teacher.sum(1), torch.ones(1))
