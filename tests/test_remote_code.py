"""A model or tokenizer folder never runs its own code (issue 22, item 1).

A crafted folder names a class of its own in `auto_map` (tokenizer_config.json or config.json) with a `.py` file
beside it that would write a marker file when imported. transformers, left to itself, asks "Do you wish to run the
custom code? [y/N]" and runs the file on "y" (tried on the code before this fix: the marker appeared with "y" piped
in). semid refuses such a folder before transformers reads it, naming the file and the key, and never asks: the
marker must not appear with stdin closed, with "y" piped in, or with "y" typed on a terminal (a pty).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semid.embed import load_encoder
from semid.titles import TitleTokenizer
from tests.test_embed import model_dir  # noqa: F401 (a tiny local BERT folder)
from tests.test_generator_helpers import write_ids, write_random_dataset
from tests.test_titles_cli import tiny_local_tokenizer

ROOT = Path(__file__).parents[1]


def _plant_code(folder: Path, file: str, auto_map: dict, marker: Path) -> None:
    """Add `auto_map` to ``folder/file`` and the `evil.py` it names, which writes ``marker`` when imported."""
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "from transformers import PreTrainedTokenizerFast, PretrainedConfig, PreTrainedModel\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    )
    path = folder / file
    doc = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**doc, **auto_map}))


@pytest.fixture
def evil_tokenizer(tmp_path: Path) -> tuple[Path, Path]:
    """A working local tokenizer folder whose tokenizer_config.json maps AutoTokenizer to evil.EvilTokenizer."""
    folder = tiny_local_tokenizer(tmp_path / "tok")
    marker = tmp_path / "MARKER"
    _plant_code(folder, "tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]},
                                                  "tokenizer_class": "EvilTokenizer"}, marker)
    return folder, marker


@pytest.fixture
def evil_model(tmp_path: Path, model_dir: Path) -> tuple[Path, Path]:  # noqa: F811
    """The tiny BERT folder whose config.json maps AutoConfig/AutoModel to evil.py (its tokenizer config has none)."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    marker = tmp_path / "MARKER"
    _plant_code(folder, "config.json", {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}, marker)
    return folder, marker


def test_loading_a_tokenizer_or_model_folder_with_an_auto_map_is_refused(evil_tokenizer, evil_model) -> None:
    tok, marker = evil_tokenizer
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: key `auto_map` \(AutoTokenizer\) names Python code"):
        TitleTokenizer.from_pretrained(tok)
    model, marker2 = evil_model
    with pytest.raises(ValueError, match=r"model/config\.json: key `auto_map` \(AutoConfig, AutoModel\)"):
        load_encoder(model, "cpu")
    assert not marker.exists() and not marker2.exists()


def test_a_run_whose_tokenizer_folder_was_given_an_auto_map_is_refused(evil_tokenizer, tmp_path: Path) -> None:
    """What `semid recommend --run RUN` reads for a title run with a transformers tokenizer: RUN/tokenizer/."""
    clean = TitleTokenizer.from_pretrained(tiny_local_tokenizer(tmp_path / "clean"))
    saved = clean.save(tmp_path / "run" / "tokenizer")
    assert TitleTokenizer.load(saved).kind == "transformers"
    _plant_code(saved, "tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}},
                tmp_path / "MARKER2")
    with pytest.raises(ValueError, match=r"run/tokenizer/tokenizer_config\.json: key `auto_map`"):
        TitleTokenizer.load(saved)
    assert not (tmp_path / "MARKER2").exists()


def _semid(argv: list[str], stdin: str, tmp_path: Path) -> tuple[int, str]:
    """Run `python -m semid_cli ARGV` with stdin closed ("closed"), "y" piped in ("pipe") or typed on a pty ("tty")."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "semid_cli", *argv]
    if stdin == "tty":
        master, slave = pty.openpty()
        os.write(master, b"y\n")  # waits in the terminal's input queue for any question asked
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=slave, capture_output=True, text=True, timeout=300)
        finally:
            os.close(slave)
            os.close(master)
    elif stdin == "pipe":
        proc = subprocess.run(cmd, cwd=ROOT, env=env, input="y\ny\n", capture_output=True, text=True, timeout=300)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("stdin", ["closed", "tty"])
def test_semid_train_with_a_crafted_tokenizer_runs_no_code_and_asks_nothing(evil_tokenizer, tmp_path: Path, stdin: str) -> None:
    tok, marker = evil_tokenizer
    data = write_random_dataset(tmp_path / "data")
    ids = write_ids(tmp_path / "ids.npz")
    rc, err = _semid(["train", "--data", str(data), "--ids", str(ids), "--out", str(tmp_path / "run"), "--target", "title",
                      "--tokenizer", str(tok), "--max-epochs", "1", "--no-progress"], stdin, tmp_path)
    assert not marker.exists(), err  # first: the code did not run
    assert rc == 2, err
    assert f"{tok / 'tokenizer_config.json'}: key `auto_map`" in err and "Traceback" not in err
    assert "custom code" not in err  # transformers' question was never asked


@pytest.mark.parametrize("stdin", ["pipe", "tty"])
def test_semid_embed_with_a_crafted_model_runs_no_code(evil_model, tiny_dataset_dir: Path, tmp_path: Path, stdin: str) -> None:
    model, marker = evil_model
    rc, err = _semid(["embed", "--data", str(tiny_dataset_dir), "--model", str(model), "--no-progress"], stdin, tmp_path)
    assert not marker.exists(), err  # first: the code did not run
    assert rc == 2, err
    assert f"{model / 'config.json'}: key `auto_map`" in err and "Traceback" not in err
    assert not list(tiny_dataset_dir.glob("item_emb_model*"))


def test_without_the_pre_check_transformers_is_still_told_not_to_run_the_code(evil_tokenizer, evil_model,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two locks, not one: every load also says trust_remote_code=False (and local_files_only=True) at its call, so a
    folder the pre-check missed is refused by transformers instead of asking, and its code never runs."""
    import semid.embed
    import semid.titles

    for module in (semid.embed, semid.titles):
        monkeypatch.setattr(module, "refuse_remote_code", lambda *a, **k: None)
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # transformers, left to ask, would be told "y"
    tok, marker = evil_tokenizer
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        TitleTokenizer.from_pretrained(tok)
    model, marker2 = evil_model  # (its config keeps model_type "bert": transformers loads its own BertModel instead)
    try:
        load_encoder(model, "cpu")
    except ValueError as e:
        assert "cannot load a tokenizer and model" in str(e)
    assert not marker.exists() and not marker2.exists()

