"""Resume is exact (issue 11): a training stopped at any point (a kill, SIGINT, SIGTERM; mid-epoch, in a validation,
at the end) and resumed ends with the same weights and metrics as one that ran through; signals exit non-zero; a
resume never damages the finished run it starts from; a run folder has one writer at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from generator.models.checkpoint import safe_load
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.recommend import recommend
from generator.runs.train import train_run
from generator.training.resume import ResumableLoader, TrainingInterrupted, step_seed
from semid.io import folder_lock
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset

ROOT = Path(__file__).parents[1]
# 3 epochs of 7 steps, validation after steps 3 and 6 of each epoch (global steps 3, 6, 10, 13, 17, 20), a resume
# point every 4 steps and after each validation, dropout on (the default): every piece of state matters
OPTIONS = {"max_epochs": 3, "batch_size": 8, "val_users": None, "val_every": 0.5, "num_beams": 10, "progress": False,
           "resume_every_steps": 4, "patience": 2}
# the causal model of the fault points below (21 steps, early stopping not reached): the width-64 preset without the
# ID input, as the default was when they were chosen (the default changed what validation sees, not how a run
# resumes; the default's sampled head resumes exactly in tests/test_lazy_adamw.py)
PINNED = {"model_options": {"id_input": False, "dropout": 0.2}}
CAUSAL = "causal-64"


class Kill(BaseException):
    """Stands for ``kill -9``: nothing of the training runs after it (no resume point, no cleanup of its own)."""


class Fault(L.Callback):
    """At optimiser step ``step``: "kill" dies at the end of the step, "term" / "int" signal the process,
    "kill-in-validation" dies in the middle of the validation that follows the step; "kill-at-end" dies when the
    training loop has ended (before last.ckpt, config.yaml and the final evaluation are written)."""

    def __init__(self, how: str, step: int) -> None:
        self.how, self.step = how, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.how == "kill":
                raise Kill
            if self.how in ("term", "int"):
                signal.raise_signal(signal.SIGTERM if self.how == "term" else signal.SIGINT)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.how == "kill-in-validation" and trainer.global_step == self.step:
            raise Kill

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.how == "kill-at-end":
            raise Kill


def _outcome(run: Path) -> dict[str, Any]:
    """What a finished run serves with and reports (times left out)."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = json.loads((run / "metrics_valid.json").read_text())
    return {
        "best": safe_load(run / "checkpoints" / "best.ckpt")["state_dict"],
        "last": safe_load(run / "checkpoints" / "last.ckpt")["state_dict"],
        "score": config["best_score"], "steps": config["steps"], "epochs": config["epochs"],
        # (the checkpoint's digest: its bytes hold the run folder's path and times; its weights are compared above)
        "metrics": {k: v for k, v in metrics.items() if k not in ("seconds", "users_per_s", "checkpoint_sha256")},
    }


def _validations(run: Path) -> dict[int, float]:
    """step -> the monitored validation score, from every CSV log of the run (a resumed run's later log wins): the
    validations the run went through, interrupted or not."""
    import csv

    monitor = yaml.safe_load((run / "config.yaml").read_text())["monitor"]
    out: dict[int, float] = {}
    for log in sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(log, newline="") as f:
            out.update({int(r["step"]): float(r[monitor]) for r in csv.DictReader(f) if r.get(monitor)})
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    weights = all(a[w].keys() == b[w].keys() and all(torch.equal(a[w][k], b[w][k]) for k in a[w]) for w in ("best", "last"))
    return weights and all(a[k] == b[k] for k in ("score", "steps", "epochs", "metrics"))


