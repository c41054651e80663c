"""Load any run folder: a semantic-ID run (causal or T5, ``generator.runs.folder.load_run``) or a title run
(``generator.runs.titles.load_title_run``), as its config.yaml says."""

from __future__ import annotations

import os
from pathlib import Path

from generator.runs.folder import Run, load_run, read_config
from generator.runs.titles import is_title_config, load_title_run


def load_any_run(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> Run:
    """The run in ``run_dir`` (CPU, eval mode), with its best checkpoint or ``checkpoint``."""
    config = read_config(run_dir)
    if is_title_config(config):
        return load_title_run(Path(run_dir), config, checkpoint)
    return load_run(run_dir, checkpoint)
