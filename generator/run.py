"""The run folder: everything needed to evaluate and recommend, written atomically.

::

    RUN/config.yaml          what was trained: data folder, options, model config, layout, best checkpoint
    RUN/semantic_ids.npz     a copy of the semantic IDs the model was trained with
    RUN/checkpoints/         best.ckpt (highest val/ndcg@10), last.ckpt (to resume)
    RUN/logs/                CSV logs (metrics.csv per version)
    RUN/metrics_<split>.json written by evaluation

Loading a run (:func:`load_run`) rebuilds the model from its checkpoint alone and refuses a checkpoint whose
vocabulary does not match the run's semantic IDs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from generator.model import load_checkpoint
from semid.ids import SemanticIDs
from semid.io import atomic_open
from semid.layout import TokenLayout
from semid.tree import PrefixTree

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
IDS_FILE = "semantic_ids.npz"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
BEST = "best.ckpt"
LAST = "last.ckpt"
RUN_FORMAT = "semid.run"


def metrics_file(run_dir: str | os.PathLike[str], split: str) -> Path:
    return Path(run_dir) / f"metrics_{split}.json"


def write_config(run_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """Write ``RUN/config.yaml`` atomically."""
    with atomic_open(Path(run_dir) / CONFIG_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump({"format": RUN_FORMAT, **config}, f, sort_keys=False)


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no {CONFIG_FILE}; make one with `semid train`)")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: not a semid run config (format {config.get('format') if isinstance(config, dict) else None!r})")
    return config


@dataclass
class Run:
    """A loaded run: the model (eval mode), its semantic IDs, layout and prefix tree, and its config."""

    path: Path
    config: dict[str, Any]
    checkpoint: Path
    model: torch.nn.Module  # T5ForConditionalGeneration, or CausalGenerator for the causal design
    model_config: Any  # GeneratorConfig or CausalConfig
    layout: TokenLayout
    ids: SemanticIDs
    tree: PrefixTree

    @property
    def design(self) -> str:
        return "causal" if getattr(self.model_config, "to_dict", dict)().get("design") == "causal" else "t5"

    @property
    def max_history(self) -> int:
        return int(self.config["train"]["max_history"])

    @property
    def use_user_tokens(self) -> bool:
        return self.layout.num_user_tokens > 0

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data"])


def best_checkpoint(run_dir: str | os.PathLike[str], config: dict[str, Any] | None = None) -> Path:
    """The checkpoint config.yaml names as best; FileNotFoundError naming it if it is missing (no silent fallback)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir) if config is None else config
    rel = config.get("best_checkpoint")
    if not rel:
        raise FileNotFoundError(
            f"{run_dir / 'config.yaml'}: names no best checkpoint (training has not finished); "
            f"pass a checkpoint file explicitly, e.g. {run_dir / CHECKPOINT_DIR / LAST}"
        )
    path = run_dir / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's best checkpoint (named in config.yaml) is missing")
    return path


def load_run(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> Run:
    """Load a run folder for evaluation or recommendation (CPU; move ``run.model`` yourself for a GPU).

    Args:
        checkpoint: a checkpoint file to use instead of the run's best one (it must match the run's semantic IDs).
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    ids = SemanticIDs.load(run_dir / IDS_FILE)
    ckpt = Path(checkpoint) if checkpoint is not None else best_checkpoint(run_dir, config)
    loaded = load_checkpoint(ckpt, ids)  # refuses a vocabulary that does not match the IDs
    layout = loaded.layout
    tree = PrefixTree.from_semantic_ids(ids, layout)
    log.info("loaded run %s (checkpoint %s, %d items)", run_dir, ckpt.name, ids.num_items)
    return Run(run_dir, config, ckpt, loaded.model, loaded.config, layout, ids, tree)
