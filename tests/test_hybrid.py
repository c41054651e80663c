"""The hybrid re-ranker on tiny hand-checked tensors, and when its stored blend weight is reused."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from generator.decoding.fusion import union_rows
from generator.decoding.protocol import BLEND
from generator.decoding.t5_hybrid import HybridCandidates, blend, choose_alpha, rerank
from generator.models.checkpoint import ids_digest
from generator.runs.folder import HYBRID_FILE
from generator.runs.fusion_store import POOL, choice_key, stored_alpha
from semid.ids import SemanticIDs


def _cands() -> HybridCandidates:
    # one history, 3 candidates: the beam prefers item 10, dense prefers item 30
    items = torch.tensor([[10, 20, 30]])
    gen = torch.tensor([[-1.0, -2.0, -4.0]])
    dense = torch.tensor([[-5.0, -2.0, -1.0]])
    codes = torch.tensor([[[1, 0], [2, 0], [3, 0]]])
    return HybridCandidates(items, gen, dense, codes)


def test_blend_and_rerank_by_hand() -> None:
    c = _cands()
    # alpha 0.5: 10 -> -3.0, 20 -> -2.0, 30 -> -2.5
    torch.testing.assert_close(blend(c, 0.5), torch.tensor([[-3.0, -2.0, -2.5]]))
    res = rerank(c, 0.5, 2)
    assert res.items.tolist() == [[20, 30]]
    torch.testing.assert_close(res.scores, torch.tensor([[-2.0, -2.5]]))
    assert res.codes.tolist() == [[[2, 0], [3, 0]]]
    assert res.score == BLEND and not res.leaves
    assert rerank(c, 1.0, 3).items.tolist() == [[10, 20, 30]]  # the beam's order
    assert rerank(c, 0.0, 3).items.tolist() == [[30, 20, 10]]  # the dense order


def test_empty_beam_slots_stay_last_even_at_alpha_zero() -> None:
    c = _cands()._replace(gen_logprob=torch.tensor([[-1.0, -2.0, -math.inf]]))
    scores = blend(c, 0.0)
    assert not torch.isnan(scores).any()
    assert rerank(c, 0.0, 3).items.tolist() == [[20, 10, 30]]


def test_ties_keep_beam_order() -> None:
    c = HybridCandidates(torch.tensor([[5, 6]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.zeros(1, 2, 1, dtype=torch.long))
    assert rerank(c, 0.3, 2).items.tolist() == [[5, 6]]


def test_choose_alpha_by_hand() -> None:
    # two validation users; target of user 0 is the beam's 2nd, of user 1 the dense favourite
    items = torch.tensor([[1, 2, 3], [4, 5, 6]])
    gen = torch.tensor([[-1.0, -1.5, -9.0], [-1.0, -3.0, -3.5]])
    dense = torch.tensor([[-3.0, -1.0, -9.0], [-9.0, -9.0, -0.5]])
    c = HybridCandidates(items, gen, dense, torch.zeros(2, 3, 1, dtype=torch.long))
    targets = torch.tensor([2, 6])
    choice = choose_alpha(c, targets, grid=[0.0, 0.5, 1.0], metric="recall@1")
    # alpha 1: tops are 1, 4 -> 0 hits; alpha 0: 2, 6 -> 2 hits; alpha 0.5: user 0: 1 -> -2, 2 -> -1.25 (hit);
    # user 1: 4 -> -5, 6 -> -2 (hit)
    assert choice.table == {0.0: 1.0, 0.5: 1.0, 1.0: 0.0}
    assert choice.alpha == 0.0  # tie: the first in the grid
    assert choose_alpha(c, targets, grid=[1.0, 0.5], metric="ndcg@2").alpha == 0.5


def test_rerank_and_choose_alpha_argument_errors() -> None:
    c = _cands()
    with pytest.raises(ValueError, match=r"`alpha` must be a number in \[0, 1\], got 1.5"):
        rerank(c, 1.5, 1)
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 3\] \(the candidates per history\), got 4"):
        rerank(c, 0.5, 4)
    with pytest.raises(ValueError, match="`metric` must be"):
        choose_alpha(c, torch.tensor([1]), metric="mrr@2")
    with pytest.raises(ValueError, match="`metric` must be"):
        choose_alpha(c, torch.tensor([1]), metric="ndcg@4")  # more than the candidates


def test_union_rows_keeps_first_occurrence_and_pads() -> None:
    beam = torch.tensor([[3, 1, 9], [2, 9, 9]])  # 9 = pad (empty beam slots)
    dense = torch.tensor([[1, 4, 3], [5, 2, 0]])
    rows, valid = union_rows(beam, dense, 9)
    assert rows.tolist() == [[3, 1, 4, 9, 9, 9], [2, 5, 0, 9, 9, 9]]
    assert valid.tolist() == [[True, True, True, False, False, False], [True, True, True, False, False, False]]


def _run(folder: Path, ids: SemanticIDs) -> SimpleNamespace:
    """A run as ``fusion_store`` reads it: its folder, a real checkpoint file and real semantic IDs."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.arange(6.0)}}, folder / "model.ckpt")
    return SimpleNamespace(path=folder, checkpoint=folder / "model.ckpt", ids=ids)


def test_a_stored_alpha_is_reused_only_for_the_same_checkpoint_ids_pool_and_candidates(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = SemanticIDs.from_codes(rng.integers(0, 4, size=(12, 2)), (4, 4), extra_level_size=4)
    run = _run(tmp_path / "run", ids)
    key = choice_key(run)  # computed for real from the file and the IDs
    assert key == {"checkpoint": str(run.checkpoint.resolve()),
                   "checkpoint_sha256": hashlib.sha256(run.checkpoint.read_bytes()).hexdigest(),
                   "ids_sha256": ids_digest(ids), "pool": POOL}
    path = run.path / HYBRID_FILE
    assert stored_alpha(run, 50) is None  # nothing stored yet
    stored = {"alpha": 0.3, "metric": "ndcg@10", "num_candidates": 50, **key}  # as choose_t5_alpha writes it
    path.write_text(json.dumps(stored))
    assert stored_alpha(run, 50) == 0.3  # same checkpoint, IDs, pool and candidate count: reused

    assert stored_alpha(run, 20) is None  # another num_candidates
    old = {k: v for k, v in stored.items() if k != "pool"}  # written for the beam-only pool, before "pool" existed
    path.write_text(json.dumps(old))
    assert stored_alpha(run, 50) is None
    path.write_text(json.dumps({**stored, "pool": "beam"}))
    assert stored_alpha(run, 50) is None
    path.write_text(json.dumps(stored))

    other_ids = SemanticIDs(ids.codes[::-1].copy(), ids.item_ids, ids.codebook_sizes)  # same items, codes swapped
    assert ids_digest(other_ids) != key["ids_sha256"]
    assert stored_alpha(SimpleNamespace(path=run.path, checkpoint=run.checkpoint, ids=other_ids), 50) is None

    moved = tmp_path / "elsewhere.ckpt"  # the same bytes at another path
    shutil.copy(run.checkpoint, moved)
    assert stored_alpha(SimpleNamespace(path=run.path, checkpoint=moved, ids=ids), 50) is None

    torch.save({"state_dict": {"w": torch.arange(6.0) + 1}}, run.checkpoint)  # retrained in place: same path, new content
    assert stored_alpha(run, 50) is None
    path.write_text(json.dumps({**stored, **choice_key(run)}))  # chosen again for the new checkpoint
    assert stored_alpha(run, 50) == 0.3

    path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt hybrid blend-weight file"):
        stored_alpha(run, 50)
