"""The README's Python example runs as written (on a tiny run in place of the demo's): it had kept a run whose
tables `Recommender.from_run` frees, so its `evaluate` and `decoders_for` lines raised."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_serving_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = [b for b in python_blocks() if "Recommender.from_run" in b]
    data = write_random_dataset(tmp_path / "data", num_items=120)  # (the example's items 12, 45 and 99)
    write_ids(tmp_path / "ids.npz", num_items=120)
    run = tmp_path / "runs" / "demo" / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids.npz"), "--out", str(run),
                     "--max-steps", "6", "--batch-size", "16", "--val-users", "all", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)  # the example's "runs/demo/run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 (the README's own code)
    assert (run / "metrics_test.json").is_file() and "log-likelihood True" in printed.getvalue()
