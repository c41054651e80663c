"""A clean console (semid_cli/console.py): off a terminal, `semid train` prints one line per epoch and its summary, no
progress bar, no Lightning chatter, no false `weights_only` note; `--verbose` brings Lightning's detail back, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.serve_helpers import FLAGS

ROOT = Path(__file__).resolve().parents[1]


def _train(serve_world: dict[str, Path], out: Path, *extra: str) -> str:
    flags = [f for f in FLAGS[2:] if f != "--no-progress"]  # the default: decided by whether stderr is a terminal; 2 epochs below
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "semid_cli", *extra, "train", "--data", str(serve_world["data"]), "--ids",
           str(serve_world["root"] / "ids"), "--out", str(out), *flags, "--max-epochs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)  # pipes: not a terminal
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_train_off_a_terminal_prints_one_line_per_epoch(serve_world: dict[str, Path], tmp_path: Path) -> None:
    text = _train(serve_world, tmp_path / "quiet")
    lines = text.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("epoch ")] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert "train/loss" in next(line for line in lines if line.startswith("epoch 1/2"))
    for noise in ("weights_only", "litlogger", "GPU available", "LeafSpec", "\r", "it/s", "━"):
        assert noise not in text, (noise, text)
    assert len(lines) == 7, text  # 2 epoch lines + the 5-line summary


def test_verbose_brings_lightnings_detail_back_once(serve_world: dict[str, Path], tmp_path: Path) -> None:
    text = _train(serve_world, tmp_path / "verbose", "--verbose")
    assert text.count("GPU available: False") == 1, text
    assert "weights_only" not in text  # false here: semid reads checkpoints with its own safe loader


def test_lightning_imported_after_logging_setup_loses_its_own_handler() -> None:
    """`semid demo` imports Lightning after logging is set up: its "INFO: ..." handler must go before training."""
    import subprocess
    import sys

    code = ("from semid_cli import console\nconsole.setup(False)\nimport lightning, logging\nconsole.quiet_lightning()\n"
            "log = logging.getLogger('lightning.pytorch.trainer.connectors.checkpoint_connector')\n"
            "log.info(console.WEIGHTS_ONLY_NOTE)\nlogging.getLogger('lightning.pytorch').warning('a real warning')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "weights_only" not in r.stderr and "INFO:" not in r.stderr
    assert r.stderr.count("a real warning") == 1  # warnings still show, once