def _interrupt_and_resume(data: Path, ids: Path, run: Path, options: TrainOptions, how: str, step: int) -> None:
    with pytest.raises((Kill, TrainingInterrupted)) as stopped:
        train_run(data, ids, run, options, callbacks=[Fault(how, step)])
    if how in ("term", "int"):
        assert stopped.value.exit_code == 128 + (signal.SIGTERM if how == "term" else signal.SIGINT)
        assert "--resume" in str(stopped.value)
    train_run(data, ids, run, options, resume=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume")
    data = write_random_dataset(root / "data", num_users=60)
    ids = write_ids(root / "ids.npz")
    out = {"root": root, "data": data, "ids": ids}
    for design, extra in (("causal", PINNED), ("cpu", {"user_tokens": 0})):
        options = TrainOptions(preset=CAUSAL if design == "causal" else design, **OPTIONS, **extra)
        ref = train_run(data, ids, root / f"ref_{design}", options)
        out[design] = {"options": options, "outcome": _outcome(root / f"ref_{design}"), "steps": ref.steps,
                       "validations": _validations(root / f"ref_{design}")}
    assert out["causal"]["steps"] == 21  # 7 steps per epoch: the fault points below are where they claim to be
    return out


@pytest.mark.parametrize(
    ("how", "step"),
    [
        ("kill", 5),  # mid-epoch, between resume points (resumes from step 3 and trains 4 and 5 again)
        ("term", 7),  # the last step of an epoch
        ("int", 10),  # a step after which a validation runs
        ("kill-in-validation", 13),  # in a validation
        ("kill", 19),  # the last epoch
        ("term", 21),  # the last step
    ],
)
def test_an_interrupted_causal_run_resumes_to_the_same_weights_and_metrics(setup: dict[str, Any], how: str, step: int) -> None:
    run = setup["root"] / f"causal_{how}_{step}"
    _interrupt_and_resume(setup["data"], setup["ids"], run, setup["causal"]["options"], how, step)
    assert _same(_outcome(run), setup["causal"]["outcome"])
    assert _validations(run) == setup["causal"]["validations"]  # every validation ran, none twice with other scores
    assert not (run / "checkpoints" / "resume.ckpt").exists()  # last.ckpt is the newer point at the end


@pytest.mark.parametrize(("how", "step"), [("kill", 13), ("term", 20)])
def test_an_interrupted_t5_run_resumes_to_the_same_weights_and_metrics(setup: dict[str, Any], how: str, step: int) -> None:
    run = setup["root"] / f"t5_{how}_{step}"
    _interrupt_and_resume(setup["data"], setup["ids"], run, setup["cpu"]["options"], how, step)
    assert _same(_outcome(run), setup["cpu"]["outcome"])
    assert _validations(run) == setup["cpu"]["validations"]


def test_a_kill_before_the_first_resume_point_leaves_a_folder_trained_again_from_scratch(setup: dict[str, Any]) -> None:
    run = setup["root"] / "causal_kill_1"
    with pytest.raises(Kill):
        train_run(setup["data"], setup["ids"], run, setup["causal"]["options"], callbacks=[Fault("kill", 1)])
    with pytest.raises(FileNotFoundError, match="train again without `resume`"):
        train_run(setup["data"], setup["ids"], run, setup["causal"]["options"], resume=True)
    train_run(setup["data"], setup["ids"], run, setup["causal"]["options"])
    assert _same(_outcome(run), setup["causal"]["outcome"])


def test_a_killed_resume_leaves_the_finished_run_servable(setup: dict[str, Any]) -> None:
    import shutil

    run = setup["root"] / "finished"
    shutil.copytree(setup["root"] / "ref_causal", run)
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "metrics_valid.json")}
    longer = TrainOptions(preset=CAUSAL, **PINNED, **{**OPTIONS, "max_epochs": 6})
    with pytest.raises(Kill):  # killed well into the resumed training, after new validations
        train_run(setup["data"], setup["ids"], run, longer, resume=True, callbacks=[Fault("kill", 40)])
    assert {p: (run / p).read_bytes() for p in before} == before  # config.yaml and the metrics are untouched
    served = load_run(run)  # best.ckpt is the old one or a better one written whole
    assert len(recommend(served, [[1, 2, 3]], k=5)[0].items) == 5
    assert main(["evaluate", "--run", str(run), "--split", "valid", "--no-progress", "--max-users", "5"]) == 0


