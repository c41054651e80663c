"""The default design end to end: `semid train` (no model flags) -> evaluate with every decoder -> recommend,
model selection on the served decoder, and the options the causal design refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generator.models.causal import CausalGenerator
from generator.runs.evaluate import evaluate_run
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.recommend import recommend
from generator.runs.recommender import Recommender
from semid_cli import main
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset

FLAGS = ["--max-epochs", "3", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal")
    data = write_random_dataset(root / "data")
    ids_dir = root / "ids"
    ids_dir.mkdir()
    write_ids(ids_dir / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(ids_dir), "--out", str(run), *FLAGS]) == 0
    dense_run = root / "dense_run"  # the width-64 preset: the full softmax end to end (the default samples)
    assert main(["train", "--data", str(data), "--ids", str(ids_dir), "--out", str(dense_run), "--objective", "dense",
                 "--preset", "causal-64", *FLAGS]) == 0
    return {"data": data, "ids": ids_dir, "run": run, "dense_run": dense_run}


def test_the_default_design_is_causal_and_selects_on_the_decoder_it_serves_with(causal_run: dict[str, Path]) -> None:
    config = yaml.safe_load((causal_run["run"] / "config.yaml").read_text())
    assert config["design"] == "causal" and config["train"]["preset"] == "causal"
    assert config["monitor"] == "val/beam/ndcg@10" and set(config["best_score"]) == {"val/beam/ndcg@10"}
    assert config["targets_per_epoch"] > 0 and config["threads"] == 1
    run = load_run(causal_run["run"])
    assert isinstance(run.model, CausalGenerator) and run.design == "causal"
    # the checkpoint kept is the one with the best beam score among the logged validations
    metrics = list((causal_run["run"] / "logs").rglob("metrics.csv"))[0].read_text().splitlines()
    header = metrics[0].split(",")
    col = header.index("val/beam/ndcg@10")
    logged = [float(line.split(",")[col]) for line in metrics[1:] if line.split(",")[col]]
    assert len(logged) == 3 and config["best_score"]["val/beam/ndcg@10"] == pytest.approx(max(logged))
    for name in ("exact", "dense"):
        assert f"val/{name}/ndcg@10" in header  # every decoder's validation metric is logged
    valid = json.loads((causal_run["run"] / "metrics_valid.json").read_text())
    assert valid["decoder"] == "causal.beam" and valid["ndcg@10"] == pytest.approx(max(logged), abs=1e-6)
    dense = yaml.safe_load((causal_run["dense_run"] / "config.yaml").read_text())
    assert dense["monitor"] == "val/dense/ndcg@10" and dense["train"]["decoder"] == "dense"


@pytest.mark.parametrize("decoder", ["beam", "exact", "dense", "hybrid"])
def test_evaluate_every_decoder_returns_real_distinct_items(causal_run: dict[str, Path], decoder: str) -> None:
    m = evaluate_run(causal_run["run"], "test", decoder=decoder, num_beams=10)
    assert m["users_evaluated"] == 24 and m["invalid_items"] == 0 and m["duplicate_items"] == 0
    assert m["decoder"] == f"causal.{decoder}"
    if decoder == "hybrid":
        stored = json.loads((causal_run["run"] / "hybrid.json").read_text())
        # fitted on half the validation users, chosen on the other half; every fusion was tried
        assert stored["validation_users"] == {"fit": 12, "select": 12}
        assert set(stored["table"]) == {"blend", "full", "levels", "liger", "rrf", "learned"} and stored["fusion"] in stored["table"]


def test_evaluate_run_passes_every_option_on_and_records_it(causal_run: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import generator.runs.evaluate as ev

    given = {"decoder": "hybrid", "num_beams": 7, "max_users": 9, "seed": 3, "ks": (3,), "exclude_history": True,
             "batch_size": 5, "alpha": 0.25, "table_dtype": "bfloat16"}
    received, real = {}, ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: received.update(k) or real(*a, **k))
    m = evaluate_run(causal_run["run"], "test", **given)
    assert received == {**ev.EVALUATE_DEFAULTS, **given, "release_tables": True}  # all passed on, the rest defaults
    assert m["decoder"] == "causal.hybrid" and m["alpha"] == 0.25 and "length_penalty" not in m  # default: not written
    assert (m["num_beams"], m["max_users"], m["seed"], m["exclude_history"]) == (7, 9, 3, True)
    assert m["users_evaluated"] == 9 and "recall@3" in m and "recall@10" not in m
    assert Path(m["file"]).name == "metrics_test_hybrid_beams7_k3_seed3_alpha0.25_bfloat16_unseen_sample9.json"  # not the protocol's options
    with pytest.raises(TypeError, match=r"unknown options \['num_beam'\]; known: \[.*'num_beams'"):
        evaluate_run(tmp_path / "not-a-run", "test", num_beam=7)  # refused before anything is read


def test_a_dense_only_run_serves_the_dense_decoder(causal_run: dict[str, Path]) -> None:
    m = evaluate_run(causal_run["dense_run"], "test", decoder="dense", num_beams=10)
    assert m["users_evaluated"] == 24 and m["decoder"] == "causal.dense" and m["invalid_items"] == 0


def test_recommend_agrees_with_exact_when_beams_cover_the_catalogue(causal_run: dict[str, Path]) -> None:
    run = load_run(causal_run["run"])
    histories = [[1, 2, 3], [10, 12, 14, 16], [5]]
    beam = recommend(run, histories, k=5, num_beams=NUM_ITEMS, decoder="beam")
    exact = recommend(run, histories, k=5, num_beams=NUM_ITEMS, decoder="exact")
    for b, e in zip(beam, exact, strict=True):
        assert np.array_equal(b.items, e.items) and np.allclose(b.scores, e.scores, atol=1e-5)
        assert np.all(np.diff(b.scores) <= 1e-6) and len(set(b.items)) == 5
    with pytest.raises(ValueError, match=r"histories\[1\]` holds unknown item id 999"):
        recommend(run, [[1], [999]], k=5)


def test_cli_recommend_prints_items(causal_run: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = load_run(causal_run["run"])
    every = recommend(run, [[1, 2, 3]], k=3, exclude_history=False)[0]
    assert main(["recommend", "--run", str(causal_run["run"]), "--history", "1,2,3", "-k", "3", "--json",
                 "--no-exclude-history"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in out["items"]] == every.items.tolist()
    assert [r["title"] for r in out["items"]] == [f"item {i}" for i in every.items]
    # the two best items as a history: served without them by default (CLI, one-off function and Recommender alike,
    # as `semid serve`), and ranked first again with --no-exclude-history
    history = [int(i) for i in every.items[:2]]
    ranked = recommend(run, [history], k=3, exclude_history=False)[0].items.tolist()
    assert set(history) & set(ranked)  # (else leaving them out would change nothing here)
    served = recommend(run, [history], k=3)[0].items.tolist()
    assert not set(served) & set(history)
    assert served == Recommender(run).recommend([history], k=3)[0].items.tolist()
    for flags, want in (([], served), (["--no-exclude-history"], ranked), (["--exclude-history"], served)):
        assert main(["recommend", "--run", str(causal_run["run"]), "--history", ",".join(map(str, history)), "-k", "3",
                     "--json", *flags]) == 0
        assert [r["item_id"] for r in json.loads(capsys.readouterr().out)["items"]] == want, flags
    # a user id on a run without user tokens changes nothing: said, not taken (it was accepted and ignored)
    assert main(["recommend", "--run", str(causal_run["run"]), "--history", "1,2,3", "--user", "7"]) == 2
    assert "--user 7: " in capsys.readouterr().err


def test_causal_options_that_do_not_apply_are_errors() -> None:
    with pytest.raises(ValueError, match="`user_tokens` must be 0 with the causal preset"):
        TrainOptions(user_tokens=100)
    with pytest.raises(ValueError, match="`dense` must be 'none', 'id' or 'both'"):
        TrainOptions(dense="content")
    with pytest.raises(ValueError, match="`decoder` must be one of"):
        TrainOptions(dense="none", decoder="dense")
    with pytest.raises(ValueError, match=r"unknown `model_options` \['width'\]"):
        TrainOptions(model_options={"width": 3})
    with pytest.raises(ValueError, match="`head_dropout` must be in"):
        TrainOptions(model_options={"head_dropout": 1.5})
    with pytest.raises(ValueError, match="`model_options` are for the causal design"):
        TrainOptions(preset="cpu", model_options={"dropout": 0.1})
    o = TrainOptions(dense="none")
    assert o.dense is None and o.objective == "generative" and o.decoder == "beam"
    with pytest.raises(ValueError, match="`num_workers` is for the T5 presets' data loader"):  # (it was ignored)
        TrainOptions(num_workers=2)
    from generator.runs.options import stored_options

    # a causal run that stored the value it ignored resumes (its config.yaml's 2 read as 0); a T5 run keeps its own
    assert TrainOptions.from_dict(stored_options({"preset": "causal", "num_workers": 2})).num_workers == 0
    assert TrainOptions.from_dict(stored_options({"preset": "cpu", "num_workers": 2})).num_workers == 2
    t5 = TrainOptions(preset="tiger")
    assert (t5.batch_size, t5.max_history, t5.user_tokens, t5.warmup_steps) == (256, 20, 2000, 500)


def test_a_width_alone_resizes_the_tied_dense_table() -> None:
    # the default preset ties the ID input to the dense table: a new width must carry the table with it
    from generator.designs.causal import causal_config

    for preset, width in (("causal", 256), ("causal-64", 128)):  # a width other than the preset's
        c = causal_config(TrainOptions(preset=preset, model_options={"d_model": width, "num_heads": 4}))
        assert (c.d_model, c.dense_dim, c.id_input) == (width, width, True)
    no_head = causal_config(TrainOptions(dense="none", model_options={"d_model": 96}))
    assert no_head.dense_dim == 0 and no_head.dense_loss == "full"  # no head, no dense loss to feed


def test_threads_are_restored_after_training(causal_run: dict[str, Path], tmp_path: Path) -> None:
    before = torch.get_num_threads()
    assert main(["train", "--data", str(causal_run["data"]), "--ids", str(causal_run["ids"]), "--out", str(tmp_path / "r"),
                 "--max-steps", "2", "--threads", "1", "--final-val-users", "0", *FLAGS]) == 0
    assert torch.get_num_threads() == before


def test_config_counts_every_step_even_when_the_best_came_early(causal_run: dict[str, Path], tmp_path: Path) -> None:
    # a learning rate too small to change the validation score: only the first validation saves a checkpoint
    run = tmp_path / "flat"
    flags = [f for f in FLAGS]
    flags[flags.index("--max-epochs") + 1] = "4"
    assert main(["train", "--data", str(causal_run["data"]), "--ids", str(causal_run["ids"]), "--out", str(run),
                 "--lr", "1e-12", "--warmup-steps", "0", "--final-val-users", "0", *flags]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["epochs"] == 4 and config["steps"] == 4 * 3  # 24 users, windows of 8 per batch: 3 steps an epoch
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12  # resume continues from the end, not from the best


def test_a_diverging_training_stops_with_an_error_that_names_the_learning_rate(
    causal_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # (before: the first validation's beam search over NaN scores ended in a RuntimeError about the tree's leaves)
    flags = ["--max-epochs", "1", "--batch-size", "8", "--val-users", "all", "--no-progress", "--seed", "0"]
    assert main(["train", "--data", str(causal_run["data"]), "--ids", str(causal_run["ids"]), "--out",
                 str(tmp_path / "run"), "--lr", "1e30", *flags]) == 2
    err = capsys.readouterr().err
    assert "training diverged by step" in err and "NaN or infinite" in err and "lower --lr (this run's 1e+30" in err


def test_a_dataset_with_one_validation_user_trains_without_a_fusion(causal_run: dict[str, Path], tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The hybrid's fusion is fitted on some validation users and chosen on others: with one, training finished and
    then failed (and so did every resume), advising an `--alpha` neither train nor choose-fusion has."""
    data = write_random_dataset(tmp_path / "data", num_users=1)
    flags = ["--max-epochs", "1", "--batch-size", "8", "--val-users", "all", "--no-progress", "--seed", "0"]
    assert main(["train", "--data", str(data), "--ids", str(causal_run["ids"]), "--out", str(tmp_path / "run"), *flags]) == 0
    assert not (tmp_path / "run" / "hybrid.json").exists() and "no fusion chosen" in caplog.text
    rec = Recommender.from_run(tmp_path / "run", alpha=0.5)  # the hybrid with a blend weight given
    assert len(rec.recommend([[1, 2]], 3, "hybrid")[0].items) == 3


