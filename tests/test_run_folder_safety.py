"""Run folders that cannot be hijacked, corrupted or silently lost (issue 11): `semid train` and `semid evaluate`
refuse what would break a run, a failed first run does not block its folder, a config.yaml is checked (checksum,
schema) and a codebooks folder is written as a set and checked against its manifest. Nothing here trains a model
(damaged checkpoints: tests/test_safe_load.py; resume: tests/test_resume.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from generator.runs.folder import best_checkpoint, read_config, write_config
from semid.ids import SemanticIDs
from semid_cli import main
from tests.conftest import write_canonical
from tests.test_generator_helpers import NUM_ITEMS, random_ids, write_ids, write_random_dataset

FLAGS = ["--max-epochs", "1", "--final-val-users", "0", "--no-progress", "--num-beams", "8"]  # (8 items)


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
    assert "nothing to resume from" in err and "train again without `--resume`" in err
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


# ---- config.yaml: checksum, version, schema ---------------------------------------------------------------------
def _config(**train: object) -> dict[str, object]:
    return {"data": "/data", "ids_digest": "abc", "design": "causal", "model": {"d_model": 64},
            "layout": {"codebook_sizes": [4, 4, 8], "num_user_tokens": 0},
            "train": {"preset": "causal", "max_history": 50, **train}, "monitor": "val/beam/ndcg@10",
            "best_checkpoint": "checkpoints/best.ckpt"}


def _edit(run: Path, old: str, new: str, *, keep_checksum: bool) -> None:
    text = (run / "config.yaml").read_text()
    assert old in text, text
    text = text.replace(old, new)
    if not keep_checksum:  # what a user accepting a hand edit does
        text = "\n".join(line for line in text.splitlines() if not line.startswith("sha256:")) + "\n"
    (run / "config.yaml").write_text(text)


def test_config_yaml_carries_its_version_and_checksum(tmp_path: Path) -> None:
    write_config(tmp_path, _config())
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["format"] == "semid.run" and raw["version"] == 1 and len(raw["sha256"]) == 64
    assert read_config(tmp_path)["train"]["max_history"] == 50


@pytest.mark.parametrize(
    ("old", "new", "keep_checksum", "message"),
    [
        ("max_history: 50", "max_history: 51", True, "config.yaml: checksum mismatch: the content differs from what semid wrote"),
        ("max_history: 50", "max_history: [50", True, "config.yaml:"),  # broken YAML: file and line
        ("max_history: 50", "max_history: banana", False, "key `train.max_history` must be a positive int, got 'banana'"),
        ("num_user_tokens: 0", "num_user_tokens: -3", False, "key `layout.num_user_tokens` must be a non-negative int, got -3"),
        ("train:", "trained:", False, "no `train` key"),
        ("design: causal", "design: [1, 2]", False, "key `design` must be a string"),
        ("version: 1", "version: 7", False, "run config version 7; this semid reads versions 0 and 1"),
    ],
)
def test_a_damaged_config_yaml_is_an_error_naming_the_file_and_key(
    tmp_path: Path, old: str, new: str, keep_checksum: bool, message: str
) -> None:
    write_config(tmp_path, _config())
    _edit(tmp_path, old, new, keep_checksum=keep_checksum)
    with pytest.raises(ValueError, match="^" + str(tmp_path / "config.yaml").replace(".", r"\.")) as e:
        read_config(tmp_path)
    assert message in str(e.value)
    if new.endswith("[50"):
        assert f"{tmp_path / 'config.yaml'}:" in str(e.value) and "not valid YAML" in str(e.value)


def test_a_config_yaml_with_a_python_tag_runs_no_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "code_ran"
    write_config(tmp_path, _config())
    _edit(tmp_path, "data: /data", f"data: !!python/object/apply:os.system ['touch {marker}']", keep_checksum=False)
    with pytest.raises(ValueError, match="not valid YAML"):
        read_config(tmp_path)
    assert main(["recommend", "--run", str(tmp_path), "--history", "1,2"]) == 2
    assert "not valid YAML" in capsys.readouterr().err and not marker.exists()


@pytest.mark.parametrize("rel", ["../outside.ckpt", "checkpoints/../../outside.ckpt", "/tmp/outside.ckpt"])
def test_a_best_checkpoint_outside_the_run_folder_is_refused(tmp_path: Path, rel: str) -> None:
    run = tmp_path / "run"
    (tmp_path / "outside.ckpt").write_bytes(b"x")
    write_config(run, {**_config(), "best_checkpoint": rel if not rel.startswith("/") else str(tmp_path / "outside.ckpt")})
    with pytest.raises(ValueError, match=r"key `best_checkpoint` is .*, which points outside the run folder"):
        best_checkpoint(run)


def test_a_config_written_before_checksums_still_reads(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"format": "semid.run", **_config()}, sort_keys=False))
    assert read_config(tmp_path)["design"] == "causal"


# ---- the codebooks folder: written as a set, checked against its manifest --------------------------------------
CODEBOOK_FLAGS = ["--method", "rqkmeans", "--levels", "2", "--codebook-size", "8", "--no-progress"]


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).standard_normal((120, 12)).astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    return tmp_path / "emb.npy"


def _fit(embeddings: Path, out: Path, *extra: str) -> int:
    return main(["fit-codebooks", "--embeddings", str(embeddings), "--out", str(out), *CODEBOOK_FLAGS, *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


class _Killed(BaseException):
    """Stands for a kill -9 in the middle of writing."""


def test_a_fit_killed_between_files_leaves_the_old_set_whole(embeddings: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from semid.codebooks import check_codebooks
    from semid_cli import codebooks

    out = tmp_path / "ids"
    assert _fit(embeddings, out, "--seed", "0") == 0
    old = _files(out)

    def killed(*args: object, **kwargs: object) -> None:  # the IDs, quantizer and stats are written by now
        raise _Killed

    monkeypatch.setattr(codebooks, "code_usage_figure", killed)
    with pytest.raises(_Killed):
        _fit(embeddings, out, "--seed", "1")
    assert _files(out) == old  # no new semantic_ids.npz next to an old code_usage.png
    check_codebooks(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ids.")]  # no half-written folder beside it


def test_a_fit_replaces_the_whole_set_and_clears_folders_left_by_a_kill(embeddings: Path, tmp_path: Path) -> None:
    out = tmp_path / "ids"
    assert _fit(embeddings, out, "--seed", "0") == 0
    old = _files(out)
    abandoned = tmp_path / ".ids.writing-999999999-abc"  # a writer killed with -9 (that pid runs no more)
    abandoned.mkdir()
    (abandoned / "semantic_ids.npz").write_bytes(b"half")
    assert _fit(embeddings, out, "--seed", "1") == 0
    new = _files(out)
    assert set(new) == set(old) and new["quantizer.pt"] != old["quantizer.pt"] and not abandoned.exists()


def test_a_changed_or_half_written_codebooks_folder_is_refused_by_train(embeddings: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ids"
    assert _fit(embeddings, out) == 0
    train = ["train", "--data", str(tmp_path / "data"), "--ids", str(out), "--out", str(tmp_path / "run"), *FLAGS]
    (out / "code_usage.png").write_bytes(b"other")
    assert main(train) == 2
    assert f"{out / 'code_usage.png'}: does not match manifest.json" in capsys.readouterr().err
    (out / "code_usage.png").unlink()
    assert main(train) == 2
    assert f"{out / 'code_usage.png'}: missing from the codebooks folder" in capsys.readouterr().err
    (out / "manifest.json").write_text('{"format": "semid.codebooks", "version": 1, "complete": false, "files": {}}')
    assert main(train) == 2
    assert "a fit-codebooks write into this folder was interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_quantizer_file_has_normal_permissions_and_the_same_bytes_for_the_same_fit(embeddings: Path, tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        assert _fit(embeddings, tmp_path / "a") == 0
        assert _fit(embeddings, tmp_path / "b") == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "a" / "quantizer.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "quantizer.pt").read_bytes() == (tmp_path / "b" / "quantizer.pt").read_bytes()
