"""`semid distill`: the code heads learn from the run's dense softmax (generator.training.distill), and the result is a
new, servable run folder while the source stays as it was (generator.runs.distill)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.decoding.causal import CausalDecoders, exact_scores
from generator.runs.evaluate import evaluate_run
from generator.runs.folder import load_run
from generator.training import distill
from generator.training.causal_data import collate_windows
from generator.training.datamodules import CausalDataModule
from generator.training.distill import DistillOptions, distill_code_heads, head_parameters, teacher_softmax
from semid.data import load_dataset
from semid.split import leave_one_out
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    data = write_random_dataset(root / "data", num_users=60)
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    out = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(out), "--max-steps", "40",
                 "--batch-size", "8", "--val-users", "20", "--no-progress", "--model-option", "d_model=16",
                 "--model-option", "num_heads=2", "--model-option", "d_ff=32", "--model-option", "members=2"]) == 0
    return out


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def kl_to_teacher(model, tree, split, ids, options: DistillOptions) -> float:  # noqa: ANN001
    """Mean KL(teacher || tree) over the training positions of a few batches: how far the trees are from the teacher."""
    dm = CausalDataModule(split, ids, max_history=model.config.max_history, batch_size=16, val_users=1)
    dm.setup()
    dec = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids)).refresh()
    total, n = 0.0, 0
    with torch.inference_mode():
        for index in list(dm.train_sampler().batches())[:4]:
            b = collate_windows(dm.windows, index)
            real = torch.nonzero(b.targets.flatten() >= 0).squeeze(1)
            h = model.hidden(b.histories).flatten(0, 1)[real]
            teacher = teacher_softmax(model, h, options.temperature)
            tree = exact_scores(model, h, dec.paths, dec.tables)
            total += float((teacher * (teacher.clamp_min(1e-30).log() - tree)).sum())
            n += h.shape[0]
    return total / n


def test_the_trees_move_toward_the_teacher_and_nothing_else_changes(run: Path) -> None:
    r = load_run(run)
    split = leave_one_out(load_dataset(r.data_dir))
    options = DistillOptions(epochs=8, weight=1.0, temperature=2.0, lr=1e-2, val_users=20)
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    kl_before = kl_to_teacher(r.model, r.tree, split, r.ids, options)
    best, history = distill_code_heads(r.model, r.tree, r.ids, split, options)
    kl_after = kl_to_teacher(r.model, r.tree, split, r.ids, options)
    assert kl_after < 0.9 * kl_before  # the trees learned the teacher's distribution
    assert [row["epoch"] for row in history] == list(range(9)) and history[0]["loss"] is None
    head = {id(p) for p in head_parameters(r.model)}
    names = {n for n, p in r.model.named_parameters() if id(p) in head}
    assert names and all(".code_emb." not in n and ".backbone." not in n and "dense" not in n for n in names)
    after = r.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= names  # only code-head weights moved: backbone, inputs and dense head as trained
    kept = max(history, key=lambda row: row["ndcg@10"])["epoch"]
    assert all(torch.equal(best[k], before[k]) for k in before) == (kept == 0)  # the state returned is the kept epoch's


def test_semid_distill_writes_a_new_servable_run_and_leaves_the_source_as_it_was(run: Path, tmp_path: Path,
                                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    source = digests(run)
    out = tmp_path / "distilled"
    assert main(["distill", "--run", str(run), "--out", str(out), "--epochs", "1", "--val-users", "20", "--lr", "5e-3"]) == 0
    assert digests(run) == source
    record = json.loads((out / "distill.json").read_text())
    assert record["epoch_kept"] in (0, 1) and len(record["history"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "distill.json", "hybrid.json", "semantic_ids.npz"]
    for decoder in ("beam", "exact", "dense", "hybrid"):  # hybrid straight away: the fusion was chosen on validation
        m = evaluate_run(out, "test", decoder=decoder, max_users=30)
        assert m["invalid_items"] == 0 and m["users_evaluated"] == 30
    config = load_run(run).config
    assert main(["train", "--resume", "--data", config["data"], "--ids", str(out), "--out", str(out), "--max-steps", "50",
                 "--batch-size", "8", "--val-users", "20", "--no-progress", "--model-option", "d_model=16",
                 "--model-option", "num_heads=2", "--model-option", "d_ff=32", "--model-option", "members=2"]) == 2
    assert "a distilled run (distill.json), which serves but does not train: resume its source" in capsys.readouterr().err
    d = load_run(out)
    src = load_run(run)
    dense = [k for k in src.model.state_dict() if "dense" in k or ".backbone." in k]
    assert dense and all(torch.equal(src.model.state_dict()[k], d.model.state_dict()[k]) for k in dense)


def test_an_epoch_that_beats_none_keeps_the_run_as_it_was(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scores = iter([0.5, 0.1])  # epoch 0 (the run as trained), then epoch 1: worse on validation
    real = distill.validation_ndcg
    monkeypatch.setattr(distill, "validation_ndcg", lambda *a: {**real(*a), "ndcg@10": next(scores)})
    out = tmp_path / "kept"
    assert main(["distill", "--run", str(run), "--out", str(out), "--epochs", "1", "--val-users", "20"]) == 0
    assert json.loads((out / "distill.json").read_text())["epoch_kept"] == 0
    a, b = load_run(run).model.state_dict(), load_run(out).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("argv", "message"), [
    (["--weight", "0"], "`--weight`"),  # named as the flags (they were named as DistillOptions' fields)
    (["--temperature", "0"], "`--temperature` must be > 0"),
    (["--epochs", "0"], "`--epochs` must be a positive int"),
])
def test_bad_options_are_refused_before_any_work(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 argv: list[str], message: str) -> None:
    assert main(["distill", "--run", str(run), "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_an_occupied_out_folder_and_the_source_itself_are_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["distill", "--run", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["distill", "--run", str(run), "--out", str(run / "inside")]) == 2
    assert "is inside the source run" in capsys.readouterr().err
    assert not (run / "inside").exists()


def test_a_failure_half_way_leaves_no_out_folder_and_no_temporary_one(run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import generator.runs.derive as derive
    import generator.runs.distill as runs_distill

    def fail(*a: object, **k: object) -> None:
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(derive, "choose_run_fusion", fail)  # after the checkpoint and config are written
    with pytest.raises(RuntimeError, match="the disk filled up"):
        runs_distill.distill_run(run, tmp_path / "half", DistillOptions(epochs=1, val_users=20))
    assert list(tmp_path.iterdir()) == []


def test_a_teacher_too_large_for_memory_is_refused_with_what_to_do(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = load_run(run)
    monkeypatch.setattr(distill, "MAX_TEACHER_BYTES", 1000)
    with pytest.raises(ValueError, match="pass a smaller batch size"):
        distill_code_heads(r.model, r.tree, r.ids, leave_one_out(load_dataset(r.data_dir)), DistillOptions(batch_size=4))


def test_runs_without_a_dense_head_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_random_dataset(tmp_path / "data")
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "8", "--val-users", "5", "--no-progress", "--dense", "none", "--model-option", "d_model=16",
                 "--model-option", "num_heads=2", "--model-option", "d_ff=32", "--model-option", "id_input=False"]) == 0
    assert main(["distill", "--run", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "needs a causal model with a dense head" in capsys.readouterr().err
    np.testing.assert_equal((tmp_path / "x").exists(), False)
