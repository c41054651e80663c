"""A crafted checkpoint runs no code: every load of a checkpoint goes through weights_only loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from generator.model import safe_load
from generator.run import load_run
from semid.cli import main
from tests.test_causal_run import FLAGS
from tests.test_generator_helpers import write_ids, write_random_dataset


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted")
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(run), "--final-val-users", "0", *FLAGS]) == 0
    marker = root / "code_ran"
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["extra"] = _Exploit(marker)  # a real checkpoint plus one object whose unpickling runs a command
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    return {"run": run, "marker": marker}


def test_a_crafted_checkpoint_is_refused_before_it_runs_code(crafted: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"best\.ckpt: refused: this file holds objects other than tensors"):
        load_run(crafted["run"])
    with pytest.raises(ValueError, match="refused"):
        safe_load(crafted["run"] / "checkpoints" / "best.ckpt")
    assert not crafted["marker"].exists()


def test_the_cli_refuses_it_with_exit_code_2(crafted: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(crafted["run"]), "--no-progress"]) == 2
    assert main(["recommend", "--run", str(crafted["run"]), "--history", "1,2"]) == 2
    assert "refused" in capsys.readouterr().err and not crafted["marker"].exists()
    # the unsafe loader would have run it: the test is real
    torch.load(crafted["run"] / "checkpoints" / "best.ckpt", weights_only=False)
    assert crafted["marker"].exists()
