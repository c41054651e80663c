"""Run folders that cannot be hijacked, corrupted or silently lost (issue 11): `semid train` and `semid evaluate`
refuse what would break a run, and a failed first run does not block its folder. Nothing here trains a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from generator.run import read_config, write_config
from semid.cli import main
from semid.ids import SemanticIDs
from tests.conftest import write_canonical
from tests.test_generator_helpers import NUM_ITEMS, random_ids, write_ids, write_random_dataset

FLAGS = ["--max-epochs", "1", "--final-val-users", "0", "--no-progress"]


def _train(data: Path, ids: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--ids", str(ids), "--out", str(out), *FLAGS, *extra])


@pytest.fixture
def no_examples(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset whose users all have 3 items (a 1-item training prefix: no training examples) and IDs for it."""
    items = [(f"item {i}", []) for i in range(1, 9)]
    data = write_canonical(tmp_path / "data", items, {u: [u, u % 8 + 1, (u + 1) % 8 + 1] for u in range(1, 7)})
    return data, write_ids(tmp_path / "ids.npz", num_items=8)


def test_a_first_run_that_failed_in_setup_can_be_run_again(
    no_examples: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, ids = no_examples
    run = tmp_path / "run"
    assert _train(data, ids, run) == 2
    assert "no training examples" in capsys.readouterr().err
    assert read_config(run)["best_checkpoint"] is None  # config.yaml was written before the failure
    # --resume has nothing to continue, and says what to do instead
    assert _train(data, ids, run, "--resume") == 2
    err = capsys.readouterr().err
    assert "nothing to resume from" in err and "train again without `resume`" in err
    # a second try reuses the folder (it fails for the same reason, not because the folder "holds a run") and
    # replaces the IDs copy with the IDs given now
    other = random_ids(num_items=8, seed=1)
    other.save(tmp_path / "other.npz")
    assert _train(data, tmp_path / "other.npz", run) == 2
    err = capsys.readouterr().err
    assert "no training examples" in err and "already holds a run" not in err
    assert SemanticIDs.load(run / "semantic_ids.npz") == other


@pytest.mark.parametrize(
    "state",
    ["last checkpoint", "empty checkpoint file", "best checkpoint named", "snapshot only", "unreadable config"],
)
def test_a_folder_with_checkpoints_or_a_finished_run_is_still_refused(
    no_examples: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    data, ids = no_examples
    run = tmp_path / "run"
    assert _train(data, ids, run) == 2  # an unfinished first run ...
    capsys.readouterr()
    ckpt = run / "checkpoints"
    ckpt.mkdir()
    if state == "last checkpoint":  # ... that did write a checkpoint
        (ckpt / "last.ckpt").write_bytes(b"weights")
    elif state == "empty checkpoint file":
        (ckpt / "best.ckpt").write_bytes(b"")
    elif state == "best checkpoint named":  # ... or a finished run
        write_config(run, {**read_config(run), "best_checkpoint": "checkpoints/best.ckpt"})
    elif state == "snapshot only":
        (ckpt / "snapshots.json").write_text("{}")
    else:
        (run / "config.yaml").write_text("format: [semid.run\n")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert _train(data, ids, run) == 2
    assert f"{run}: already holds a run" in capsys.readouterr().err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("num_items", "first_id", "shown"),
    [
        (NUM_ITEMS + 5, 1, f"{NUM_ITEMS + 5} items (ids 1..{NUM_ITEMS + 5})"),  # more items than the dataset
        (NUM_ITEMS - 1, 1, f"{NUM_ITEMS - 1} items (ids 1..{NUM_ITEMS - 1})"),  # fewer
        (NUM_ITEMS, 2, f"{NUM_ITEMS} items (ids 2..{NUM_ITEMS + 1})"),  # as many, but not the same ids
    ],
)
def test_train_needs_ids_for_exactly_the_datasets_items(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], num_items: int, first_id: int, shown: str
) -> None:
    data = write_random_dataset(tmp_path / "data")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(num_items, 3))
    item_ids = np.arange(first_id, first_id + num_items)
    ids = SemanticIDs.from_codes(codes, (4, 4, 4), extra_level_size=8, item_ids=item_ids)
    ids.save(tmp_path / "ids.npz")
    assert _train(data, tmp_path / "ids.npz", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ids.npz'}: semantic IDs for {shown}, but the dataset {data} has {NUM_ITEMS} items" in err
    assert "fit codebooks on this dataset's embeddings" in err
    assert not (tmp_path / "run").exists()


def test_train_accepts_ids_for_exactly_the_datasets_items(
    no_examples: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, ids = no_examples  # the check passes: training gets as far as its data
    assert _train(data, ids, tmp_path / "run") == 2
    assert "no training examples" in capsys.readouterr().err
    write_ids(tmp_path / "nine.npz", num_items=9)
    assert _train(data, tmp_path / "nine.npz", tmp_path / "run2") == 2
    assert "semantic IDs for 9 items" in capsys.readouterr().err
