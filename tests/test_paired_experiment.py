"""experiments.paired: two runs on the same test users, paired by user, with the command that made the file."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from experiments import paired
from generator.runs.evaluate import evaluate
from generator.runs.folder import load_run
from semid.data import load_dataset
from semid.split import leave_one_out


def test_paired_records_its_argv_and_pairs_a_run_with_itself_at_zero(serve_world: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paired, "RESULTS", tmp_path)
    v1, v2 = str(serve_world["v1"]), str(serve_world["v2"])
    argv = ["--a", v1, "--b", v2, "--decoder", "exact", "--tag", "t"]
    paired.main(argv)
    out = json.loads((tmp_path / "paired_t.json").read_text())
    assert out["command"] == "python -m experiments.paired " + shlex.join(argv)  # the call made, not pytest's argv
    assert f"    {out['command']}" in (tmp_path / "paired_t.md").read_text()
    run = load_run(v1)
    want = evaluate(run, leave_one_out(load_dataset(run.data_dir)), "test", decoder="exact").metrics["recall@10"]
    assert out["recall@10"]["a"] == pytest.approx(want) and out["users"] > 0
    paired.main(["--a", v1, "--b", v1, "--decoder", "exact", "--tag", "self"])
    same = json.loads((tmp_path / "paired_self.json").read_text())
    assert same["recall@10"]["diff"] == 0.0 and same["recall@10"]["ci"] == [0.0, 0.0]
    assert out["sample"] is False and "test users (all)" in (tmp_path / "paired_t.md").read_text()


def test_a_user_cap_above_the_test_users_is_not_called_a_sample(serve_world: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-users`` at or above the count of test users ranks them all: the file said "a seeded sample" (a helper's
    audit); a cap below it is one."""
    monkeypatch.setattr(paired, "RESULTS", tmp_path)
    v1 = str(serve_world["v1"])
    paired.main(["--a", v1, "--b", v1, "--decoder", "exact", "--max-users", "100000", "--tag", "cap"])
    out = json.loads((tmp_path / "paired_cap.json").read_text())
    assert out["sample"] is False and "test users (all)" in (tmp_path / "paired_cap.md").read_text()
    paired.main(["--a", v1, "--b", v1, "--decoder", "exact", "--max-users", str(out["users"] - 1), "--tag", "few"])
    few = json.loads((tmp_path / "paired_few.json").read_text())
    assert few["sample"] is True and few["users"] == out["users"] - 1
    assert "(a seeded sample)" in (tmp_path / "paired_few.md").read_text()


def test_the_beam_identity_script_builds_every_decoder_it_records() -> None:
    """experiments/beam_identity.py (the refactors' bit-identity check) called the registry with an `alpha=` it no
    longer takes: it failed before recording anything (a helper's audit)."""
    from experiments import beam_identity

    out = beam_identity.collect()
    assert {"t5/0/registry/hybrid", "t5/0/registry/cold-beam"} <= set(out) and all(len(v) for v in out.values())
