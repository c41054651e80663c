"""Multi-process training goes through Lightning's strategies: 2-process DDP on CPU (gloo) for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generator.train import TrainOptions, train_run
from tests.test_generator_helpers import write_ids, write_random_dataset


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
    assert json.loads(json.dumps(result.best_score)) is not None
