"""Serving a run never imports Lightning: the featurisation a loaded run batches with is Lightning-free, and a
design's training setup imports its Lightning system only when it trains (issue 18)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("lightning", "pytorch_lightning", "lightning_fabric")


def _loaded(modules: list[str]) -> list[str]:
    """The training-only packages loaded by importing ``modules`` in a fresh interpreter."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps(sorted({{n.split('.')[0] for n in sys.modules}} & set({list(TRAINING_ONLY)!r}))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


SERVING = ["generator.runs.recommender", "generator.serving.app", "generator.runs.folder", "generator.runs.evaluate",
           "generator.designs.registry"]


def test_serving_modules_do_not_import_lightning() -> None:
    assert _loaded(SERVING) == [], f"importing {SERVING} loads Lightning"


def test_the_check_sees_lightning_where_it_is_imported() -> None:  # the test above is not vacuous
    assert _loaded(["generator.training.datamodules"]) == ["lightning"]