def test_a_resumed_run_that_had_early_stopped_stops_where_it_did(setup: dict[str, Any]) -> None:
    options = TrainOptions(preset=CAUSAL, **PINNED, **{**OPTIONS, "max_epochs": 30, "patience": 1})
    ref = train_run(setup["data"], setup["ids"], setup["root"] / "early_ref", options)
    assert ref.steps < 30 * 7  # it did stop early
    run = setup["root"] / "early"  # killed after early stopping decided: the resumed run must not train on
    _interrupt_and_resume(setup["data"], setup["ids"], run, options, "kill-at-end", 0)
    assert _same(_outcome(run), _outcome(setup["root"] / "early_ref"))


def test_the_loader_skips_the_batches_it_had_served_and_only_in_that_epoch() -> None:
    from generator.training.sampling import BucketBatchSampler

    sampler = BucketBatchSampler(torch.arange(40).numpy() % 7 + 1, 4, seed=3, bucket_batches=2)
    loader = ResumableLoader(list(range(40)), batch_sampler=sampler)
    sampler.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    assert loader.state_dict() == {"epoch": 2, "served": 10}
    loader.load_state_dict({"epoch": 2, "served": 6})
    assert [b.tolist() for b in loader] == full[6:] and loader.state_dict()["served"] == 10
    loader.load_state_dict({"epoch": 1, "served": 6})  # a state of another epoch skips nothing
    assert [b.tolist() for b in loader] == full
    with pytest.raises(ValueError, match="`served` >= 0"):
        loader.load_state_dict({"epoch": 2, "served": -1})
    assert len({step_seed(0, s) for s in range(1000)} | {step_seed(1, s) for s in range(1000)}) == 2000


