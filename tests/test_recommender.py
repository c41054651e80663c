"""A loaded run that serves many calls (generator.runs.recommender.Recommender): hybrid straight after training, the
same rankings as decoders built per call, nothing rebuilt, hashed or read per call, read paths that write nothing,
history exclusion, the version, the catalogue maps and concurrent calls."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import generator.decoding.causal as causal_decoding
import generator.runs.fusion_store as fusion_store
import semid.data
from generator.decoding.fusion import fuse
from generator.decoding.protocol import Histories
from generator.models.checkpoint import with_integrity
from generator.runs.batches import history_batches
from generator.runs.decoders import choose_run_fusion, decoders_for
from generator.runs.evaluate import evaluate
from generator.runs.folder import HYBRID_FILE, load_run
from generator.runs.recommend import recommend
from generator.runs.recommender import Recommender, distinct_counts, drop_history
from semid.data import load_dataset
from semid.split import leave_one_out
from semid_cli import main
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset

FLAGS = ["--max-epochs", "1", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0"]
HISTORIES = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 30]]
SERVED = ("beam", "exact", "dense", "hybrid")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recommender")
    data = write_random_dataset(root / "data")
    ids_dir = root / "ids"
    ids_dir.mkdir()
    write_ids(ids_dir / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(ids_dir), "--out", str(run), *FLAGS]) == 0
    return {"root": root, "data": data, "run": run}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_hybrid_serves_straight_after_train(world: dict[str, Path]) -> None:
    assert (world["run"] / HYBRID_FILE).is_file()  # chosen at the end of `semid train`
    rec = Recommender.from_run(world["run"], decoder="hybrid")
    out = rec.recommend(HISTORIES, k=5)
    assert all(len(set(r.items.tolist())) == 5 and (np.diff(r.scores) <= 1e-6).all() for r in out)
    assert set(rec.decoders) == set(SERVED) and set(rec.unavailable) == {"cold-beam"}  # no items were added


@pytest.mark.parametrize("decoder", SERVED)
def test_the_same_rankings_as_decoders_built_per_call(world: dict[str, Path], decoder: str) -> None:
    rec = Recommender.from_run(world["run"])
    run = load_run(world["run"])
    dec = decoders_for(run, [decoder], num_beams=20)[decoder]
    hist = [np.asarray(h) for h in HISTORIES]
    want = [dec(b, 5) for b in history_batches(run, hist, None, 2)]
    got = rec.recommend(HISTORIES, k=5, decoder=decoder, batch_size=3, exclude_history=False)
    items = torch.cat([w.items for w in want]).numpy()
    scores = torch.cat([w.scores for w in want]).numpy()
    np.testing.assert_array_equal(np.stack([g.items for g in got]), items)
    np.testing.assert_allclose(np.stack([g.scores for g in got]), scores, rtol=1e-5, atol=1e-5)
    # the one-off function gives the same
    once = recommend(run, HISTORIES, k=5, decoder=decoder, num_beams=20, exclude_history=False)
    np.testing.assert_array_equal(np.stack([o.items for o in once]), items)


def test_a_call_builds_hashes_and_reads_nothing(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recommender.from_run(world["run"])
    before = {d: rec.recommend(HISTORIES, k=4, decoder=d) for d in SERVED}

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt, hashed or read during a call")

    for module, name in [(causal_decoding, "item_paths"), (causal_decoding, "edge_tables"), (fusion_store, "choice_key"),
                         (fusion_store, "file_sha256"), (semid.data, "_read_items"), (fusion_store, "stored_fusion")]:
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for d in SERVED:
        after = rec.recommend(HISTORIES, k=4, decoder=d)
        assert all(np.array_equal(a.items, b.items) for a, b in zip(after, before[d], strict=True))
    more = rec.recommend(HISTORIES, k=25, decoder="beam")  # more items than the loaded beams: more beams, no rebuild
    assert all(len(set(r.items.tolist())) == 25 for r in more)


def test_default_beams_hold_a_long_history_alike_in_every_entry_point(world: dict[str, Path]) -> None:
    """k = 10 and a history of 14 distinct items ask for 24 items, more than the 20 beams loaded: the one-off
    function, the loaded Recommender and the service's buckets decode it with protocol.call_beams's 40 beams."""
    run = load_run(world["run"])
    history = [list(range(1, 15))]
    rec = Recommender(run)
    for decoder in ("beam", "hybrid"):
        once = recommend(run, history, k=10, decoder=decoder)[0]  # (was: refused, 20 beams for 24 items)
        served = rec.recommend(history, k=10, decoder=decoder)[0]
        bucketed = rec.recommend(history, k=10, decoder=decoder, num_beams=40)[0]
        assert once.items.tolist() == served.items.tolist() == bucketed.items.tolist(), decoder
        assert len(once.items) == 10 and not set(once.items.tolist()) & set(history[0])


def test_exclude_history_equals_the_longer_ranking_without_history_items(world: dict[str, Path]) -> None:
    rec = Recommender.from_run(world["run"])
    for decoder in ("beam", "exact", "dense"):
        k = 6
        full = rec.recommend(HISTORIES, k=k + 12, decoder=decoder, exclude_history=False)  # 12: a history's most distinct items
        got = rec.recommend(HISTORIES, k=k, decoder=decoder, exclude_history=True)
        for h, f, g in zip(HISTORIES, full, got, strict=True):
            keep = [i for i, item in enumerate(f.items.tolist()) if item not in set(h)][:k]  # the obvious reference
            np.testing.assert_array_equal(g.items, f.items[keep])
            np.testing.assert_allclose(g.scores, f.scores[keep], rtol=1e-5, atol=1e-5)
            assert not set(g.items.tolist()) & set(h)
    with pytest.raises(ValueError, match="distinct items of a history to exclude"):
        rec.recommend([list(range(1, 13))], k=NUM_ITEMS - 5, decoder="exact", exclude_history=True)


def test_drop_history_keeps_the_order_of_the_rest_and_never_drops_an_empty_slot() -> None:
    items = np.array([[5, 9, 2, 7, 6], [8, -1, 3, -1, 4]])
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    # row 1's empty slots (-1) must not be taken for row 0's item 9 (row * span + item keys: 1 * 10 - 1 == 0 * 10 + 9)
    got_items, got_scores = drop_history(items, scores, [np.array([9, 2]), np.array([8, 8])], 3)
    np.testing.assert_array_equal(got_items, [[5, 7, 6], [-1, 3, -1]])
    np.testing.assert_array_equal(got_scores, [[5.0, 2.0, 1.0], [8.0, 7.0, 6.0]])
    np.testing.assert_array_equal(distinct_counts([np.array([8, 8, 1]), np.array([], dtype=np.int64)]), [2, 0])
    rng = np.random.default_rng(0)
    hists = [rng.integers(0, 30, size=n) for n in (5, 0, 12, 1, 40)]  # item 29 of one row, 0 of the next: other keys
    np.testing.assert_array_equal(distinct_counts(hists), [np.unique(h).size for h in hists])  # loop over rows (a test)


@pytest.mark.parametrize("decoder", SERVED)
def test_evaluate_exclude_history_ranks_what_the_recommender_serves(world: dict[str, Path], decoder: str) -> None:
    run = load_run(world["run"])
    split = leave_one_out(load_dataset(world["data"]))
    got = evaluate(run, split, "test", decoder=decoder, batch_size=3, exclude_history=True, num_beams=10)
    protocol = evaluate(run, split, "test", decoder=decoder, batch_size=3, num_beams=10)
    rec = Recommender.from_run(world["run"], num_beams=10)
    served = [rec.recommend([split.test_history(int(r))], k=10, decoder=decoder, exclude_history=True)[0]
              for r in got.user_rows]  # loop over users: each user's own call, as the service answers it
    want = [_rank(s.items, split.test_targets[r]) for s, r in zip(served, got.user_rows, strict=True)]
    np.testing.assert_array_equal(got.ranks, want)  # user by user: the served ranking's rank of the target
    assert sorted(got.user_rows.tolist()) == list(range(split.num_users))  # every user once (taken in another order)
    every = [rec.recommend([split.test_history(int(r))], k=10, decoder=decoder, exclude_history=False)[0]
             for r in protocol.user_rows]  # loop over users
    np.testing.assert_array_equal(protocol.ranks, [_rank(s.items, split.test_targets[r]) for s, r in zip(every, protocol.user_rows, strict=True)])


def test_evaluate_ranks_what_the_recommender_serves_with_fewer_candidates_stored_than_beams(world: dict[str, Path],
                                                                                             tmp_path: Path) -> None:
    """A fusion chosen with C = 5 candidates per list, served with 10 beams: recommend ranks max(C, beams) per list;
    evaluate ranked C (k = 10 > C failed: "pass a larger `num_candidates`", an option evaluate has not)."""
    run_dir = Path(shutil.copytree(world["run"], tmp_path / "run"))
    assert main(["choose-fusion", "--run", str(run_dir), "--num-candidates", "5"]) == 0
    stored = json.loads((run_dir / HYBRID_FILE).read_text())  # the pool blend (what the fusion chose in the audit)
    (run_dir / HYBRID_FILE).write_text(json.dumps({**stored, "fusion": "blend", "params": {"alpha": 0.5}}))
    split = leave_one_out(load_dataset(world["data"]))
    got = evaluate(load_run(run_dir), split, "test", decoder="hybrid", batch_size=3, num_beams=10)
    rec = Recommender.from_run(run_dir, num_beams=10)
    served = [rec.recommend([split.test_history(int(r))], k=10, decoder="hybrid", exclude_history=False)[0]
              for r in got.user_rows]  # loop over users
    np.testing.assert_array_equal(got.ranks, [_rank(s.items, split.test_targets[r]) for s, r in zip(served, got.user_rows, strict=True)])


def _rank(items: np.ndarray, target: int) -> int:
    return int(np.flatnonzero(items == target)[0]) if (items == target).any() else -1


def test_cli_evaluate_exclude_history_writes_beside_the_protocol_file(world: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert main(["evaluate", "--run", str(run), "--decoder", "exact", "--no-progress"]) == 0
    assert main(["evaluate", "--run", str(run), "--decoder", "exact", "--exclude-history", "--no-progress"]) == 0
    assert "histories excluded" in capsys.readouterr().out
    protocol = json.loads((run / "metrics_test_exact.json").read_text())  # (another decoder than the run's: its own
    unseen = json.loads((run / "metrics_test_exact_unseen.json").read_text())  # file, beside the protocol's)
    assert protocol["exclude_history"] is False and unseen["exclude_history"] is True
    assert protocol["users_evaluated"] == unseen["users_evaluated"] > 0
    split = leave_one_out(load_dataset(world["data"]))  # the flag reaches the evaluation: its metrics, not the protocol's
    want = evaluate(load_run(run), split, "test", decoder="exact", exclude_history=True).metrics
    assert unseen["ndcg@10"] == pytest.approx(want["ndcg@10"]) and unseen["ndcg@10"] > protocol["ndcg@10"]


def test_read_paths_write_nothing_and_leave_the_run_as_it_was(world: dict[str, Path]) -> None:
    files = _files(world["run"])
    run = load_run(world["run"])
    run.model.train()  # a caller's run in training mode: evaluation must decode a copy in eval mode
    tree = run.tree
    split = leave_one_out(load_dataset(world["data"]))
    for decoder in SERVED:
        r = evaluate(run, split, "test", decoder=decoder, device="cpu")
        assert r.invalid_items == 0 and r.duplicate_items == 0
    assert run.model.training and run.tree is tree
    Recommender(run).recommend(HISTORIES, k=3, decoder="hybrid")
    recommend(run, HISTORIES, k=3, decoder="hybrid")
    assert run.model.training and run.tree is tree
    assert _files(world["run"]) == files  # nothing written: no metrics, no hybrid.json


def test_a_run_without_a_fusion_says_to_choose_one(world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    old = tmp_path / "old"
    shutil.copytree(world["run"], old)
    (old / HYBRID_FILE).unlink()  # as a run trained before training chose the fusion
    with pytest.raises(ValueError, match=f"semid choose-fusion --run {old}"):
        Recommender.from_run(old, decoder="hybrid")
    rec = Recommender.from_run(old)  # the other decoders serve; hybrid says what to do
    assert "hybrid" in rec.unavailable and "beam" in rec.decoders
    with pytest.raises(ValueError, match="semid choose-fusion"):
        rec.recommend(HISTORIES, k=3, decoder="hybrid")
    assert main(["recommend", "--run", str(old), "--history", "3,4,5", "--decoder", "hybrid"]) == 2
    assert "semid choose-fusion" in capsys.readouterr().err
    for flag in ("--num-candidates", "--num-beams", "--batch-size", "--users"):  # refused before anything is read
        with pytest.raises(SystemExit) as e:
            main(["choose-fusion", "--run", str(old), flag, "0"])
        assert e.value.code == 2 and "must be a positive int, got '0'" in capsys.readouterr().err and not (old / HYBRID_FILE).exists()
    with pytest.raises(ValueError, match="`num_candidates` must be a positive int, got 0"):
        choose_run_fusion(load_run(old), num_candidates=0)
    other = tmp_path / "other_data"  # the run's data with one user's history changed: refused, nothing written
    shutil.copytree(load_run(old).data_dir, other)
    lines = (other / "sequences.txt").read_text().splitlines()
    (other / "sequences.txt").write_text("\n".join([" ".join(lines[0].split()[:-1]), *lines[1:]]) + "\n")
    assert main(["choose-fusion", "--run", str(old), "--data", str(other)]) == 2
    assert "not the data the run" in capsys.readouterr().err and not (old / HYBRID_FILE).exists()
    assert main(["choose-fusion", "--run", str(tmp_path / "typo")]) == 2 and not (tmp_path / "typo").exists()
    assert main(["choose-fusion", "--run", str(old)]) == 0
    assert (old / HYBRID_FILE).is_file()
    assert len(Recommender.from_run(old, decoder="hybrid").recommend(HISTORIES, k=3)) == len(HISTORIES)
    users = json.loads((old / HYBRID_FILE).read_text())["validation_users"]
    with caplog.at_level("WARNING", logger="generator.runs.fusion_store"):
        assert main(["choose-fusion", "--run", str(old), "--users", "3"]) == 0  # a smaller sample replaces it: said
    assert (f"replacing a fusion chosen on {users['fit']} + {users['select']} validation users with one chosen on 3 + 3"
            in caplog.text)
    caplog.clear()
    stale = {**json.loads((old / HYBRID_FILE).read_text()), "checkpoint_sha256": "0" * 64,
             "validation_users": {"fit": 100, "select": 100}}  # chosen for another checkpoint: replacing it is no loss
    (old / HYBRID_FILE).write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="generator.runs.fusion_store"):
        assert main(["choose-fusion", "--run", str(old), "--users", "3"]) == 0
    assert "replacing a fusion" not in caplog.text


def test_titles_come_from_the_runs_own_items_only(world: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``data=`` (a moved copy of the run's dataset folder) serves titles and asins; a folder whose items.jsonl is
    another's (here one title changed) is refused by name: its titles would name other items."""
    moved = shutil.copytree(world["data"], tmp_path / "moved")
    assert Recommender.from_run(world["run"], data=moved).titles([1]) == Recommender.from_run(world["run"]).titles([1])
    other = shutil.copytree(world["data"], tmp_path / "retitled")
    lines = (other / "items.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (other / "items.jsonl").write_text("\n".join([json.dumps({**first, "title": "another item"}), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="retitled: its items.jsonl .* is not the run .*titles and asins would name other"):
        Recommender.from_run(world["run"], data=other)
    assert main(["recommend", "--run", str(world["run"]), "--history", "3,4", "--data", str(other)]) == 2
    assert "would name other items" in capsys.readouterr().err


def test_version_names_the_checkpoint_and_the_ids(world: dict[str, Path], tmp_path: Path) -> None:
    v = Recommender.from_run(world["run"]).version
    assert v == Recommender.from_run(world["run"]).version and v.startswith("ckpt-") and ".ids-" in v
    other = tmp_path / "other"
    shutil.copytree(world["run"], other)
    assert Recommender.from_run(other).version == v  # the same checkpoint and IDs
    ckpt_path = load_run(other).checkpoint
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["global_step"] += 1
    torch.save(with_integrity(ckpt), ckpt_path)
    v2 = Recommender.from_run(other, decoders=["beam"]).version
    assert v2.split(".ids-")[1] == v.split(".ids-")[1].split(".fusion-")[0] and v2.split(".ids-")[0] != v.split(".ids-")[0]
    assert ".fusion-" not in v2  # (a Recommender without the hybrid: the fusion decides none of its answers)


def test_version_names_the_hybrids_fusion(world: dict[str, Path], tmp_path: Path) -> None:
    """Another fusion in hybrid.json changes the hybrid's answers, so the version too (a reload once answered the new
    rankings under the old version)."""
    other = Path(shutil.copytree(world["run"], tmp_path / "other"))
    v = Recommender.from_run(other).version
    stored = json.loads((other / HYBRID_FILE).read_text())
    assert ".fusion-" in v and stored["fusion"] != "rrf"
    (other / HYBRID_FILE).write_text(json.dumps({**stored, "fusion": "rrf", "params": {"k0": 60.0}}))
    v2 = Recommender.from_run(other).version
    assert v2.split(".fusion-")[0] == v.split(".fusion-")[0] and v2 != v
    assert Recommender.from_run(other, alpha=0.3).version not in (v, v2)  # a blend weight given at load


def test_catalogue_maps(world: dict[str, Path]) -> None:
    rec = Recommender.from_run(world["run"], decoders=["beam"])
    assert rec.titles([3, 1]) == ["item 3", "item 1"]
    asins = rec.asins([3, 1])
    np.testing.assert_array_equal(rec.item_ids(asins), [3, 1])
    with pytest.raises(ValueError, match="unknown asin 'nope'"):
        rec.item_ids(["nope"])
    with pytest.raises(ValueError, match="unknown item id 0"):
        rec.titles([0])


def test_argument_errors_name_the_argument(world: dict[str, Path]) -> None:
    rec = Recommender.from_run(world["run"], decoders=["beam"])
    with pytest.raises(ValueError, match=r"`histories\[1\]` holds unknown item id 999"):
        rec.recommend([[1], [2, 999]], k=3)
    with pytest.raises(ValueError, match=r"`histories\[0\]` is empty"):
        rec.recommend([[]], k=3)
    with pytest.raises(ValueError, match="`k`"):
        rec.recommend([[1]], k=NUM_ITEMS + 1)
    with pytest.raises(ValueError, match="was not loaded"):
        rec.recommend([[1]], k=3, decoder="exact")


def test_concurrent_calls_give_the_sequential_rankings(world: dict[str, Path]) -> None:
    rec = Recommender.from_run(world["run"])
    jobs = [(d, [h]) for d in SERVED for h in HISTORIES] * 3
    want = [rec.recommend(h, k=5, decoder=d)[0].items for d, h in jobs]
    got: list[np.ndarray | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(part: range) -> None:
        try:
            for i in part:  # each thread serves its share of the calls
                d, h = jobs[i]
                got[i] = rec.recommend(h, k=5, decoder=d)[0].items
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(t, len(jobs), 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_histories_as_the_backbone_reads_them_are_unchanged(world: dict[str, Path]) -> None:
    run = load_run(world["run"])
    (b,) = history_batches(run, [np.asarray([3, 4, 5])], None, 8)
    assert isinstance(b, Histories) and b.tokens.tolist() == [(run.ids.rows_of(np.array([3, 4, 5])) + 1).tolist()]


def test_a_stored_levels_fusion_serves_from_the_run_folder(world: dict[str, Path], tmp_path: Path) -> None:
    """The per-level fusion read from RUN/hybrid.json: the loaded run ranks as the fusion does on the run's parts."""
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir)
    stored = json.loads((run_dir / HYBRID_FILE).read_text())
    L = load_run(run_dir).model.layout.num_levels
    stored["fusion"], stored["params"] = "levels", {"weights": [0.2] + [0.8] * (L - 1)}
    (run_dir / HYBRID_FILE).write_text(json.dumps(stored))
    got = Recommender.from_run(run_dir, decoder="hybrid").recommend(HISTORIES, k=5, exclude_history=False)
    run = load_run(run_dir)
    shared = decoders_for(run, ["exact"])["exact"].shared
    for batch, g in zip(history_batches(run, [np.asarray(h) for h in HISTORIES], None, 1), got, strict=True):
        rows, _ = fuse("levels", stored["params"], shared.history_parts(batch, levels=True), 5)
        assert g.items.tolist() == shared.item_ids[rows[0]].tolist()
    stored["params"] = {"weights": [0.5] * (L + 1)}  # a hand edit: the file is named when the run loads
    (run_dir / HYBRID_FILE).write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=rf"{HYBRID_FILE}: corrupt hybrid fusion file .*{L + 1} weights for IDs of {L} code levels"):
        Recommender.from_run(run_dir, decoder="hybrid")


def test_user_ids_a_run_cannot_read_are_said_not_dropped_in_silence(world: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    rec = Recommender.from_run(world["run"])  # the causal design: histories only, no user tokens
    plain = rec.recommend(HISTORIES, k=4, decoder="beam")
    with caplog.at_level("WARNING", logger="generator.runs.recommender"):
        given = rec.recommend(HISTORIES, k=4, decoder="beam", user_ids=list(range(len(HISTORIES))))
    assert "trained without user tokens" in caplog.text and "are not used" in caplog.text
    assert all(np.array_equal(a.items, b.items) for a, b in zip(given, plain, strict=True))


def test_a_fusion_chosen_for_another_candidate_count_is_served_with_that_count(world: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    """`semid choose-fusion --num-candidates 10` stores a fusion for C = 10: the Recommender, `semid recommend` and
    `semid evaluate` then serve the hybrid with C = 10 (they were fixed at 50 and found no fusion)."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    assert main(["choose-fusion", "--run", str(run), "--num-candidates", "10"]) == 0
    assert json.loads((run / HYBRID_FILE).read_text())["num_candidates"] == 10
    rec = Recommender.from_run(run, decoder="hybrid")
    assert rec.num_candidates == 10 and len(rec.recommend(HISTORIES, k=5)[0].items) == 5
    assert main(["recommend", "--run", str(run), "--history", "1,2,3", "-k", "3", "--decoder", "hybrid"]) == 0
    assert main(["evaluate", "--run", str(run), "--split", "test", "--decoder", "hybrid", "--no-progress"]) == 0
    assert fusion_store.stored_candidates(load_run(world["run"])) == min(50, NUM_ITEMS)  # chosen by `semid train`
    record = json.loads((run / HYBRID_FILE).read_text())
    (run / HYBRID_FILE).write_text(json.dumps({**record, "checkpoint_sha256": "0" * 64}))  # chosen for another one
    assert fusion_store.stored_candidates(load_run(run)) == 50  # a stale file's C is not served



@pytest.mark.parametrize("decoder", ["exact", "dense"])
def test_semid_recommend_refuses_beams_for_a_decoder_that_has_none(world: dict[str, Path], decoder: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--num-beams` with a decoder that searches no beams changed nothing: refused, naming the flag (the Python API
    takes one beam count for every decoder, as evaluate does)."""
    base = ["recommend", "--run", str(world["run"]), "--history", "1,2,3", "-k", "3", "--decoder", decoder]
    assert main([*base, "--num-beams", "6"]) == 2
    assert f"--num-beams 6: decoder '{decoder}' searches no beams" in capsys.readouterr().err
    assert main(base) == 0


def test_semid_evaluate_refuses_beams_for_dense_and_names_none(world: dict[str, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["evaluate", "--run", str(world["run"]), "--split", "test", "--decoder", "dense", "--no-progress"]
    assert main([*base, "--num-beams", "6"]) == 2
    assert "--num-beams 6: decoder 'dense' searches no beams" in capsys.readouterr().err
    assert main(base) == 0 and " beams" not in capsys.readouterr().out.splitlines()[0]
    assert main([*base[:-2], "beam", "--no-progress", "--num-beams", "12"]) == 0
    assert "12 beams, decoder" in capsys.readouterr().out


def test_each_history_of_a_call_is_decoded_with_the_beams_it_gets_alone(world: dict[str, Path]) -> None:
    """One long history gave every history of a call its beams (decoded with more beams than alone: 3x the work on 64
    Beauty users, and top-10s that hung on the batch-mates: 55% of them matched, a helper's review). Each history is
    decoded with its own bucket (``call_beams``), as the service's batcher does."""
    import generator.runs.recommender as recommender_module
    from generator.runs.exclusion import with_beams

    rec = Recommender.from_run(world["run"])
    histories = [list(range(1, 15)), *HISTORIES]  # 14 distinct items: 24 asked for, more than the 20 beams loaded
    spied: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recommender_module, "with_beams", lambda dec, M, **kw: spied.append(M) or with_beams(dec, M, **kw))
        rec.recommend(histories, k=10, decoder="beam")
    assert sorted(spied) == [20, 40]  # the long history with 40 beams, the rest with the 20 loaded (was: all with 40)
    for decoder in ("beam", "hybrid", "exact"):
        together = rec.recommend(histories, k=10, decoder=decoder)
        for h, got in zip(histories, together, strict=True):
            alone = rec.recommend([h], k=10, decoder=decoder)[0]
            assert got.items.tolist() == alone.items.tolist(), (decoder, h)
            np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-5, atol=1e-5)


def test_hybrid_metrics_record_their_fusion_and_a_new_choice_retires_those_of_another(world: dict[str, Path],
                                                                                        tmp_path: Path) -> None:
    """Hybrid metrics did not say which stored fusion they measured, so after `semid choose-fusion` picked another
    they stayed under the same name, describing a fusion no longer served (a helper's audit). They record
    hybrid.json's sha256, and a new choice removes those of another fusion (not the beam's, not an alpha's)."""
    import hashlib

    from generator.runs.evaluate import evaluate_run
    from generator.runs.fusion_store import retire_hybrid_metrics

    run_dir = Path(shutil.copytree(world["run"], tmp_path / "run"))

    now = hashlib.sha256((run_dir / HYBRID_FILE).read_bytes()).hexdigest()
    hybrid = evaluate_run(run_dir, "test", decoder="hybrid", max_users=4)
    beam = evaluate_run(run_dir, "test", decoder="beam", max_users=4)
    blend = evaluate_run(run_dir, "test", decoder="hybrid", alpha=0.5, max_users=4)
    assert hybrid["hybrid_sha256"] == now and "hybrid_sha256" not in beam and "hybrid_sha256" not in blend
    other = Path(hybrid["file"]).with_name("metrics_test_hybrid_other.json")
    other.write_text(json.dumps({**{k: v for k, v in hybrid.items() if k != "file"}, "hybrid_sha256": "0" * 64}))
    assert retire_hybrid_metrics(run_dir) == [other.name]  # another fusion's: gone; the rest kept
    assert Path(hybrid["file"]).exists() and Path(beam["file"]).exists() and Path(blend["file"]).exists()
    assert main(["choose-fusion", "--run", str(run_dir), "--seed", "5"]) == 0
    again = hashlib.sha256((run_dir / HYBRID_FILE).read_bytes()).hexdigest()
    assert Path(hybrid["file"]).exists() == (again == now) and Path(beam["file"]).exists()