def test_a_hybrid_on_another_checkpoint_is_told_to_give_a_blend_weight(causal_run: dict[str, Path]) -> None:
    # (it was told to run `semid choose-fusion`, which chooses for the best checkpoint only: the same error again)
    last = causal_run["run"] / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"no hybrid fusion is stored for checkpoint last.ckpt \(`semid choose-fusion` "
                                         r"chooses one for the run's best checkpoint only\): give a blend weight"):
        evaluate_run(causal_run["run"], "test", checkpoint=last, decoder="hybrid", max_users=3)


@pytest.mark.parametrize(("stop", "status", "said"), [("ctrl-c", 130, "interrupted (Ctrl-C)"), ("sigterm", 143, "stopped by SIGTERM")])
def test_a_command_stopped_by_ctrl_c_or_sigterm_says_so_in_one_line(causal_run: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str], stop: str,
                                                                     status: int, said: str) -> None:
    # (outside training: a 20-line KeyboardInterrupt traceback; SIGTERM killed the process where it was, leaving e.g.
    # distill's temporary folder behind: now raised where the command is, so its clean-up runs)
    import os
    import signal
    import time

    def stopped(*args: object, **kwargs: object) -> None:
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler raises here)

    monkeypatch.setattr("generator.runs.decoders.choose_run_fusion", stopped)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["choose-fusion", "--run", str(causal_run["run"])]) == status
    assert capsys.readouterr().err.strip() == f"semid choose-fusion: {said}"
    assert signal.getsignal(signal.SIGTERM) is before  # put back


def test_cold_beam_without_cold_items_names_what_gives_them(causal_run: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"needs cold items: add items to the run \(`semid add-items`\), or give them "
                                         r"in Python \(`cold_items=`\)"):  # ("or pass them": no option passes them)
        evaluate_run(causal_run["run"], "test", decoder="cold-beam", max_users=3)