def test_a_second_training_into_the_same_folder_is_refused_while_one_runs(setup: dict[str, Any], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["train", "--data", str(setup["data"]), "--ids", str(setup["ids"]), "--out", str(run), "--max-steps", "2",
            "--final-val-users", "0", "--no-progress", "--num-beams", "10"]
    with folder_lock(run, "train.lock", what="a training"):  # stands for a training running in another process
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{run}: a training (pid {os.getpid()}) is writing this folder now" in err
    assert not (run / "config.yaml").exists()
    # a lock left by a process that was killed (its pid written, no flock held) is stale and taken over
    (run / "train.lock").write_text("999999999\n")
    assert main(argv) == 0
    assert not (run / "train.lock").exists()  # released on exit


def _cli_train(data: Path, ids: Path, run: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "semid_cli", "train", "--data", str(data), "--ids", str(ids), "--out", str(run),
            "--preset", "causal", "--max-epochs", "400", "--batch-size", "8", "--num-beams", "10", "--val-users", "5",
            "--final-val-users", "5", "--no-progress", "--resume-every-steps", "1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])  # SIGINT: in-process above
def test_a_signalled_cli_training_exits_non_zero_and_resumes(setup: dict[str, Any], tmp_path: Path, sig: int) -> None:
    run = tmp_path / "run"
    proc = _cli_train(setup["data"], setup["ids"], run)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "resume.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig), err
    if sig != signal.SIGKILL:
        assert f"training stopped by {signal.Signals(sig).name}" in err and "--resume" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["best_checkpoint"] is None  # not finished, and says so
    assert not (run / "train.lock").exists() or sig == signal.SIGKILL
    # resumable (a lock left by the kill is stale): continue to a short end
    assert main(["train", "--data", str(setup["data"]), "--ids", str(setup["ids"]), "--out", str(run), "--resume",
                 "--max-epochs", "1", "--no-progress"]) == 0
    assert load_run(run).checkpoint.name in ("best.ckpt", "last.ckpt")


def test_a_resume_point_from_before_the_shared_dense_head_is_refused_by_name(tmp_path: Path) -> None:
    from generator.runs.train import resume_point

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    torch.save({"global_step": 7, "state_dict": {"model.item_table": torch.zeros(3, 2)}}, ckpt_dir / "resume.ckpt")
    with pytest.raises(ValueError, match=r"resume\.ckpt: a resume point written by an earlier semid .* cannot be resumed"):
        resume_point(ckpt_dir)
    torch.save({"global_step": 7, "state_dict": {"model.dense_head.item_table": torch.zeros(3, 2)}}, ckpt_dir / "resume.ckpt")
    assert resume_point(ckpt_dir) == ckpt_dir / "resume.ckpt"  # this version's names resume


def test_a_resume_that_would_build_another_model_than_the_runs_is_refused(tmp_path: Path) -> None:
    # a run trained when the preset `causal` was width 64 records `preset: causal`; today's `causal` is width 128:
    # resuming it must say so, not load other weights (or the same shapes with another loss)
    from generator.runs.train import train_run

    data = write_random_dataset(tmp_path / "data", num_users=30)
    ids = write_ids(tmp_path / "ids.npz")
    train_run(data, ids, tmp_path / "run", TrainOptions(preset="causal-64", **{**OPTIONS, "max_epochs": 1}))
    path = tmp_path / "run" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["train"]["preset"] = "causal"  # what such a run's config.yaml says
    del config["sha256"]  # a hand edit, accepted
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"trained as another model than preset 'causal' .*d_model: 64 -> 128.*causal-64"):
        # (ema 0, as the run had: the preset's default average would be refused first, as a changed fixed option)
        train_run(data, ids, tmp_path / "run", TrainOptions(preset="causal", ema=0.0, **{**OPTIONS, "max_epochs": 2}), resume=True)


def test_a_resume_keeps_the_defaults_members_whatever_its_budget(tmp_path: Path) -> None:
    """The default's members follow the time budget of a new run; a resume keeps the count the run was trained with
    (its model is fixed), whatever budget it is resumed to: a 15-minute budget would give a new run 2."""
    data = write_random_dataset(tmp_path / "data", num_users=30)
    ids = write_ids(tmp_path / "ids.npz")
    train_run(data, ids, tmp_path / "run", TrainOptions(max_cpu_time="00:08:00", **{**OPTIONS, "max_epochs": 1}))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["members"] == 1
    train_run(data, ids, tmp_path / "run", TrainOptions(max_cpu_time="00:15:00", **{**OPTIONS, "max_epochs": 2}), resume=True)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"]["members"] == 1 and config["train"]["max_cpu_time"] == "00:15:00"
    assert load_run(tmp_path / "run").model.config.members == 1  # one model, not an ensemble of two


@pytest.mark.parametrize("budget, given, expected", [(None, None, 5), ({"max_cpu_time": "00:08:00"}, None, 0),
                                                     ({"max_time": "00:08:00"}, None, 0), ({"max_time": "00:08:00"}, 3, 3),
                                                     (None, 0, 0)])
def test_early_stopping_is_off_under_a_time_budget_unless_asked(budget: dict | None, given: int | None, expected: int) -> None:
    """A time budget is spent whole (its best checkpoint on validation is kept either way); without one, training stops
    after 5 validations without improvement; ``--patience`` says otherwise."""
    from generator.runs.options import effective_patience

    assert effective_patience(TrainOptions(**(budget or {}), patience=given)) == expected


def test_a_budgeted_run_trains_past_validations_that_do_not_improve(tmp_path: Path) -> None:
    """Under a time budget no EarlyStopping stops the run: 3 epochs of a learning rate that cannot improve validation
    are all trained (with patience 1 the run stops after the second validation)."""
    data = write_random_dataset(tmp_path / "data", num_users=30)
    ids = write_ids(tmp_path / "ids.npz")
    flat = {**OPTIONS, "lr": 1e-12, "max_epochs": 3, "patience": None, "val_every": 1.0}
    budgeted = train_run(data, ids, tmp_path / "a", TrainOptions(max_time="01:00:00", **flat))
    stopped = train_run(data, ids, tmp_path / "b", TrainOptions(**{**flat, "patience": 1}))
    assert budgeted.epochs == 3 and stopped.epochs < 3


def test_a_resume_refuses_what_it_would_not_continue_exactly(setup: dict[str, Any], tmp_path: Path) -> None:
    """Each was accepted (a helper's audit): another run's last.ckpt (continued, or crashed mid-epoch), other data
    (trained on, and its validation scores compared with the old data's), another --lr or --weight-decay (recorded
    in config.yaml, while the optimiser restored the old ones), a checkpoints folder that links elsewhere (best.ckpt
    and last.ckpt written outside the run, refused only at the end)."""
    import shutil

    import torch

    from generator.models.checkpoint import with_integrity

    def fresh(name: str) -> Path:
        return Path(shutil.copytree(setup["root"] / "ref_causal", tmp_path / name))

    options = setup["causal"]["options"]
    longer = TrainOptions(**{**options.__dict__, "max_epochs": 4})
    run = fresh("other_ckpt")
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)  # our own file
    ckpt["semid"]["ids_digest"] = "0" * 64  # (another run's, of the same shapes)
    torch.save(with_integrity(ckpt), last)
    with pytest.raises(ValueError, match=r"last.ckpt: trained with other semantic IDs than this run's"):
        train_run(setup["data"], setup["ids"], run, longer, resume=True)
    run, other = fresh("other_data"), Path(shutil.copytree(setup["data"], tmp_path / "data2"))
    (other / "sequences.txt").write_text("\n".join((other / "sequences.txt").read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"data2: not the data the run .* was trained on"):
        train_run(other, setup["ids"], run, longer, resume=True)
    for name, value in (("lr", 0.05), ("weight_decay", 0.5)):
        with pytest.raises(ValueError, match=rf"a resumed run must keep .*; changed {name}: "):
            train_run(setup["data"], setup["ids"], run, TrainOptions(**{**longer.__dict__, name: value}), resume=True)
    swapped = fresh("swapped_ids")  # the run's own copy of its IDs replaced: it trained, refused at the final evaluation
    write_ids(swapped / "semantic_ids.npz", seed=1)
    with pytest.raises(ValueError, match=r"semantic_ids.npz: not the semantic IDs this run was trained with"):
        train_run(setup["data"], setup["ids"], swapped, longer, resume=True)
    outside = tmp_path / "outside"
    (run / "checkpoints").rename(outside)
    (run / "checkpoints").symlink_to(outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with pytest.raises(ValueError, match=r"checkpoints: a symbolic link .* a resume would write through it"):
        train_run(setup["data"], setup["ids"], run, longer, resume=True)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_checkpoints_are_written_in_the_run_folder_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's save wrote each checkpoint to $TMPDIR first, then moved it (a kill -9 left a copy there; a full
    /tmp failed a run whose own disk had room): checkpoints go straight to a temporary file beside them."""
    import lightning.fabric.utilities.cloud_io as cloud_io
    import torch

    from generator.models.checkpoint import safe_load
    from generator.training.callbacks import AtomicCheckpointIO

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("written through Lightning's _atomic_save ($TMPDIR)")

    monkeypatch.setattr(cloud_io, "_atomic_save", refused)
    monkeypatch.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", refused)  # (where TorchCheckpointIO reads it)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "c" / "x.ckpt")
    assert safe_load(tmp_path / "c" / "x.ckpt")["epoch"] == 1 and sorted(p.name for p in (tmp_path / "c").iterdir()) == ["x.ckpt"]


def test_metrics_never_describe_a_checkpoint_since_replaced(setup: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Metrics record their checkpoint's digest. A resume removes those whose checkpoint was replaced since (a resume
    killed after it wrote a new best.ckpt left the old metrics_test.json for good: the next resume compared best.ckpt
    with itself); an evaluation during which best.ckpt is replaced writes nothing."""
    import json
    import os
    import shutil

    import generator.runs.evaluate as ev
    from generator.runs.evaluate import evaluate_run

    run = Path(shutil.copytree(setup["root"] / "ref_causal", tmp_path / "run"))
    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    m = evaluate_run(run, "test", max_users=5)
    assert json.loads((run / "metrics_test_sample5.json").read_text())["checkpoint_sha256"] == m["checkpoint_sha256"]
    real = ev.evaluate

    def replacing(*args: object, **kwargs: object) -> object:  # a training renames a new best.ckpt in meanwhile
        out = real(*args, **kwargs)
        shutil.copy(last, run / "new.ckpt")
        os.replace(run / "new.ckpt", best)
        return out

    monkeypatch.setattr(ev, "evaluate", replacing)
    before = (run / "metrics_test_sample5.json").read_bytes()
    with pytest.raises(ValueError, match=r"best.ckpt: replaced while it was evaluated .* left as it was"):
        evaluate_run(run, "test", max_users=5)
    assert (run / "metrics_test_sample5.json").read_bytes() == before
    monkeypatch.setattr(ev, "evaluate", real)
    # best.ckpt is now another file than the one metrics_test_sample5.json describes (as after a killed resume)
    options = setup["causal"]["options"]
    replaced = (run / "checkpoints" / "best.ckpt").read_bytes()
    train_run(setup["data"], setup["ids"], run, options, resume=True)  # (done already: nothing trained, best kept)
    assert (run / "checkpoints" / "best.ckpt").read_bytes() == replaced
    assert not (run / "metrics_test_sample5.json").exists()


def test_a_resume_keeps_metrics_that_still_describe_their_checkpoint_and_applies_a_new_patience(
        setup: dict[str, Any], tmp_path: Path) -> None:
    """A resume removed every metrics file once the best checkpoint changed, those of another, unchanged checkpoint
    too (each records its checkpoint's digest); and ``--patience`` given on a resume was recorded in config.yaml while
    Lightning restored the old one from the checkpoint (a helper's audit)."""
    import json
    import shutil

    import yaml

    from generator.runs.evaluate import evaluate_run

    run = Path(shutil.copytree(setup["root"] / "ref_causal", tmp_path / "run"))
    keep = tmp_path / "keep" / "epoch3.ckpt"
    keep.parent.mkdir()
    shutil.copy(run / "checkpoints" / "best.ckpt", keep)
    kept = evaluate_run(run, "test", max_users=5, checkpoint=keep)
    evaluate_run(run, "test", max_users=5)  # of best.ckpt
    before = (run / "checkpoints" / "best.ckpt").read_bytes()
    longer = TrainOptions(**{**setup["causal"]["options"].__dict__, "max_epochs": 10, "patience": 1000})
    result = train_run(setup["data"], setup["ids"], run, longer, resume=True)
    assert (run / "checkpoints" / "best.ckpt").read_bytes() != before  # the best changed
    assert not (run / "metrics_test_sample5.json").exists()  # best.ckpt's old figures: removed
    assert Path(kept["file"]).exists() and json.loads(Path(kept["file"]).read_text())["checkpoint_sha256"] == kept["checkpoint_sha256"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["patience"] == 1000
    assert result.steps == 10 * 7  # patience 1000 kept it training to its last epoch (patience 2 stopped it before)


def test_kept_patience_keeps_early_stoppings_state_key() -> None:
    """Lightning files a callback's state under a key made of its class name: KeptPatience's own would have left the
    early-stopping state of every checkpoint written before it unread (its counter and best score reset on resume)."""
    from lightning.pytorch.callbacks import EarlyStopping

    from generator.training.callbacks import KeptPatience

    kept = KeptPatience(monitor="val/beam/ndcg@10", mode="max", patience=3)
    assert kept.state_key == EarlyStopping(monitor="val/beam/ndcg@10", mode="max").state_key
