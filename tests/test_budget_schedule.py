"""Schedules that end with the budget (issue 19): the cosine and the cooldown follow the share of the run's budget
spent (steps, epochs, wall or CPU time), a CPU-time budget is kept across a resume, and a run with such a schedule
resumes to the same weights."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from generator.runs.options import TrainOptions
from generator.training.callbacks import BudgetProgress, CpuTimeLimit
from generator.training.optim import OptimConfig, adamw_schedule, lr_factor


def test_cosine_falls_from_the_peak_to_zero_over_the_budget_after_the_warmup() -> None:
    assert [lr_factor(s, 4, "cosine", 0.0) for s in range(3)] == [0.25, 0.5, 0.75]  # the warmup, whatever the share
    assert lr_factor(10, 4, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 4, "cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor(10, 4, "cosine", 0.25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(10, 4, "cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(10, 4, "cosine", 1.7) == lr_factor(10, 4, "cosine", 1.0)  # a share past the end is the end
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        OptimConfig(schedule="linear")


def test_cooldown_falls_linearly_to_zero_over_the_last_share_of_any_schedule() -> None:
    inv = lr_factor(99, 4)  # the inverse-sqrt factor at that step
    assert lr_factor(99, 4, "inverse-sqrt", 0.79, cooldown=0.2) == inv  # before the cooldown: untouched
    assert lr_factor(99, 4, "inverse-sqrt", 0.9, cooldown=0.2) == pytest.approx(inv * 0.5)
    assert lr_factor(99, 4, "inverse-sqrt", 1.0, cooldown=0.2) == 0.0
    assert lr_factor(99, 4, "constant", 0.95, cooldown=0.1) == pytest.approx(0.5)
    assert OptimConfig(cooldown=0.2).needs_budget and OptimConfig(schedule="cosine").needs_budget
    assert not OptimConfig().needs_budget
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="`cooldown` must be a fraction"):
            OptimConfig(cooldown=bad)


def test_a_schedule_that_follows_the_budget_needs_one() -> None:
    with pytest.raises(ValueError, match="follows the budget's progress, and this run has none: give --max-epochs"):
        TrainOptions(schedule="cosine", max_epochs=None)
    with pytest.raises(ValueError, match="this run has none"):
        TrainOptions(cooldown=0.2, max_epochs=None)
    for budget in ({"max_steps": 100}, {"max_time": "00:10:00"}, {"max_cpu_time": "00:10:00"}, {"max_epochs": 50}):
        assert TrainOptions(schedule="cosine", **{"max_epochs": None, **budget}).optim().schedule == "cosine"
    with pytest.raises(ValueError, match="`cooldown`"):
        TrainOptions(cooldown=-1.0)


class _Linear(L.LightningModule):
    def __init__(self, optim: OptimConfig) -> None:
        super().__init__()
        self.w, self.optim, self.rates = torch.nn.Linear(4, 1), optim, []

    def training_step(self, batch: list[torch.Tensor], i: int) -> torch.Tensor:
        self.rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.w(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> dict:
        return adamw_schedule(self, self.optim)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4)), batch_size=4)  # 10 steps


def _fit(optim: OptimConfig, **budget: int) -> list[float]:
    module = _Linear(optim)
    L.Trainer(callbacks=[BudgetProgress()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, **budget).fit(module)
    return module.rates


@pytest.mark.parametrize("budget", [{"max_steps": 20}, {"max_epochs": 2}])
def test_a_training_run_steps_the_rate_by_the_share_of_its_steps_or_epochs(budget: dict[str, int]) -> None:
    rates = _fit(OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine"), **budget)
    assert len(rates) == 20
    assert rates == pytest.approx([lr_factor(s, 2, "cosine", s / 20) for s in range(20)])
    rates = _fit(OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", cooldown=0.5), **budget)
    assert rates == pytest.approx([min(1.0, (20 - s) / 10) for s in range(20)])


def test_the_share_of_a_time_budget_is_the_time_spent_over_it() -> None:
    limit = CpuTimeLimit(100.0)
    limit.load_state_dict({"used_s": 25.0})  # a resumed run: a quarter spent before
    limit.on_train_start(None, None)
    trainer = SimpleNamespace(max_steps=-1, max_epochs=-1, num_training_batches=10, callbacks=[])
    share = BudgetProgress(cpu_limit=limit).progress(trainer, 3)
    assert 0.25 <= share < 0.26
    trainer = SimpleNamespace(max_steps=400, max_epochs=-1, num_training_batches=10, callbacks=[])
    assert BudgetProgress(cpu_limit=limit).progress(trainer, 300) == 0.75  # the budget that ends first counts


def test_cpu_time_limit_spends_what_is_left_of_its_budget_after_a_resume() -> None:
    first, trainer = CpuTimeLimit(0.2), SimpleNamespace(should_stop=False)
    first.on_train_start(trainer, None)
    t = time.process_time()
    while time.process_time() - t < 0.15:  # work: 0.15 of the 0.2 s spent
        sum(range(1000))
    state = first.state_dict()
    assert 0.15 <= state["used_s"] < 0.2
    resumed = CpuTimeLimit(0.2)
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer, None)
    resumed.on_train_batch_end(trainer, None)
    assert trainer.should_stop is False
    t = time.process_time()
    while time.process_time() - t < 0.06:  # past the budget with what was spent before the resume
        sum(range(1000))
    resumed.on_train_batch_end(trainer, None)
    assert trainer.should_stop is True


def test_a_run_with_a_cosine_schedule_resumes_to_the_same_weights(tmp_path: Path) -> None:
    from generator.runs.train import train_run
    from tests.test_generator_helpers import write_ids, write_random_dataset
    from tests.test_resume import CAUSAL, OPTIONS, PINNED, _interrupt_and_resume, _outcome, _same

    data = write_random_dataset(tmp_path / "data", num_users=60)
    ids = write_ids(tmp_path / "ids.npz")
    options = TrainOptions(preset=CAUSAL, **{**OPTIONS, "max_epochs": 2}, schedule="cosine", warmup_steps=2, **PINNED)
    train_run(data, ids, tmp_path / "ref", options)
    _interrupt_and_resume(data, ids, tmp_path / "cut", options, "kill", 5)
    assert _same(_outcome(tmp_path / "cut"), _outcome(tmp_path / "ref"))
    last = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-9)  # spent to the end
