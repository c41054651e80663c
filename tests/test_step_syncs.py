"""A causal training step reads nothing back from the device (issue 21: no host synchronisation inside the step).

On a GPU, a step waits for the device whenever an op's output size depends on tensor values (a boolean-mask select,
``nonzero``, ``repeat_interleave`` without ``output_size``, ``unique``) or a value is read into Python (``.item()``,
``bool(t)``). Both are visible on the CPU too, as the aten ops the step dispatches: this suite records them with a
dispatch mode over the forward and the backward of a step as the trainer runs it (the batch planned on the host before
its transfer, ``CausalSystem.on_before_batch_transfer``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments.step_reads import DeviceReads
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.causal_loss import code_loss, dense_logits, dense_loss, pair_levels
from generator.models.dense_loss import log_popularity
from generator.models.ensemble import member_models
from generator.training import causal_system
from generator.training.causal_data import SeqBatch
from generator.training.causal_system import CausalSystem, StepBatch
from semid_cli import main
from tests.test_causal import make
from tests.test_generator_helpers import write_ids, write_random_dataset
from tests.test_gpt2_states import library_ops


def system(members: int = 1, dense_loss: str = "sampled", objective: str = "joint", **options: float) -> CausalSystem:
    cfg = CausalConfig(d_model=16, num_heads=2, d_ff=32, dense_dim=16, dropout=0.2, id_input=True, dense_loss=dense_loss,
                       num_negatives=8, members=members, **options)
    _, ids, tree = make(num_items=60, seed=0)
    layout = ids.layout(0)
    tokens = torch.as_tensor(layout.codes_to_tokens(ids.codes))
    torch.manual_seed(0)
    s = CausalSystem(cfg, layout, tokens, torch.as_tensor(ids.item_ids), "d", tree, objective=objective,
                     log_q=log_popularity(torch.arange(60), 60))
    s.optim = replace(s.optim, label_smoothing=0.1)
    s.log = lambda *a, **k: None  # no trainer here
    return s.train()


BATCH = SeqBatch(torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 10, 0, 0, 0]]), torch.tensor([3, 5, 2]),
                 torch.tensor([[2, 3, -1, -1, -1], [5, 6, 7, 8, 9], [11, -1, -1, -1, -1]]))


@pytest.mark.parametrize(("members", "dense_loss", "objective", "options"), [
    (1, "sampled", "joint", {}),
    (2, "sampled", "joint", {"node_dropout": 0.2, "item_dropout": 0.2}),
    (1, "full", "joint", {"distill": 0.5}),
    (1, "full", "generative", {}),
])
def test_a_planned_step_reads_nothing_back_and_trains_as_the_unplanned_one(members: int, dense_loss: str, objective: str,
                                                                           options: dict[str, float]) -> None:
    s = system(members, dense_loss, objective, **options)
    planned = s.on_before_batch_transfer(BATCH, 0)
    assert isinstance(planned, StepBatch) and planned.real.tolist() == [0, 1, 5, 6, 7, 8, 9, 10]
    assert s.on_before_batch_transfer(SeqBatch(BATCH.histories, BATCH.lengths, BATCH.targets[:, 0]), 0).__class__ is SeqBatch
    torch.manual_seed(1)
    with DeviceReads() as probe:
        loss = s.training_step(planned, 0)
        loss.backward()
    assert dict(probe.reads) == {}
    assert sum(planned.pairs) > 0  # the pair path ran (its counts came from the host)
    grads = [p.grad.clone() for p in s.parameters() if p.grad is not None]
    s.zero_grad()
    torch.manual_seed(1)
    again = s.training_step(BATCH, 0)  # a bare batch: planned inside the step, on the way the same loss
    again.backward()
    assert torch.equal(loss, again)
    for a, b in zip(grads, (p.grad for p in s.parameters() if p.grad is not None), strict=True):
        assert torch.equal(a, b)


def old_route(s: CausalSystem, batch: SeqBatch) -> torch.Tensor:
    """The step as it was before the host plan: boolean-mask selects of the real positions, transformers' forward, and
    the code loss counting its pairs (and checking its targets) on the device."""
    real = batch.targets >= 0
    rows = batch.targets[real]
    gen, dense = [], []
    for m in member_models(s.model):
        m.lean_forward = False
        hs = m.hidden(batch.histories)[real]
        m.lean_forward = True
        logits = dense_logits(m, hs) if s.objective != "generative" and s.config.dense_loss == "full" else None
        if s.objective != "dense":
            teacher = logits.detach().softmax(-1) if s.config.distill and logits is not None else None
            gen.append(code_loss(m, m.level_queries(hs), m.item_tokens[rows + 1], None, label_smoothing=s.optim.label_smoothing,
                                 teacher=teacher, distill=s.config.distill if teacher is not None else 0.0))
        if s.objective != "generative":
            dense.append(F.cross_entropy(logits, rows) if logits is not None else dense_loss(m, hs, rows, log_q=s.log_q))
    total = rows.new_zeros((), dtype=torch.float32)
    if gen:
        total = total + torch.stack(gen).sum()
    if dense:
        total = total + s.dense_weight * torch.stack(dense).sum()
    return total


@pytest.mark.parametrize(("members", "dense_loss", "objective", "options"), [
    (2, "sampled", "joint", {"node_dropout": 0.2, "item_dropout": 0.2}),
    (1, "full", "joint", {"distill": 0.5}),
])
def test_the_planned_step_is_the_old_routes_loss_and_gradient_to_the_bit(members: int, dense_loss: str, objective: str,
                                                                       options: dict[str, float],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    library_ops(monkeypatch)  # the old route's transformers forward: the lean path with the library's ops is it, to the bit
    s = system(members, dense_loss, objective, **options)
    results = []
    for step in (lambda: s.training_step(s.on_before_batch_transfer(BATCH, 0), 0), lambda: old_route(s, BATCH)):
        s.zero_grad()
        torch.manual_seed(7)
        loss = step()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in s.parameters() if p.grad is not None]))
    (new, new_grads), (old, old_grads) = results
    assert torch.equal(new, old)
    assert len(new_grads) == len(old_grads) > 0
    for a, b in zip(new_grads, old_grads, strict=True):
        assert torch.equal(a, b)


def test_the_probe_sees_the_reads_a_step_used_to_make() -> None:
    """The probe is not blind: a boolean-mask select, and the code loss without host pair counts (its per-level
    counts and target check), are seen."""
    s = system()
    with DeviceReads() as probe:
        x = torch.arange(6.0)
        x[x > 2].sum()
    assert probe.reads == {"aten::index with a boolean mask": 1}
    model = s.model
    rows = torch.tensor([1, 2, 4])
    with DeviceReads() as probe:
        code_loss(model, model.level_queries(model.hidden(BATCH.histories)[0, :3]), model.item_tokens[rows + 1])
    assert probe.reads["repeat_interleave without output_size"] > 0 and probe.reads["aten::_local_scalar_dense"] > 0


def test_tables_that_disagree_with_the_items_are_refused_once_when_the_system_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    _, ids, tree = make(num_items=60, seed=0)
    layout = ids.layout(0)
    tokens = torch.as_tensor(layout.codes_to_tokens(ids.codes))
    real_counts = causal_system.child_counts

    def corrupted(m: CausalGenerator) -> torch.Tensor:  # every child of the deepest branching level moved to another code
        level = pair_levels(m)[-1]
        codes = getattr(m, f"child_codes_{level}")
        codes[codes >= 0] = (codes[codes >= 0] + 1) % layout.codebook_sizes[level]
        return real_counts(m)

    monkeypatch.setattr(causal_system, "child_counts", corrupted)
    with pytest.raises(ValueError, match=r"level-\d code is not among its parent's children"):
        CausalSystem(CausalConfig(d_model=16, num_heads=2, d_ff=32, dense_dim=16), layout, tokens,
                     torch.as_tensor(ids.item_ids), "d", tree, objective="joint")


def test_semid_train_hands_every_step_a_batch_planned_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer calls the planning hook: each step gets a StepBatch, not a bare batch it would plan itself."""
    data = write_random_dataset(tmp_path / "data")
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    seen = []
    step = CausalSystem.training_step
    monkeypatch.setattr(CausalSystem, "training_step", lambda self, batch, i: seen.append(type(batch)) or step(self, batch, i))
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(tmp_path / "run"),
                 "--max-steps", "3", "--batch-size", "8", "--val-users", "5", "--no-progress"]) == 0
    assert seen == [StepBatch] * 3
