"""`semid combine`: causal runs trained apart become one ensemble run (generator.runs.combine) that scores an item by
the sum of every member's log-likelihood, serves like any run, and leaves its sources as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from generator.decoding.causal import CausalDecoders, exact_scores
from generator.models.ensemble import EnsembleGenerator
from generator.runs.combine import combine_runs
from generator.runs.folder import load_run
from generator.runs.recommender import Recommender
from semid_cli import main
from tests.test_distill import digests
from tests.test_generator_helpers import write_ids, write_random_dataset

SMALL = ["--max-steps", "30", "--batch-size", "8", "--val-users", "20", "--no-progress", "--model-option", "d_model=16",
         "--model-option", "num_heads=2", "--model-option", "d_ff=32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combine")
    data = write_random_dataset(root / "data", num_users=60)
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    runs = {"data": data, "ids": root / "ids", "root": root}
    for name, extra in (("one", ["--seed", "1"]), ("two", ["--seed", "2", "--model-option", "members=2"]),
                        ("wide", ["--seed", "3", "--model-option", "dropout=0.1"])):
        runs[name] = root / name
        assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(runs[name]), *SMALL, *extra]) == 0
    return runs


def test_the_combined_run_scores_by_the_sum_of_every_sources_log_likelihood(world: dict[str, Path],
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: digests(world[name]) for name in ("one", "two")}
    out = world["root"] / "combined"
    record = combine_runs([world["one"], world["two"]], out)
    assert {name: digests(world[name]) for name in ("one", "two")} == before  # the sources only read
    assert record["members"] == 3 and [s["members"] for s in record["sources"]] == [1, 2]
    assert json.loads((out / "combine.json").read_text())["members"] == 3 and (out / "hybrid.json").is_file()
    combined, one, two = load_run(out), load_run(world["one"]), load_run(world["two"])
    assert isinstance(combined.model, EnsembleGenerator) and len(combined.model.members) == 3
    assert combined.model_config.members == 3
    hist = torch.tensor([[3, 7, 1, 9, 0], [4, 2, 0, 0, 0]])
    lengths = torch.tensor([4, 2])

    def exact(run):  # noqa: ANN001, ANN202
        dec = CausalDecoders(run.model, run.tree, torch.as_tensor(run.ids.item_ids)).refresh()
        with torch.inference_mode():
            return exact_scores(run.model, run.model.last_hidden(hist, lengths), dec.paths, dec.tables)

    torch.testing.assert_close(exact(combined), exact(one) + exact(two), rtol=1e-4, atol=1e-4)
    rec = Recommender.from_run(out)
    for decoder in ("beam", "exact", "dense", "hybrid"):
        (got,) = rec.recommend([[3, 7, 1]], 5, decoder)
        assert len(got.items) == 5 and len(set(got.items.tolist())) == 5
    capsys.readouterr()
    assert main(["train", "--data", str(world["data"]), "--ids", str(world["ids"]), "--out", str(out), "--resume", *SMALL]) == 2
    assert "it is a combined run (combine.json), which serves but does not train" in capsys.readouterr().err


def test_runs_that_cannot_be_one_ensemble_are_refused_naming_the_difference(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"differs .* in \[.dropout.\]"):
        combine_runs([world["one"], world["wide"]], out)
    with pytest.raises(ValueError, match="two runs or more"):
        combine_runs([world["one"]], out)
    with pytest.raises(ValueError, match="named twice"):
        combine_runs([world["one"], world["one"]], out)
    with pytest.raises(ValueError, match="inside the source run"):
        combine_runs([world["one"], world["two"]], world["one"] / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        combine_runs([world["one"], world["two"]], tmp_path / "full")
    other_ids = tmp_path / "other"
    shutil.copytree(world["one"], other_ids)
    text = (other_ids / "config.yaml").read_text()
    import yaml

    from generator.runs.folder import write_config

    config = yaml.safe_load(text)
    write_config(other_ids, {**config, "data_fingerprint": {**config["data_fingerprint"], "items.jsonl": "0" * 64}})
    with pytest.raises(ValueError, match="data"):
        combine_runs([world["one"], other_ids], out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nothing left behind
    assert main(["combine", "--run", str(world["one"]), "--run", str(world["wide"]), "--out", str(out)]) == 2


def test_a_run_from_before_a_model_field_was_added_combines_with_a_new_one(world: dict[str, Path], tmp_path: Path) -> None:
    """A config.yaml written before `seen_negatives` existed lacks the key; its model is the default, alike."""
    import yaml

    from generator.runs.folder import write_config

    old = tmp_path / "old"
    shutil.copytree(world["one"], old)
    config = yaml.safe_load((old / "config.yaml").read_text())
    assert config["model"].pop("seen_negatives") is True
    write_config(old, config)
    assert combine_runs([old, world["two"]], tmp_path / "out")["members"] == 3


def _edited(world: dict[str, Path], tmp_path: Path, name: str, train: dict) -> Path:  # noqa: ANN001
    """A copy of run "one" whose config.yaml's train section is changed (written with its checksum)."""
    import yaml

    from generator.runs.folder import write_config

    out = tmp_path / name
    shutil.copytree(world["one"], out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    write_config(out, {**config, "train": {**config["train"], **train}})
    return out


def test_a_title_run_a_dense_only_run_and_added_items_are_refused_by_name(world: dict[str, Path], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="'title' design"):  # config.yaml says design: causal, target: title
        combine_runs([world["one"], _edited(world, tmp_path, "titled", {"target": "title"})], out)
    with pytest.raises(ValueError, match="trained with objective 'dense'"):  # its code head never trained
        combine_runs([world["one"], _edited(world, tmp_path, "dense", {"objective": "dense"})], out)
    import generator.runs.derive as derive

    real = derive.load_run

    def grown(path, *a, **k):  # noqa: ANN001, ANN202
        run = real(path, *a, **k)
        if Path(path) == world["two"]:
            run.model.add_items(run.model.item_tokens[1:3].clone())  # two items after training
        return run

    monkeypatch.setattr(derive, "load_run", grown)
    with pytest.raises(ValueError, match="2 items added after training; combine the runs first"):
        combine_runs([world["one"], world["two"]], out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_source_being_written_is_not_read_half_way(world: dict[str, Path], tmp_path: Path) -> None:
    """Each source is read under its lock: while a training (or add-items, ...) holds it, combine refuses, naming it."""
    from generator.runs.folder import LOCK_FILE
    from semid.io import folder_lock

    with folder_lock(world["two"], LOCK_FILE, what="a training"), pytest.raises(FileExistsError, match="is writing this folder now"):
        combine_runs([world["one"], world["two"]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_combine_counts_no_trained_model_twice(world, tmp_path):  # a mutation audit's M50: neither check was tested
    combined = tmp_path / "combined"
    combine_runs([world["one"], world["two"]], combined, fusion=False)
    with pytest.raises(ValueError, match="already a member of the combined run"):
        combine_runs([combined, world["one"]], tmp_path / "again", fusion=False)
    shutil.copytree(world["one"], tmp_path / "copy")
    with pytest.raises(ValueError, match="hold the same checkpoint"):
        combine_runs([world["one"], tmp_path / "copy"], tmp_path / "again2", fusion=False)
