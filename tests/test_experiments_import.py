"""Every benchmark script in experiments/ imports against the current library (experiments/cf_codes.py imported a
loader that had moved, and failed before doing anything: a helper's audit ran every script, December 2026).
Importing runs no benchmark: each script does its work in ``main``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.py") if p.stem != "__init__")
OURS = ("semid", "rqvae", "generator", "semid_cli", "experiments", "tests")


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_script_imports(name: str) -> None:
    try:
        importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:  # a peer library installed in its own venv (recbole, cornac): not ours to have
        if (e.name or "").split(".")[0] in OURS:
            raise
        pytest.skip(f"experiments.{name} needs {e.name}, not installed here")
