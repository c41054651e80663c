"""The hybrid's pool, and when a stored fusion is reused: one schema written, the T5 runs' earlier one (the blend
weight alone) still read as the same blend."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from generator.decoding.fusion import union_rows
from generator.models.checkpoint import ids_digest
from generator.runs.folder import HYBRID_FILE
from generator.runs.fusion_store import POOL, choice_key, stored_fusion
from semid.ids import SemanticIDs


def test_union_rows_keeps_first_occurrence_and_pads() -> None:
    beam = torch.tensor([[3, 1, 9], [2, 9, 9]])  # 9 = pad (empty beam slots)
    dense = torch.tensor([[1, 4, 3], [5, 2, 0]])
    rows, valid = union_rows(beam, dense, 9)
    assert rows.tolist() == [[3, 1, 4, 9, 9, 9], [2, 5, 0, 9, 9, 9]]
    assert valid.tolist() == [[True, True, True, False, False, False], [True, True, True, False, False, False]]


def _run(folder: Path, ids: SemanticIDs, design: str = "t5") -> SimpleNamespace:
    """A run as ``fusion_store`` reads it: its folder, a real checkpoint file and real semantic IDs."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, folder / "model.ckpt")
    return SimpleNamespace(path=folder, checkpoint=folder / "model.ckpt", ids=ids, design=design)


@pytest.mark.parametrize("schema", ["fusion", "earlier-t5-alpha"])
def test_a_stored_fusion_is_reused_only_for_the_same_checkpoint_ids_pool_and_candidates(tmp_path: Path, schema: str) -> None:
    rng = np.random.default_rng(0)
    ids = SemanticIDs.from_codes(rng.integers(0, 4, size=(12, 2)), (4, 4), extra_level_size=4)
    run = _run(tmp_path / "run", ids)
    key = choice_key(run)  # computed for real from the file and the IDs
    assert key == {"checkpoint": "model.ckpt",  # its place inside the run folder: a copied folder keeps its choice
                   "checkpoint_sha256": hashlib.sha256(run.checkpoint.read_bytes()).hexdigest(),
                   "ids_sha256": ids_digest(ids), "pool": POOL}
    path = run.path / HYBRID_FILE
    assert stored_fusion(run, 50) is None  # nothing stored yet
    fusion = {"fusion": "blend", "params": {"alpha": 0.3}} if schema == "fusion" else {"alpha": 0.3}
    stored = {**fusion, "metric": "ndcg@10", "num_candidates": 50, **key}  # as choose_fusion / an earlier T5 wrote it
    path.write_text(json.dumps(stored))
    assert stored_fusion(run, 50) == ("blend", {"alpha": 0.3})  # same checkpoint, IDs, pool and candidate count
    causal = _run(tmp_path / "run", ids, "causal")  # the blend weight alone was a T5 run's schema only
    assert stored_fusion(causal, 50) == (("blend", {"alpha": 0.3}) if schema == "fusion" else None)

    assert stored_fusion(run, 20) is None  # another num_candidates
    old = {k: v for k, v in stored.items() if k != "pool"}  # written for the beam-only pool, before "pool" existed
    path.write_text(json.dumps(old))
    assert stored_fusion(run, 50) is None
    path.write_text(json.dumps({**stored, "pool": "beam"}))
    assert stored_fusion(run, 50) is None
    path.write_text(json.dumps(stored))

    other_ids = SemanticIDs(ids.codes[::-1].copy(), ids.item_ids, ids.codebook_sizes)  # same items, codes swapped
    assert ids_digest(other_ids) != key["ids_sha256"]
    assert stored_fusion(SimpleNamespace(path=run.path, checkpoint=run.checkpoint, ids=other_ids, design="t5"), 50) is None

    copy = tmp_path / "copy"  # the run folder copied (or moved): the choice goes with it
    shutil.copytree(run.path, copy)
    assert stored_fusion(SimpleNamespace(path=copy, checkpoint=copy / "model.ckpt", ids=ids, design="t5"), 50) == ("blend", {"alpha": 0.3})
    path.write_text(json.dumps({**stored, "checkpoint": str(run.checkpoint.resolve())}))  # earlier versions: absolute
    assert stored_fusion(run, 50) == ("blend", {"alpha": 0.3})
    shutil.copy(path, copy / HYBRID_FILE)
    assert stored_fusion(SimpleNamespace(path=copy, checkpoint=copy / "model.ckpt", ids=ids, design="t5"), 50) == ("blend", {"alpha": 0.3})
    path.write_text(json.dumps({**stored, "checkpoint": str(tmp_path / "other" / "x.ckpt")}))  # another file
    assert stored_fusion(run, 50) is None
    path.write_text(json.dumps(stored))

    moved = tmp_path / "elsewhere.ckpt"  # the same bytes at another path
    shutil.copy(run.checkpoint, moved)
    assert stored_fusion(SimpleNamespace(path=run.path, checkpoint=moved, ids=ids, design="t5"), 50) is None

    torch.save({"state_dict": {"w": torch.arange(6.0) + 1}}, run.checkpoint)  # retrained in place: same path, new content
    assert stored_fusion(run, 50) is None
    path.write_text(json.dumps({**stored, **choice_key(run)}))  # chosen again for the new checkpoint
    assert stored_fusion(run, 50) == ("blend", {"alpha": 0.3})

    path.write_text(json.dumps({**stored, **choice_key(run), **({"params": {"alpha": 2}} if schema == "fusion" else {"alpha": "x"})}))
    with pytest.raises(ValueError, match="corrupt hybrid fusion file"):
        stored_fusion(run, 50)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt hybrid fusion file"):
        stored_fusion(run, 50)
