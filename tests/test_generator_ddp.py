"""Multi-process training goes through Lightning's strategies: 2-process DDP on CPU (gloo) for a few steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.train import train_run
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_and_validates(tmp_path: Path) -> None:
    data = write_random_dataset(tmp_path / "data")
    ids = write_ids(tmp_path / "ids.npz")
    options = TrainOptions(
        preset="cpu", accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, batch_size=8,
        user_tokens=16, val_users=None, num_beams=10, warmup_steps=2, final_val_users=0, progress=False,
    )
    result = train_run(data, ids, tmp_path / "run", options)
    ckpt = torch.load(result.best_checkpoint, weights_only=False)
    # each process ran half of the epoch's batches: steps are counted per process
    assert 1 <= result.steps == ckpt["global_step"] < 10
    # both processes decoded their half of the 24 validation users; the logged count is the exact total
    metrics = (tmp_path / "run/logs/version_0/metrics.csv").read_text().splitlines()
    header, rows = metrics[0].split(","), [r.split(",") for r in metrics[1:]]
    users = [float(r[header.index("val/users")]) for r in rows if r[header.index("val/users")]]
    assert users == [24.0]
    # the best score is the logged validation NDCG@10, a finite number in [0, 1], as are the other metrics
    logged = {name: [float(r[header.index(name)]) for r in rows if r[header.index(name)]] for name in header if name.startswith("val/")}
    assert result.best_score is not None and math.isfinite(result.best_score) and 0 <= result.best_score <= 1
    assert result.best_score == pytest.approx(max(logged["val/ndcg@10"]))
    for name, values in logged.items():
        assert all(math.isfinite(v) for v in values), (name, values)
        if "@" in name:  # recall@K, ndcg@K
            assert all(0 <= v <= 1 for v in values), (name, values)
    assert {"val/ndcg@10", "val/recall@10"} <= set(logged)
    # the best checkpoint exists and loads as a run (same IDs), with the score recorded in config.yaml
    assert result.best_checkpoint.is_file()
    run = load_run(tmp_path / "run")
    assert run.checkpoint == result.best_checkpoint and run.ids.num_items == NUM_ITEMS
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["best_score"]["val/ndcg@10"] == result.best_score
