"""An exponential moving average of the weights (``--ema``, issue 19): the update's arithmetic, validation scoring
the average that the best checkpoint then serves, and a run with it resuming to the same weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from typing import Any

import pytest
import torch
import yaml

from generator.models.checkpoint import safe_load
from generator.runs.options import TrainOptions
from generator.training.callbacks import ema_update


def test_the_average_moves_towards_the_weights_by_one_minus_the_warmed_up_decay() -> None:
    update = ema_update(0.9)
    avg, w = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)], [torch.ones(3), torch.full((2,), 2.0, dtype=torch.float64)]
    expected = 0.0
    for n in range(100):
        d = min(0.9, (1 + n) / (10 + n))  # 0.1 at the first update: the initial weights leave the average fast
        expected = d * expected + (1 - d) * 1.0
        update(avg, w, torch.tensor(n))
        assert avg[0] == pytest.approx(torch.full((3,), expected), abs=1e-6)
        assert avg[1] == pytest.approx(torch.full((2,), 2 * expected, dtype=torch.float64), abs=1e-12)
    assert d == 0.9  # past the warm-up the decay is the one asked for
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="EMA decay must be in"):
            ema_update(bad)


def test_the_default_preset_serves_an_average_and_the_others_do_not() -> None:
    assert TrainOptions().ema == 0.999 and TrainOptions(preset="causal", ema=0).ema == 0
    for other in ({"preset": "causal-64"}, {"preset": "causal-wide"}, {"preset": "cpu"}, {"target": "title"}):
        assert TrainOptions(**other).ema == 0.0


def test_the_option_is_a_decay_below_one() -> None:
    assert TrainOptions(ema=0.5).ema == 0.5
    for bad in (1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"`ema` must be a number in \[0, 1\)"):
            TrainOptions(ema=bad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from generator.runs.train import train_run
    from tests.test_generator_helpers import write_ids, write_random_dataset
    from tests.test_resume import CAUSAL, OPTIONS, PINNED, _interrupt_and_resume

    tmp = tmp_path_factory.mktemp("ema")
    data = write_random_dataset(tmp / "data", num_users=60)
    ids = write_ids(tmp / "ids.npz")
    options = TrainOptions(preset=CAUSAL, **{**OPTIONS, "max_epochs": 2}, ema=0.8, **PINNED)
    train_run(data, ids, tmp / "ref", options)
    _interrupt_and_resume(data, ids, tmp / "cut", options, "kill", 5)
    return {"ref": tmp / "ref", "cut": tmp / "cut", "data": data, "ids": ids, "options": options}


def test_a_run_serves_the_average_its_validation_scored(runs: dict[str, Any]) -> None:
    ref = runs["ref"]
    best, last = (safe_load(ref / "checkpoints" / f) for f in ("best.ckpt", "last.ckpt"))
    for ckpt in (best, last):  # the served weights are the average; the trained ones ride along for a resume
        assert ckpt["state_dict"].keys() >= {k for k in ckpt["current_model_state"] if "weight" in k}
        moved = [k for k, v in ckpt["current_model_state"].items() if v.is_floating_point() and not torch.equal(v, ckpt["state_dict"][k])]
        assert moved, "the average equals the trained weights"
        assert int(ckpt["averaging_state"]["n_averaged"]) > 0
    # the score that chose best.ckpt is the score of the weights it holds: the final evaluation on the same (all)
    # validation users reads best.ckpt's state_dict and must find it again
    config = yaml.safe_load((ref / "config.yaml").read_text())
    metrics = json.loads((ref / "metrics_valid.json").read_text())
    assert metrics["ndcg@10"] == pytest.approx(config["best_score"][config["monitor"]], abs=1e-6)


def test_a_run_with_an_average_resumes_to_the_same_weights(runs: dict[str, Any]) -> None:
    from tests.test_resume import _outcome, _same

    assert _same(_outcome(runs["cut"]), _outcome(runs["ref"]))
    for name in ("best.ckpt", "last.ckpt"):
        a, b = (safe_load(runs[r] / "checkpoints" / name) for r in ("cut", "ref"))
        for key in ("current_model_state", "averaging_state"):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_a_run_from_before_the_option_resumes_only_without_an_average(runs: dict[str, Any], tmp_path: Any) -> None:
    """A config.yaml without ``ema`` was trained without one: the default's 0.999 must not switch it on mid-run."""
    from generator.runs.folder import read_config, write_config
    from generator.runs.train import train_run

    old = tmp_path / "old"
    shutil.copytree(runs["ref"], old)
    config = read_config(old)
    del config["train"]["ema"]
    write_config(old, config)
    with pytest.raises(ValueError, match=r"must keep .*changed ema: 0.0 -> 0.8"):
        train_run(runs["data"], runs["ids"], old, runs["options"], resume=True)
    more = replace(runs["options"], max_epochs=3)
    with pytest.raises(ValueError, match=r"changed ema: 0.8 -> 0.0"):  # and a run with one keeps it
        train_run(runs["data"], runs["ids"], runs["ref"], replace(more, ema=0.0), resume=True)


def test_the_command_line_resumes_a_default_run_from_before_the_option(runs: dict[str, Any], tmp_path: Any) -> None:
    """``semid train --resume`` rebuilds the options from config.yaml: a default-preset run without ``ema`` there
    trained without an average and must resume without one (not be refused for today's default 0.999)."""
    from generator.runs.folder import read_config, write_config
    from generator.runs.train import train_run
    from semid_cli import main

    run = tmp_path / "run"
    options = replace(runs["options"], preset="causal", ema=0.0, max_epochs=1, model_options=None)
    train_run(runs["data"], runs["ids"], run, options)
    config = read_config(run)
    del config["train"]["ema"]
    write_config(run, config)
    argv = ["train", "--data", str(runs["data"]), "--ids", str(runs["ids"]), "--out", str(run), "--resume",
            "--max-epochs", "2", "--final-val-users", "0"]
    assert main(argv) == 0
    assert read_config(run)["train"]["ema"] == 0.0 and safe_load(run / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert "current_model_state" not in safe_load(run / "checkpoints" / "last.ckpt")  # no average switched on


def test_the_average_updates_as_torchs_and_reads_nothing_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback's average equals torch's ``AveragedModel`` with :func:`ema_update` update by update, and after the
    first update (which reads the stored count once) an update turns no tensor into a Python value: on a GPU each
    such read is a synchronisation per step (torch's own update makes three)."""
    from torch.optim.swa_utils import AveragedModel

    from generator.training.callbacks import HostCountedEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    ours = HostCountedEMA(model, "cpu", 0.9)
    ref = AveragedModel(model, device="cpu", use_buffers=False, multi_avg_fn=ema_update(0.9))
    reads: list[str] = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name):  # noqa: ANN001, ANN002, ANN202
            reads.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        before = len(reads)
        ours.update_parameters(model)
        assert step == 0 or len(reads) == before, reads[before:]  # only the first update reads the count
        ref.update_parameters(model)
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.undo()
    assert int(ours.n_averaged) == int(ref.n_averaged) == 6
    ours.load_state_dict(ref.state_dict())  # a resume: the count is read again from what was loaded
    ours.update_parameters(model)
    assert int(ours.n_averaged) == 7 and ours._count == 7
