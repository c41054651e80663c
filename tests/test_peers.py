"""The peers' harness (experiments/peers.py): the split each library is fed, the batches it ranks, the budget.

These cover only the numpy helpers; the runners need recbole/cornac, which live in their own venv and are not
imported here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.peers import (
    CpuBudget,
    cornac_usit,
    left_padded,
    rank_test,
    recbole_inter,
    write_results,
)
from experiments.peers_cornac import _top10_of
from semid.data import Catalogue, Dataset
from semid.metrics import ndcg_at_k, recall_at_k
from semid.split import leave_one_out


@pytest.fixture()
def split():
    rng = np.random.default_rng(0)
    n = 30
    seqs = [rng.integers(1, n + 1, size=k) for k in (2, 3, 5, 8, 1, 12)]  # two users with < 3 items
    cat = Catalogue(item_ids=np.arange(1, n + 1), original_ids=[str(i) for i in range(n)], titles=[""] * n,
                    attributes=[[] for _ in range(n)])
    return leave_one_out(Dataset(path=Path("."), catalogue=cat, user_ids=np.arange(7, 13), sequences=seqs))


def _by_user(rows):
    out: dict[str, list] = {}
    for u, s, item, t in rows:
        assert s == u, "one session per user"
        out.setdefault(u, []).append((t, int(item)))
    return {u: [i for _, i in sorted(v)] for u, v in out.items()}


def test_cornac_rows_are_semid_leave_one_out(split):
    train, val, test = (_by_user(r) for r in cornac_usit(split))
    assert sorted(test) == sorted(str(u) for u in split.user_ids)  # users with < 3 items are not fed
    for i, u in enumerate(split.user_ids.tolist()):
        assert train[str(u)] == split.train[i].tolist()
        assert val[str(u)] == split.valid_history(i).tolist() + [int(split.valid_targets[i])]
        assert test[str(u)] == split.test_history(i).tolist() + [int(split.test_targets[i])]


def test_recbole_inter_keeps_each_users_order(split):
    header, *lines = recbole_inter(split).splitlines()
    assert header == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [line.split("\t") for line in lines]
    seqs = _by_user([(u, u, item, float(t)) for u, item, t in rows])
    for i, u in enumerate(split.user_ids.tolist()):
        # RecBole's time-ordered LS split holds out the last (test) and second-to-last (validation) item
        assert seqs[str(u)] == split.sequences[i].tolist()
        assert seqs[str(u)][-1] == split.test_targets[i] and seqs[str(u)][-2] == split.valid_targets[i]


def test_left_padded_against_a_loop():
    hist = [np.array([5, 6, 7]), np.array([1]), np.arange(1, 10)]
    got = left_padded(hist, 4, pad=99)
    want = [[99] * (4 - min(len(h), 4)) + h[-4:].tolist() for h in hist]
    assert got.tolist() == want


def test_top10_of_is_the_best_ten_in_order():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(5, 5000))  # large enough that argpartition leaves its first ten unsorted
    item_of = rng.permutation(5000) + 100
    assert np.array_equal(_top10_of(scores, item_of), item_of[np.argsort(-scores, axis=1)[:, :10]])


def test_rank_test_uses_semids_metrics_on_the_test_targets(split):
    rng = np.random.default_rng(2)
    ranked = {}  # user row -> its top 10, the target placed at a chosen rank or left out

    def top10(histories):
        out = []
        for h in histories:
            i = next(j for j in range(split.num_users) if split.test_history(j) is h or
                     np.array_equal(split.test_history(j), h))
            row = rng.permutation(np.arange(100, 140))[:10]
            rank = i * 3 % 12  # ranks 0, 3, 6, 9 and beyond the list
            if rank < 10:
                row[rank] = split.test_targets[i]
            ranked[i] = row
            out.append(row)
        return np.stack(out)

    got = rank_test(top10, split, split.num_users, batch=3)
    table = np.stack([ranked[i] for i in range(split.num_users)])
    assert got["users"] == split.num_users
    for k in (5, 10):
        assert got[f"recall@{k}"] == pytest.approx(recall_at_k(table, split.test_targets, k).mean())
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg_at_k(table, split.test_targets, k).mean())


def test_budget_cuts_batches_and_checks_its_start():
    with pytest.raises(ValueError, match="start"):
        _ = CpuBudget(1.0).cpu_s
    with pytest.raises(ValueError, match="positive"):
        CpuBudget(0)
    assert list(CpuBudget(1e-9).start().cut(range(5))) == []
    assert list(CpuBudget(1e6).start().cut(range(5))) == list(range(5))


def test_write_results_keeps_every_peer(tmp_path):
    def result(r10):
        return {"library": "lib 1", "settings": {"d": 64}, "epochs": 3, "best_epoch": 2, "train_cpu_s": 9.0,
                "train_wall_s": 20.0, "test_cpu_s": 1.0, "test_wall_s": 2.0, "command": "python -m x",
                "test": {"recall@5": 0.01, "ndcg@5": 0.005, "recall@10": r10, "ndcg@10": 0.02, "users": 7}}

    write_results("a", result(0.03), tmp_path / "peers")
    write_results("b", result(0.05), tmp_path / "peers")
    assert sorted(json.loads((tmp_path / "peers.json").read_text())) == ["a", "b"]
    md = (tmp_path / "peers.md").read_text()
    assert "| a | lib 1 | 3 | 2 | 9.0 | 20.0 | 7 | 0.0100 | 0.0050 | 0.0300 | 0.0200 |" in md
    assert "| b |" in md and "0.0500" in md and "`python -m x`" in md


def test_the_recorded_command_names_the_interpreter_that_ran(tmp_path, monkeypatch):
    from experiments.peers import _python

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.executable", str(tmp_path / ".venv-peers" / "bin" / "python"))
    assert _python() == ".venv-peers/bin/python"  # (the results once named /work/peers/bin/python whatever ran)
    monkeypatch.setattr("sys.executable", "/usr/bin/python3")
    assert _python() == "/usr/bin/python3"
