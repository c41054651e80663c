"""`semid combine` and `semid distill` refuse what they cannot make, naming the run and what to do: a run with items
added after training (`semid add-items`), one trained model counted twice, a run with no dense head, non-finite or
huge options, and a distillation that diverges (no output folder then)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from semid_cli import main
from tests.test_generator_helpers import write_random_dataset

SMALL = ["--max-steps", "12", "--batch-size", "8", "--val-users", "20", "--num-beams", "10", "--no-progress",
         "--model-option", "d_model=16", "--model-option", "num_heads=2", "--model-option", "d_ff=32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs a and b (seeds 0, 1) on 34 items, with a dense head over content and ids (`semid add-items` needs
    content); "grown": a copy of a with 6 items added from "new"; "nodense": a run without a dense head."""
    root = tmp_path_factory.mktemp("derive_defects")
    emb = np.random.default_rng(7).normal(size=(40, 16)).astype(np.float32)
    old = write_random_dataset(root / "old", num_items=34, num_users=40)
    np.save(old / "item_emb_minilm.npy", emb[:34])
    new = write_random_dataset(root / "new", num_items=40, num_users=40, seed=1)
    np.save(new / "item_emb_minilm.npy", emb)
    ids = root / "ids"
    assert main(["fit-codebooks", "--embeddings", str(old / "item_emb_minilm.npy"), "--out", str(ids), "--levels", "2",
                 "--codebook-size", "4", "--no-progress"]) == 0
    w = {"root": root}
    for name, extra in (("a", ["--seed", "0", "--dense", "both"]), ("b", ["--seed", "1", "--dense", "both"]),
                        ("nodense", ["--dense", "none", "--model-option", "id_input=False"])):
        w[name] = root / name
        assert main(["train", "--data", str(old), "--ids", str(ids), "--out", str(w[name]), *SMALL, *extra]) == 0
    w["grown"] = root / "grown"
    shutil.copytree(w["a"], w["grown"])
    assert main(["add-items", "--run", str(w["grown"]), "--data", str(new)]) == 0
    return w


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_run_with_added_items_is_refused_as_such_not_as_other_data(world: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["combine", "--run", str(world["b"]), "--run", str(world["grown"]), "--out", str(out), "--no-fusion"]) == 2
    err = capsys.readouterr().err
    assert f"{world['grown']}: has 6 items added after training; combine the runs first, then add the items" in err
    assert "not the data" not in err and "--data" not in err
    assert main(["distill", "--run", str(world["grown"]), "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{world['grown']}: has 6 items added after training; runs with added items cannot be distilled: distil " \
           "the run before adding items, then add them" in err
    assert "not the data" not in err and "--data" not in err
    assert _nothing_written(out)


def test_one_trained_model_is_not_combined_twice(world: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    copy, out = tmp_path / "acopy", tmp_path / "out"
    shutil.copytree(world["a"], copy)
    assert main(["combine", "--run", str(world["a"]), "--run", str(copy), "--out", str(out), "--no-fusion"]) == 2
    assert f"{world['a']} and {copy}: hold the same checkpoint" in capsys.readouterr().err
    ab = tmp_path / "ab"
    assert main(["combine", "--run", str(world["a"]), "--run", str(world["b"]), "--out", str(ab), "--no-fusion"]) == 0
    for runs in ([ab, world["a"]], [world["b"], ab], [ab, copy]):  # a member of the combined run, or a copy of one
        assert main(["combine", *(x for r in runs for x in ("--run", str(r))), "--out", str(out), "--no-fusion"]) == 2
        assert f"is already a member of the combined run {ab} (combine.json)" in capsys.readouterr().err
    abc, c = tmp_path / "abc", _other_model(world["b"], tmp_path / "c")  # a combined run of a combined run
    assert main(["combine", "--run", str(ab), "--run", str(c), "--out", str(abc), "--no-fusion"]) == 0
    assert main(["combine", "--run", str(abc), "--run", str(world["a"]), "--out", str(out), "--no-fusion"]) == 2
    assert f"is already a member of the combined run {abc}" in capsys.readouterr().err  # a, through ab
    assert _nothing_written(out)


def _other_model(run: Path, out: Path) -> Path:
    """A copy of ``run`` whose weights are moved: another trained model (another checkpoint digest)."""
    import torch

    from generator.models.checkpoint import with_integrity
    from generator.runs.folder import best_checkpoint

    shutil.copytree(run, out)
    path = best_checkpoint(out)
    ckpt = torch.load(path, weights_only=False)  # our own file, written by the training above
    ckpt["state_dict"] = {k: w + 0.01 if ".backbone." in k else w for k, w in ckpt["state_dict"].items()}
    torch.save(with_integrity(ckpt), path)
    return out


@pytest.mark.parametrize(("argv", "message"), [
    (["--lr", "1e300"], "`--lr` must be > 0, finite and at most 3.403e+38"),  # (named as the flags)
    (["--lr", "inf"], "got inf: give --lr"),
    (["--lr", "nan"], "got nan: give --lr"),
    (["--weight-decay", "inf"], "give --weight-decay"),
    (["--weight-decay", "1e39"], "give --weight-decay"),
    (["--temperature", "inf"], "give --temperature"),
    (["--lr", "10", "--weight-decay", "0.5"], "`--lr` x `--weight-decay` must be < 1"),
])
def test_non_finite_or_huge_distill_options_are_refused_naming_the_flag(world: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       argv: list[str], message: str) -> None:
    assert main(["distill", "--run", str(world["a"]), "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err and _nothing_written(tmp_path / "x")


def test_a_diverging_distillation_stops_at_the_epoch_and_writes_no_run(world: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x"
    assert main(["distill", "--run", str(world["a"]), "--out", str(out), "--epochs", "2", "--val-users", "20",
                 "--lr", "1e12", "--weight-decay", "0"]) == 2
    err = capsys.readouterr().err
    assert "distillation diverged at epoch 1: the code heads' " in err and "became NaN or infinite" in err
    assert "lower --lr (default 0.0005)" in err and _nothing_written(out)


def test_a_run_without_a_dense_head_is_named_with_what_to_do(world: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", "--run", str(world["nodense"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{world['nodense']}: has no dense head" in err and "the default `--dense id`" in err
    assert _nothing_written(tmp_path / "x")


def test_distill_options_take_numpys_floats_as_floats() -> None:
    import numpy as np

    from generator.training.distill_options import DistillOptions

    opts = DistillOptions(lr=np.float32(1e-3), weight_decay=np.float64(0.0), temperature=np.float32(2.0))
    assert type(opts.lr) is float and opts.lr == pytest.approx(1e-3) and type(opts.temperature) is float
