"""The causal model's dense head is the shared ``generator.models.dense.DenseHead``: a checkpoint written before it
was (the head's weights under the model's own names: ``dense_query``, ``item_table``, ``dense_codes``,
``dense_content``) passes the structure checks, loads to the same weights and ranks exactly as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from generator.models.causal import OLD_DENSE_NAMES
from generator.models.checkpoint import safe_load, with_integrity
from generator.runs.folder import HYBRID_FILE, best_checkpoint, load_run, read_config
from generator.runs.recommend import recommend
from semid_cli import main
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset

FLAGS = ["--max-epochs", "1", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0",
         "--final-val-users", "0", "--dense", "both"]
HISTORIES = [[1, 2, 3], [10, 12, 14], [5], [30, 31, 30]]


def test_a_checkpoint_with_the_old_dense_names_loads_and_ranks_identically(tmp_path: Path) -> None:
    data = write_random_dataset(tmp_path / "data")
    np.save(data / "item_emb_minilm.npy", np.random.default_rng(0).normal(size=(NUM_ITEMS, 8)).astype(np.float32))
    (tmp_path / "ids").mkdir()
    write_ids(tmp_path / "ids" / "semantic_ids.npz")
    new = tmp_path / "new"
    assert main(["train", "--data", str(data), "--ids", str(tmp_path / "ids"), "--out", str(new), *FLAGS]) == 0
    old = tmp_path / "old"
    shutil.copytree(new, old)
    (old / HYBRID_FILE).unlink(missing_ok=True)
    path = best_checkpoint(old, read_config(old))
    ckpt = safe_load(path)
    back = {f"model.{v}": f"model.{k}" for k, v in OLD_DENSE_NAMES.items()}
    assert set(back) <= set(ckpt["state_dict"])  # all five (content vectors too) are in a run trained with --dense both
    ckpt["state_dict"] = {back.get(k, k): v for k, v in ckpt["state_dict"].items()}  # as written before the shared head
    torch.save(with_integrity(ckpt), path)
    assert not any("dense_head" in k for k in safe_load(path)["state_dict"])

    a, b = load_run(new), load_run(old)
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True))
    for decoder in ("beam", "exact", "dense"):
        want, got = recommend(a, HISTORIES, k=5, decoder=decoder), recommend(b, HISTORIES, k=5, decoder=decoder)
        for w, g in zip(want, got, strict=True):
            assert np.array_equal(w.items, g.items) and np.array_equal(w.scores, g.scores)
