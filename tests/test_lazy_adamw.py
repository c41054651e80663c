"""Sparse tables: the lazy AdamW against torch's AdamW, the sparse gradients of the item and node tables, and a
training run with them that resumes exactly."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from generator.models.causal_loss import code_loss, dense_loss
from generator.runs.options import TrainOptions
from generator.training.optim import LazyAdamW
from tests.test_causal import CFG, make
from tests.test_resume import OPTIONS, PINNED, _interrupt_and_resume, _outcome, _same


def _pair(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    return [torch.nn.Parameter(t.clone()) for t in base], [torch.nn.Parameter(t.clone()) for t in base]


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]


def test_dense_gradients_get_torch_adamw_updates() -> None:
    ours, ref = _pair()
    opt, want = LazyAdamW(_groups(ours), lr=0.01, betas=(0.9, 0.98)), torch.optim.AdamW(_groups(ref), lr=0.01, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        want.step()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_a_sparse_gradient_updates_its_rows_as_adamw_and_leaves_the_others_alone() -> None:
    ours, ref = _pair(3)
    table, ref_table = ours[0], ref[0]
    opt, want = LazyAdamW([table], lr=0.05, weight_decay=0.1), torch.optim.AdamW([ref_table], lr=0.05, weight_decay=0.1)
    before = table.detach().clone()
    g = torch.Generator().manual_seed(2)
    rows = torch.tensor([1, 4, 4])  # a row twice: its gradients add up
    for _ in range(3):  # the same rows every step: lazy AdamW is AdamW on them
        values = torch.randn(3, 5, generator=g)
        table.grad = torch.sparse_coo_tensor(rows[None], values, table.shape)
        ref_table.grad = torch.zeros(7, 5).index_add(0, rows, values)
        opt.step()
        want.step()
    torch.testing.assert_close(table[[1, 4]], ref_table[[1, 4]], atol=1e-6, rtol=1e-6)
    untouched = torch.tensor([0, 2, 3, 5, 6])
    assert torch.equal(table[untouched], before[untouched])  # no decay, no moment: not seen, not moved
    assert (opt.state[table]["exp_avg"][untouched] == 0).all()
    assert not torch.equal(ref_table[untouched], before[untouched])  # (dense AdamW decays them)


def test_sparse_tables_give_sparse_gradients_equal_to_the_dense_ones() -> None:
    cfg = replace(CFG, dense_loss="sampled", num_negatives=4)
    dense_model, _, _ = make(30, cfg=cfg)
    sparse_model, _, _ = make(30, cfg=replace(cfg, sparse_tables=True))
    grads = []
    for model in (dense_model.train(), sparse_model.train()):
        torch.manual_seed(0)
        hist = torch.tensor([[3, 7, 1, 9], [4, 2, 0, 0]])
        h = model.hidden(hist)[:, -1]
        targets = torch.tensor([5, 11])
        gen = code_loss(model, model.level_queries(h), model.item_tokens[targets + 1], None)  # the training loss
        loss = dense_loss(model, h, targets, log_q=torch.full((30,), -math.log(30)),
                          generator=torch.Generator().manual_seed(0)) + gen
        model.zero_grad()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    dense, sparse = grads
    tables = {"dense_head.item_table", *(f"node_vec_{lv}" for lv in range(1, sparse_model.layout.num_levels))}
    assert set(dense) == set(sparse)
    for name in dense:
        assert sparse[name].is_sparse == (name in tables), name
        torch.testing.assert_close(sparse[name].to_dense(), dense[name], msg=name)


def test_sparse_tables_train_on_one_process_only() -> None:
    with pytest.raises(ValueError, match="`sparse_tables` trains on one process"):
        TrainOptions(devices=2, model_options={"sparse_tables": True})
    assert TrainOptions(model_options={"sparse_tables": True, "dense_loss": "sampled"}).model_options["sparse_tables"]


def test_a_run_with_sparse_tables_trains_and_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the sampled loss at every step (its draws are seeded per step): batches of two windows, at most 2 x 11
    targets + 4 draws, fewer than the 40 items (with more columns than items a step takes the full softmax)."""
    import generator.models.dense_loss as dense_loss_module
    from generator.runs.train import train_run
    from tests.test_generator_helpers import write_ids, write_random_dataset

    full_steps = []
    monkeypatch.setattr(dense_loss_module, "full_softmax_loss", lambda *a: full_steps.append(1))
    data = write_random_dataset(tmp_path / "data", num_users=60)
    ids = write_ids(tmp_path / "ids.npz")
    options = TrainOptions(preset="causal", **{**OPTIONS, "max_epochs": 1, "batch_size": 2},
                           model_options={**PINNED["model_options"], "sparse_tables": True, "dense_loss": "sampled", "num_negatives": 4})
    train_run(data, ids, tmp_path / "ref", options)
    _interrupt_and_resume(data, ids, tmp_path / "cut", options, "kill", 9)
    assert _same(_outcome(tmp_path / "cut"), _outcome(tmp_path / "ref")) and not full_steps
