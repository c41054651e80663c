"""A damaged title run (issue 22, item 9): NaN weights meet the same finite-weights check as a causal run's, and a
damaged tokenizer.json or a title_tokenizer.json missing a key is an error naming the file, not a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from generator.models.checkpoint import INTEGRITY_KEY, with_integrity
from generator.runs.folder import load_run
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset
from tests.test_titles_cli import FLAGS


@pytest.fixture(scope="module")
def title_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crafted_title")
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(run), "--target", "title", *FLAGS,
                 "--model-option", "tokenizer_vocab=300", "--final-val-users", "0"]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_nan_weights_of_a_title_run_are_named(title_run: Path, tmp_path: Path) -> None:
    run = _copy(title_run, tmp_path)
    path = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop(INTEGRITY_KEY)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name].fill_(float("nan"))
    torch.save(with_integrity(ckpt), path)
    with pytest.raises(ValueError, match=rf"best\.ckpt: tensor `{name.removeprefix('model.')}` holds \d+ NaN or inf"):
        load_run(run)


def test_a_damaged_tokenizer_json_is_named(title_run: Path, tmp_path: Path) -> None:
    run = _copy(title_run, tmp_path)
    (run / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer/tokenizer\.json: not a readable tokenizer .*restore the run's tokenizer"):
        load_run(run)


@pytest.mark.parametrize("meta", ['{"kind": "bpe", "pad_id": 0, "vocab_size": 300}', "[1, 2]", "{not json"])
def test_a_title_tokenizer_record_missing_a_key_is_named(title_run: Path, tmp_path: Path, meta: str) -> None:
    run = _copy(title_run, tmp_path)
    (run / "tokenizer" / "title_tokenizer.json").write_text(meta)
    with pytest.raises(ValueError, match=r"title_tokenizer\.json: a damaged title tokenizer record"):
        load_run(run)
    assert json.loads((title_run / "tokenizer" / "title_tokenizer.json").read_text())["kind"] == "bpe"
