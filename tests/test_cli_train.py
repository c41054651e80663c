"""`semid train` -> `semid evaluate` -> `semid recommend` on a tiny dataset, resume, and the errors users meet."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generator.decoding.protocol import Histories, Ranking
from generator.models.checkpoint import with_integrity
from generator.runs.folder import load_run
from generator.runs.recommend import recommend
from semid.ids import SemanticIDs
from semid_cli import main
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset

TRAIN_FLAGS = [
    "--preset", "cpu", "--max-epochs", "2", "--batch-size", "16", "--user-tokens", "32", "--val-users", "all",
    "--num-beams", "10", "--warmup-steps", "4", "--lr", "3e-3", "--no-progress", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = write_random_dataset(root / "data")
    ids_dir = root / "ids"
    ids_dir.mkdir()
    write_ids(ids_dir / "semantic_ids.npz")
    run = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--data", str(data), "--ids", str(ids_dir), "--out", str(run), *TRAIN_FLAGS]) == 0
    return {"data": data, "ids": ids_dir, "run": run, "printed": printed.getvalue()}


def test_train_writes_the_run_folder(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = trained["run"]
    for rel in ("config.yaml", "semantic_ids.npz", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics_valid.json"):
        assert (run / rel).is_file(), rel
    assert list((run / "logs").rglob("metrics.csv"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["best_checkpoint"] == "checkpoints/best.ckpt" and config["epochs"] == 2
    assert SemanticIDs.load(run / "semantic_ids.npz") == SemanticIDs.load(trained["ids"] / "semantic_ids.npz")
    valid = json.loads((run / "metrics_valid.json").read_text())
    assert valid["users_evaluated"] == 24 and valid["invalid_items"] == 0
    # the best checkpoint's score on the validation sample (here: all users) is what the final evaluation finds
    assert valid["ndcg@10"] == pytest.approx(config["best_score"]["val/ndcg@10"], abs=1e-6)
    # `--val-users all` is recorded as given: it parses to None, and was dropped as "not given" (1,000 users sampled)
    assert config["train"]["val_users"] is None and config["train"]["final_val_users"] is None
    # and is said as such: "on the validation sample" where every user was read (a helper's audit)
    assert re.search(r"best checkpoint .*\(val/\w*ndcg@10 on all validation users: ", trained["printed"]), trained["printed"]
    # the seconds printed are the training's, as config.yaml records them (it printed the whole command's: 157 s
    # for a `--max-time 00:00:05` whose config said 8), then the whole with the validation and fusion after it
    said = re.search(r"trained .* steps, (\d+) s \(config.yaml's train_seconds; (\d+) s with", trained["printed"])
    assert said, trained["printed"]
    assert int(said[1]) == round(config["train_seconds"]) and int(said[2]) >= int(said[1])


class Recording:
    """A decoder that passes every call through and keeps the rankings it returned."""

    def __init__(self, decoder, rankings: list[Ranking]) -> None:  # noqa: ANN001
        self.decoder, self.rankings = decoder, rankings
        self.name, self.score, self.leaves = decoder.name, decoder.score, decoder.leaves

    def __call__(self, histories: Histories, k: int) -> Ranking:
        res = self.decoder(histories, k)
        self.rankings.append(res)
        return res


def test_evaluate_prints_and_writes_metrics(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import generator.runs.evaluate as ev

    run = trained["run"]
    assert main(["evaluate", "--run", str(run), "--split", "test", "--num-beams", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Recall@10" in out and "invalid items 0" in out
    m = json.loads((run / "metrics_test.json").read_text())
    assert set(m) >= {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "users_evaluated", "invalid_items", "seconds"}
    assert m["users_evaluated"] == 24 and m["invalid_items"] == 0 and m["duplicate_items"] == 0
    assert 0 <= m["ndcg@10"] <= m["recall@10"] <= 1
    # the reference decoder finds the same ranking as the fast one: the same items, in the same order, same scores
    rankings: dict[str, list[Ranking]] = {}
    decoders_for = ev.decoders_for
    monkeypatch.setattr(ev, "decoders_for", lambda *a, **kw: {
        n: Recording(d, rankings.setdefault(n, [])) for n, d in decoders_for(*a, **kw).items()})
    metrics = {}
    for decoder in ("beam", "generate"):
        argv = ["evaluate", "--run", str(run), "--split", "test", "--num-beams", "10", "--decoder", decoder, "--max-users", "10"]
        assert main([*argv, "--no-progress"]) == 0
        metrics[decoder] = json.loads((run / "metrics_test_sample10.json").read_text())  # a sample: not metrics_test.json
        assert metrics[decoder]["users_evaluated"] == 10
    fast, ref = (Ranking.cat(r[0], r[1:]) for r in (rankings["beam"], rankings["generate"]))
    assert fast.items.shape == ref.items.shape == (10, 10)
    assert fast.items.tolist() == ref.items.tolist()
    torch.testing.assert_close(fast.scores, ref.scores, atol=1e-4, rtol=0)
    assert torch.equal(fast.codes, ref.codes)
    for key in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert metrics["beam"][key] == pytest.approx(metrics["generate"][key], abs=1e-9)


def test_recommend_prints_titles_and_json(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = trained["run"]
    assert main(["recommend", "--run", str(run), "--history", "3,4,5", "-k", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and "item" in lines[1]
    for spaced in ("3 4 5", "3, 4, 5", " 3,4 5 "):  # spaces separate ids as commas do (they once joined "3 4 5" into 345)
        assert main(["recommend", "--run", str(run), "--history", spaced, "-k", "5"]) == 0
        assert capsys.readouterr().out.strip().splitlines() == lines
    assert main(["recommend", "--run", str(run), "--history", "3,4,5", "-k", "10", "--json", "--user", "7"]) == 0
    rows = json.loads(capsys.readouterr().out)["items"]
    items = [r["item_id"] for r in rows]
    scores = [r["score"] for r in rows]
    assert len(set(items)) == 10 and all(1 <= i <= NUM_ITEMS for i in items)
    assert scores == sorted(scores, reverse=True) and all(r["title"] == f"item {r['item_id']}" for r in rows)


def test_recommend_library_agrees_across_decoders(trained: dict[str, Path]) -> None:
    r = load_run(trained["run"])
    histories = [[1, 2, 3], [40], list(range(1, 31))]
    fast = recommend(r, histories, k=8, num_beams=12, decoder="beam", exclude_history=False)
    ref = recommend(r, histories, k=8, num_beams=12, decoder="generate", exclude_history=False)
    for a, b in zip(fast, ref, strict=True):
        assert a.items.tolist() == b.items.tolist()
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        assert (np.diff(a.scores) <= 1e-6).all() and (a.scores <= 0).all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--history", "3,4,999"], "unknown item id 999"),
        (["--history", ""], "is empty"),
        (["--history", "3", "-k", str(NUM_ITEMS + 1)],
         f"`-k` must be an int in [1, {NUM_ITEMS}] (the catalogue size), got {NUM_ITEMS + 1}"),
        (["--history", "3", "-k", "5", "--num-beams", "4", "--no-exclude-history"],
         f"`--num-beams` must be an int in [k=5, {NUM_ITEMS}] (k to the catalogue size), got 4"),
        (["--history", "3", "-k", "5", "--num-beams", "5"],  # the history left out: k + 1 beams at least
         f"`--num-beams` must be an int in [k=6, {NUM_ITEMS}] (k to the catalogue size), got 5: k (5) plus the 1 distinct"),
        (["--history", "3", "-k", "0"], f"`-k` must be an int in [1, {NUM_ITEMS}] (the catalogue size), got 0"),
    ],
)
def test_recommend_errors(trained: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["recommend", "--run", str(trained["run"]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_recommend_library_errors(trained: dict[str, Path]) -> None:
    r = load_run(trained["run"])
    with pytest.raises(ValueError, match="`histories` must be a non-empty list"):
        recommend(r, [])
    with pytest.raises(ValueError, match=r"`histories\[1\]` is empty"):
        recommend(r, [[1], []])
    with pytest.raises(ValueError, match="`user_ids` must hold one id per history"):
        recommend(r, [[1], [2]], user_ids=[1])
    from generator.runs.recommender import Recommender

    rec = Recommender(r)  # ids that numpy would coerce are refused by name (5.9 and "5" were user 5, True user 1)
    for bad in ([5.9], ["5"], [True], ["alice"], [2**70], [None]):
        with pytest.raises(ValueError, match="`user_ids` must be a list of int ids"):
            rec.recommend([[1]], user_ids=bad)
    assert rec.recommend([[1]], user_ids=np.array([5], dtype=np.int32))[0].items.size == 10
    for bad in ("12", [1.7], [True], ["5"], [2**70], 5, [[1, 2]]):  # ("12" was items 1 and 2)
        with pytest.raises(ValueError, match="`items` must be a list of int ids"):
            rec.titles(bad)
    assert rec.titles(iter([2, 1])) == rec.titles([2, 1]) and rec.item_ids(rec.asins([3]))[0] == 3
    assert rec.item_ids(rec.asins([3])[0]).tolist() == [3]  # one asin, not its characters
    for size in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
            rec.recommend([[1]], batch_size=size)


def test_train_refuses_to_overwrite_and_bad_options(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--data", str(trained["data"]), "--ids", str(trained["ids"])]
    assert main([*base, "--out", str(trained["run"]), *TRAIN_FLAGS]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main([*base, "--out", str(trained["run"].parent / "no_run_here"), "--resume", *TRAIN_FLAGS]) == 2
    assert "no_run_here: nothing to resume (no run here: no config.yaml); leave out --resume" in capsys.readouterr().err
    from generator.runs.options import TrainOptions
    from generator.runs.train import train_run

    with pytest.raises(FileNotFoundError, match="no_run_here: nothing to resume"):  # the library says the same
        train_run(trained["data"], trained["ids"] / "semantic_ids.npz", trained["run"].parent / "no_run_here",
                  TrainOptions(), resume=True)
    assert main([*base, "--out", str(trained["run"].parent / "x"), "--max-time", "90min"]) == 2
    assert "`--max-time` must be HH:MM:SS" in capsys.readouterr().err  # (the flag, not the option's field `max_time`)
    for flags, message in ((["--max-time", "00:00:00"], "`--max-time` must be a positive duration"),  # (no checkpoint:
                           (["--max-steps", "0"], "`--max-steps` must be a positive int, or -1"),  # a folder no resume
                           (["--max-steps", "-5"], "`--max-steps` must be a positive int, or -1"),  # could continue)
                           (["--seed", "-1"], "`--seed` must be a non-negative int"),
                           (["--preset", "cpu", "--num-workers", "-1"], "`--num-workers` must be a non-negative int"),
                           (["--num-workers", "2"], "`--num-workers` is for the T5 presets' data loader"),  # (ignored)
                           (["--val-users", "0"], "`--val-users` must be a positive int"),  # (named `max_users`, late)
                           # T5 without a dense head: what needs one was ignored, or failed after the folder was made
                           (["--preset", "cpu", "--objective", "dense"], "`--objective` 'dense' needs a dense head"),
                           (["--preset", "cpu", "--dense-option", "dim=64"], "`--dense-option` configure the dense head"),
                           (["--preset", "cpu", "--decoder", "dense"], "`--decoder` 'dense' validates the dense head"),
                           (["--preset", "cpu", "--decoder", "exact"], "a T5 run selects checkpoints with decoder 'beam', "
                            "'generate' or (with a dense head) 'dense', got 'exact' (decoder 'exact' is for causal runs)"),
                           (["--target", "title", "--dense-option", "dim=64"], "a title run has none"),
                           (["--lr", "inf"], "`--lr` must be a finite number > 0")):
        assert main([*base, "--out", str(trained["run"].parent / "x"), *flags]) == 2
        assert message in capsys.readouterr().err and not (trained["run"].parent / "x").exists()
    a_file = trained["run"].parent / "a_file.txt"
    a_file.write_text("not a folder")
    assert main([*base, "--out", str(a_file / "x"), *TRAIN_FLAGS]) == 2  # an error naming it, not a traceback
    assert "a_file.txt" in capsys.readouterr().err
    for argv in (["distill", "--run", str(trained["run"]), "--out", str(a_file.parent / "d"), "--threads", "0"],
                 ["combine", "--run", str(trained["run"]), "--run", str(trained["run"]), "--out", str(a_file.parent / "c"),
                  "--threads", "0"],
                 ["evaluate", "--run", str(trained["run"]), "--seed", "-1"],
                 ["evaluate", "--run", str(trained["run"]), "--seed", str(2**32)]):  # (numpy's generators refuse it)
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "must be a" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(trained["run"].parent / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def _copy_with_best_score(trained: dict[str, Path], run: Path, score: float) -> tuple[str, int]:
    """A copy of the trained run in another folder, its recorded best score set to ``score``: (the callback's state
    key, the global step of its last.ckpt)."""
    import shutil

    shutil.copytree(trained["run"], run)
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    (key,) = (k for k in last["callbacks"] if k.startswith("ModelCheckpoint"))
    state = last["callbacks"][key]  # the score the next epoch must beat is kth_value (save_top_k 1: the best)
    state["best_model_score"] = state["kth_value"] = torch.tensor(score)
    state["best_k_models"] = dict.fromkeys(state["best_k_models"], torch.tensor(score))
    torch.save(with_integrity(last), run / "checkpoints/last.ckpt")
    (run / "hybrid.json").write_text('{"alpha": 0.5}')
    assert (run / "metrics_valid.json").is_file()
    return key, last["global_step"]


@pytest.mark.parametrize("best", ["kept", "beaten"])
def test_resume_continues_the_same_run(trained: dict[str, Path], tmp_path: Path, best: str) -> None:
    """A copied folder resumes with its best score: an unbeatable one keeps best.ckpt and what describes it (Lightning
    alone forgets the score once the folder moved, and takes the first epoch after the resume as the best); one that
    every epoch beats gives a new best.ckpt, and the files that described the old one go."""
    run = tmp_path / "run"
    key, step_before = _copy_with_best_score(trained, run, 1.0 if best == "kept" else -1.0)
    best_bytes = (run / "checkpoints/best.ckpt").read_bytes()
    argv = ["train", "--data", str(trained["data"]), "--ids", str(run), "--out", str(run), "--resume", "--max-epochs", "3", "--final-val-users", "0"]
    assert main(argv) == 0
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert last["epoch"] == 3 and last["global_step"] > step_before  # saved at the end: 3 epochs done
    state = last["callbacks"][key]  # under the key Lightning's own callback uses
    assert Path(state["best_model_path"]) == run / "checkpoints/best.ckpt" and state["dirpath"] == str(run / "checkpoints")
    if best == "kept":
        assert float(state["best_model_score"]) == 1.0 and (run / "checkpoints/best.ckpt").read_bytes() == best_bytes
        assert (run / "metrics_valid.json").is_file() and (run / "hybrid.json").is_file()  # they still describe it
        return
    assert float(state["best_model_score"]) > -1.0 and (run / "checkpoints/best.ckpt").read_bytes() != best_bytes
    # what described the old checkpoint is gone (no final validation ran to write a new one)
    assert not list(run.glob("metrics_*.json")) and not (run / "hybrid.json").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16  # kept from the first run
    assert main([*argv[:-4], "--batch-size", "8"]) == 2  # what is trained cannot change on resume
    assert main([*argv[:-4], "--num-beams", "12"]) == 2  # nor how checkpoints are scored on validation
    assert main([*argv[:-4], "--val-users", "5"]) == 2


def test_a_run_with_swapped_semantic_ids_is_refused(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    write_ids(run / "semantic_ids.npz", seed=1)  # same sizes, other codes
    with pytest.raises(ValueError, match="trained with other semantic IDs"):
        load_run(run)
    ids = SemanticIDs.load(run / "semantic_ids.npz")
    SemanticIDs.from_codes(ids.codes[:, :3], (4, 4, 8), extra_level_size=8).save(run / "semantic_ids.npz")
    assert main(["recommend", "--run", str(run), "--history", "1"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_demo_pipeline_trains_evaluates_and_shows(tmp_path: Path) -> None:
    from generator.runs.demo import train_evaluate_show

    data = write_random_dataset(tmp_path / "data")
    report = train_evaluate_show(data, write_ids(tmp_path / "ids.npz"), tmp_path / "run", max_time=None, max_epochs=1, eval_users=10, progress=False)
    assert report.test["users_evaluated"] == 10 and report.test["invalid_items"] == 0
    assert len(report.shown) == 3 and all(len(u.recommendations) == 10 for u in report.shown)
    assert "top-10" in report.text and (tmp_path / "run" / "metrics_test_sample10.json").is_file()


def test_evaluate_fails_on_a_broken_decoder(
    trained: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import generator.runs.evaluate as ev
    from generator.decoding.protocol import LOG_LIKELIHOOD

    class Duplicating:  # every slot the same item, and not one of the catalogue
        name, score, leaves, num_beams = "beam", LOG_LIKELIHOOD, True, 12

        def __call__(self, histories: Histories, k: int) -> Ranking:
            items = torch.full((histories.tokens.shape[0], k), int(NUM_ITEMS) + 10**6)
            return Ranking(items, torch.zeros(items.shape), torch.zeros(*items.shape, 1, dtype=torch.long), LOG_LIKELIHOOD, True)

    monkeypatch.setattr(ev, "decoders_for", lambda run, names, **kw: {n: Duplicating() for n in names})
    out_file = trained["run"] / "metrics_broken.json"
    monkeypatch.setattr(ev, "metrics_file", lambda run, which, sample=None, unseen=False, variant=None: out_file)
    assert main(["evaluate", "--run", str(trained["run"]), "--split", "test", "--num-beams", "12", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "invalid" in err and "duplicate" in err and "broken" in err
    assert not out_file.exists()


def test_a_missing_best_checkpoint_is_an_error_not_a_fallback(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "checkpoints/best.ckpt").unlink()  # last.ckpt is still there, and must not be used instead
    assert main(["evaluate", "--run", str(run), "--num-beams", "12", "--no-progress"]) == 2
    assert "best.ckpt" in capsys.readouterr().err


def test_a_run_without_validation_says_its_checkpoint_was_not_selected(
    trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    assert json.loads((trained["run"] / "metrics_valid.json").read_text())["selected_on_validation"] is True
    run = tmp_path / "run"
    flags = [f for f in TRAIN_FLAGS if f not in ("--max-epochs", "2")] + ["--max-epochs", "1", "--val-every", "5"]
    argv = ["train", "--data", str(trained["data"]), "--ids", str(trained["ids"]), "--out", str(run), *flags]
    assert main(argv) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["best_checkpoint"] == "checkpoints/last.ckpt" and config["selected_on_validation"] is False
    with caplog.at_level(logging.WARNING, logger="generator.runs.evaluate"):
        assert main(["evaluate", "--run", str(run), "--num-beams", "10", "--no-progress"]) == 0
    assert json.loads((run / "metrics_test.json").read_text())["selected_on_validation"] is False
    assert "not selected on validation" in caplog.text


def test_train_options_from_dict_rejects_unknown_keys() -> None:
    from generator.runs.options import TrainOptions

    assert TrainOptions.from_dict({"batch_size": 8}).batch_size == 8
    with pytest.raises(ValueError, match="batchsize"):
        TrainOptions.from_dict({"batchsize": 8})


def test_recommend_checks_all_histories_and_warns_without_a_user(trained: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    import logging

    r = load_run(trained["run"])
    with pytest.raises(ValueError, match=r"`histories\[2\]` holds unknown item id 999"):
        recommend(r, [[3, 4], [5], [6, 999, 7]], k=5)
    with caplog.at_level(logging.WARNING, logger="generator.runs.recommend"):
        recommend(r, [[3, 4], [5]], k=5)
    warnings = [rec for rec in caplog.records if "user tokens" in rec.getMessage()]
    assert len(warnings) == 1 and "--user" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="generator.runs.recommend"):
        recommend(r, [[3, 4], [5]], k=5, user_ids=[1, 2])
    assert not caplog.records


@pytest.mark.parametrize(
    ("flags", "cuda", "message"),
    [
        (["--batch-size", "0"], 0, "`--batch-size` must be a positive int (users decoded together), got 0"),
        (["--batch-size", "-4"], 0, "`--batch-size` must be a positive int (users decoded together), got -4"),
        (["--device", "cuda"], 0, "`--device` is 'cuda', but CUDA is not available on this machine"),
        (["--device", "cuda:0"], 0, "pass --device cpu, or leave --device out"),
        (["--device", "cuda:2"], 2, "`--device` is 'cuda:2', but this machine has 2 CUDA device(s): cuda:0..cuda:1"),
        (["--device", "gpu"], 0, "`--device` must be a torch device such as cpu, cuda or cuda:1, got 'gpu'"),
    ],
)
def test_evaluate_checks_batch_size_and_device_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], cuda: int, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    # checked before the run is read: the folder need not exist for the argument error to be the one reported
    assert main(["evaluate", "--run", str(tmp_path / "no-run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "not a run folder" not in err


def test_train_on_users_too_short_to_split_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_random_dataset(tmp_path / "data")
    (data / "sequences.txt").write_text("".join(f"{u} {u} {u + 1}\n" for u in range(1, 9)))  # two items each
    write_ids(tmp_path / "ids.npz")
    argv = ["train", "--data", str(data), "--ids", str(tmp_path / "ids.npz"), "--out", str(tmp_path / "run"), *TRAIN_FLAGS]
    assert main(argv) == 2  # (it was "need at least one array to concatenate")
    assert "sequences.txt: no user has 3 or more items" in capsys.readouterr().err


def test_numpy_integers_are_taken_where_ints_are(trained: dict[str, Path]) -> None:
    from generator.runs.batches import history_batches
    from generator.runs.decoders import choose_run_fusion, decoders_for
    from generator.runs.evaluate import evaluate_run
    from generator.runs.recommender import Recommender

    # a count read from an array (np.int64) was refused: "`k` must be an int in [1, N] ..., got np.int64(5)"
    r = load_run(trained["run"])
    want = recommend(r, [[3, 4], [5]], k=5, exclude_history=False)
    got = recommend(r, [[3, 4], [5]], k=np.int64(5), num_beams=np.int32(20), exclude_history=False)
    assert [list(x.items) for x in got] == [list(x.items) for x in want]
    served = Recommender(r, num_beams=np.int64(20), num_candidates=np.int32(40)).recommend([[3, 4]], k=np.int64(3), batch_size=np.int64(8))
    assert list(served[0].items) == list(Recommender(r).recommend([[3, 4]], k=3)[0].items)
    beam = decoders_for(r, ["beam"])["beam"]  # a decoder's own call
    batch = history_batches(r, [np.array([3, 4])], None, np.int64(8))[0]
    assert beam(batch, np.int64(4)).items.tolist() == beam(batch, 4).items.tolist()
    result = evaluate_run(trained["run"], "test", ks=np.array([5, 10]), max_users=np.int64(4), seed=np.uint8(1),
                          num_beams=np.int64(20), batch_size=np.int16(8))
    plain = evaluate_run(trained["run"], "test", ks=(5, 10), max_users=4, seed=1, num_beams=20, batch_size=8)
    assert {**result, "seconds": 0} == {**plain, "seconds": 0}
    # (np.int64 was not JSON; 20 beams and seed 1 are not the protocol's: a file of their own)
    written = json.loads((trained["run"] / "metrics_test_beam_beams20_seed1_sample4.json").read_text())
    assert written["num_beams"] == 20 and written["max_users"] == 4
    with pytest.raises(ValueError, match="no dense head"):  # past the argument checks (they refused np.int64)
        choose_run_fusion(r, num_candidates=np.int64(20), num_beams=np.int64(20), users=np.int64(8))
    with pytest.raises(ValueError, match="`k` must be an int"):
        recommend(r, [[3, 4]], k=np.bool_(True))


def test_evaluate_names_its_split(trained: dict[str, Path]) -> None:
    from generator.runs.evaluate import evaluate
    from semid.data import load_dataset
    from semid.split import leave_one_out

    r = load_run(trained["run"])
    split = leave_one_out(load_dataset(r.data_dir))
    for exclude in (False, True):  # (with the history left out, "validation" scored the test split)
        with pytest.raises(ValueError, match="`which` must be 'valid' or 'test', got 'validation'"):
            evaluate(r, split, "validation", exclude_history=exclude)


def test_evaluate_run_checks_its_options_by_name(trained: dict[str, Path]) -> None:
    from generator.runs.evaluate import evaluate_run

    # each was a bare IndexError / TypeError / numpy error, or (length_penalty) taken, ignored and recorded
    for options, message in (({"ks": []}, "`ks` must be a non-empty list"), ({"ks": 5}, "`ks` must be a non-empty list"),
                             ({"ks": (0, 10)}, "`ks` must be"), ({"max_users": True}, "`max_users` must be a positive int"),
                             ({"seed": -1}, r"`seed` must be an int in \[0, 2\^32\)"), ({"seed": 1.5}, "`seed` must be"),
                             ({"length_penalty": 2.0}, "`length_penalty` is for title runs")):
        with pytest.raises(ValueError, match=message):
            evaluate_run(trained["run"], "test", **options)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device` is 'cuda', but CUDA is not available"):
            evaluate_run(trained["run"], "test", device="cuda")


def test_recommend_reads_item_ids_of_ascii_digits_only(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # int() read "1_2" as item 12 and other scripts' digits ("١,٢") as items 1, 2: refused, naming the token (exit 2)
    for argv, token in ((["--history", "1_2"], "'1_2'"), (["--history", "3,\u0661,\u0662"], "'\u0661'"),
                        (["--history", "3", "--user", "1_2"], "user id '1_2'")):
        with pytest.raises(SystemExit) as exit_:
            main(["recommend", "--run", str(trained["run"]), *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and token in err and "digits 0-9 only" in err, err
    # a leading minus parses, and the id is then refused by the catalogue's check
    assert main(["recommend", "--run", str(trained["run"]), "--history", "3,-4"]) == 2
    assert "unknown item id -4" in capsys.readouterr().err


def test_another_decoder_or_checkpoint_never_replaces_the_protocols_metrics(trained: dict[str, Path], tmp_path: Path) -> None:
    """metrics_test.json is the run's validated decoder on its best checkpoint; `--decoder dense` or `--checkpoint
    last.ckpt` once replaced it with their own figures (the best checkpoint's metrics lost)."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    base = ["evaluate", "--run", str(run), "--num-beams", "10", "--no-progress"]  # (the beams the run trained with)
    assert main(base) == 0
    protocol = (run / "metrics_test.json").read_bytes()
    assert json.loads(protocol)["decoder"] == "t5.beam"  # (this file's run: the T5 design)
    assert main([*base, "--decoder", "generate"]) == 0
    assert main([*base, "--checkpoint", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert (run / "metrics_test.json").read_bytes() == protocol
    assert json.loads((run / "metrics_test_generate.json").read_text())["decoder"] == "t5.generate"
    last = json.loads((run / "metrics_test_beam_last.json").read_text())
    assert last["checkpoint"].endswith("last.ckpt") and last["selected_on_validation"] is False
    assert main([*base, "--decoder", "beam"]) == 0  # the run's own decoder, named: the protocol's file again
    assert not (run / "metrics_test_beam.json").exists()
    # options other than the protocol's too (they once replaced it, recorded inside): other beams than evaluate's
    # default (20) or the run's training's (10)
    protocol = (run / "metrics_test.json").read_bytes()  # (as the named decoder wrote it again: its seconds differ)
    assert main([*base[:3], "--num-beams", "30", "--no-progress"]) == 0
    assert (run / "metrics_test.json").read_bytes() == protocol
    assert json.loads((run / "metrics_test_beam_beams30.json").read_text())["num_beams"] == 30
    # and never each other (a helper's audit): 20 beams and the run's 10 both wrote one file, so did other cut-offs
    # (a --k 20 file held @20 alone), a sample's other seed, and another run's best.ckpt ("beam_best", as this one's)
    assert main([*base[:3], "--no-progress"]) == 0  # the beams it was validated with (10), not 20: the protocol's file
    assert json.loads((run / "metrics_test.json").read_text())["num_beams"] == 10
    assert not (run / "metrics_test_beam_beams20.json").exists()
    assert main([*base[:3], "--num-beams", "20", "--no-progress"]) == 0
    assert json.loads((run / "metrics_test_beam_beams20.json").read_text())["num_beams"] == 20
    assert main([*base[:3], "--num-beams", "20", "--k", "20", "--no-progress"]) == 0 and json.loads((run / "metrics_test_beam_beams20_k20.json").read_text())["recall@20"] >= 0
    assert main([*base, "--max-users", "5"]) == 0 and main([*base, "--max-users", "5", "--seed", "7"]) == 0
    assert json.loads((run / "metrics_test_sample5.json").read_text())["seed"] == 0
    assert json.loads((run / "metrics_test_beam_seed7_sample5.json").read_text())["seed"] == 7
    other = tmp_path / "other"
    shutil.copytree(trained["run"], other)
    assert main([*base, "--checkpoint", str(other / "checkpoints" / "best.ckpt")]) == 0
    digest = hashlib.sha256((other / "checkpoints" / "best.ckpt").read_bytes()).hexdigest()[:8]
    assert (run / f"metrics_test_beam_best-{digest}.json").is_file() and not (run / "metrics_test_beam_best.json").exists()


def test_the_service_takes_user_ids_for_a_run_trained_with_user_tokens(trained: dict[str, Path]) -> None:
    """This module's run is a T5 run with 32 user buckets: /recommend takes `user_id` (/recommend/batch `user_ids`) and
    answers what `Recommender.recommend(..., user_ids=...)` gives alone, batched with requests without one; it could
    not take one before (422 unknown field), so such a run was always served without its users' tokens."""
    import asyncio

    from tests.serve_helpers import app_for, serving

    app = app_for(trained["run"], max_wait_ms=30)
    rec = app.state.holder.current.rec
    calls = [([3, 4, 5], 7), ([3, 4, 5], 8), ([9, 1], 1), ([9, 1], None), ([2, 6, 7, 8], 30)]

    async def drive() -> tuple[list, object, list]:
        async with serving(app) as c:
            one = [c.post("/recommend", json={"history": h, "k": 5, **({} if u is None else {"user_id": u})}) for h, u in calls]
            batch = c.post("/recommend/batch", json={"histories": [h for h, _ in calls[:3]], "k": 5, "user_ids": [7, 8, 1]})
            bad = [c.post("/recommend", json={"history": [3], "user_id": v}) for v in (-1, True, "7", 2.5)]
            bad.append(c.post("/recommend/batch", json={"histories": [[3], [4]], "user_ids": [1]}))
            return await asyncio.gather(*one), await batch, await asyncio.gather(*bad)

    singles, batch, bad = asyncio.run(drive())
    answers, scores = [], []
    for (h, u), r in zip(calls, singles, strict=True):
        assert r.status_code == 200, r.text
        want = rec.recommend([h], 5, user_ids=None if u is None else [u], num_beams=r.json()["num_beams"])[0]
        answers.append([i["item_id"] for i in r.json()["items"]])
        scores.append([i["score"] for i in r.json()["items"]])
        assert answers[-1] == want.items.tolist(), (h, u)
        np.testing.assert_allclose(scores[-1], want.scores, rtol=1e-4, atol=1e-5)
    assert scores[2] != scores[3]  # the user's token reaches the model (user 1 against none)
    assert [[i["item_id"] for i in x] for x in batch.json()["results"]] == answers[:3]
    assert [r.status_code for r in bad] == [422] * 5
    assert [r.json()["error"]["field"] for r in bad] == ["user_id"] * 4 + ["user_ids"]


def test_the_missing_user_ids_warning_is_given_once_per_loaded_run(trained: dict[str, Path],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A service calls recommend for every request: the warning that a user-token run got no user ids was logged on
    each (a log flood); now once per loaded run."""
    import logging

    from generator.runs.recommender import Recommender

    rec = Recommender.from_run(trained["run"])
    with caplog.at_level(logging.WARNING, logger="generator.runs.recommender"):
        for _ in range(3):
            rec.recommend([[3, 4, 5]], 5)
    assert sum("no `user_ids` were given" in r.getMessage() for r in caplog.records) == 1
