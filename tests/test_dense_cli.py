"""`semid train --dense ...` then `semid evaluate/recommend --decoder dense|hybrid` on a tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generator.decoding.fusion import POOL_FUSIONS
from generator.models.checkpoint import with_integrity
from generator.runs.decoders import choose_run_fusion, decoders_for
from generator.runs.folder import HYBRID_FILE, load_run
from generator.runs.recommend import recommend
from generator.t5.design import dense_head as load_run_head
from semid_cli import main
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset

TRAIN_FLAGS = [
    "--preset", "cpu", "--max-epochs", "1", "--batch-size", "16", "--user-tokens", "32", "--val-users", "all",
    "--num-beams", "10", "--warmup-steps", "4", "--lr", "3e-3", "--no-progress", "--seed", "0",
    "--dense-embeddings", "rand",
]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense_cli")
    data = write_random_dataset(root / "data")
    emb = np.random.default_rng(0).standard_normal((NUM_ITEMS, 6)).astype(np.float32)
    np.save(data / "item_emb_rand.npy", emb)
    write_ids(root / "semantic_ids.npz")
    return {"root": root, "data": data, "ids": root / "semantic_ids.npz"}


@pytest.fixture(scope="module")
def joint_run(folders: dict[str, Path]) -> Path:
    run = folders["root"] / "joint"
    flags = ["--dense", "both", "--objective", "joint", "--dense-option", "dim=16", "--dense-option", "pooling=last"]
    assert main(["train", "--data", str(folders["data"]), "--ids", str(folders["ids"]), "--out", str(run), *TRAIN_FLAGS, *flags]) == 0
    return run


def test_joint_training_stores_the_head(joint_run: Path) -> None:
    config = yaml.safe_load((joint_run / "config.yaml").read_text())
    assert config["train"]["dense"] == "both" and config["train"]["dense_options"] == {"dim": 16, "pooling": "last"}
    ckpt = torch.load(joint_run / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["semid"]["dense"]["dim"] == 16
    head = load_run_head(load_run(joint_run))
    assert head.num_items == NUM_ITEMS and head.config.pooling == "last"
    losses = (joint_run / "logs").rglob("metrics.csv")
    assert "train/dense_loss" in next(losses).read_text().splitlines()[0]


def test_hybrid_serves_straight_after_training(joint_run: Path) -> None:
    stored = json.loads((joint_run / HYBRID_FILE).read_text())  # chosen at the end of `semid train`
    assert stored["validation_users"] == {"fit": 12, "select": 12} and stored["checkpoint_sha256"]
    assert stored["fusion"] in POOL_FUSIONS and set(stored["table"]) == set(POOL_FUSIONS)  # not "full": no exact scores
    r = load_run(joint_run)
    assert decoders_for(r, ["hybrid"], num_beams=12)["hybrid"].fusion == (stored["fusion"], stored["params"])
    rec = recommend(r, [[3, 4, 5]], k=5, decoder="hybrid")
    assert len(set(rec[0].items.tolist())) == 5


@pytest.mark.parametrize("decoder", ["dense", "hybrid"])
def test_evaluate_with_dense_and_hybrid_decoders(
    joint_run: Path, folders: dict[str, Path], decoder: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import generator.runs.fusion_store as fusion_store
    from semid.data import load_dataset
    from semid.split import leave_one_out

    seen, chosen = [], []  # the targets the fusion was fitted and chosen on, and the fusion chosen

    def spy(fit, fit_targets, select, select_targets, kinds):  # noqa: ANN001, ANN202
        seen.append((fit_targets.numpy().copy(), select_targets.numpy().copy(), kinds))
        choice = fit_and_choose(fit, fit_targets, select, select_targets, kinds)
        chosen.append((choice.kind, choice.params))
        return choice

    fit_and_choose = fusion_store.fit_and_choose
    monkeypatch.setattr(fusion_store, "fit_and_choose", spy)
    beams = ["--num-beams", "10"] if decoder == "hybrid" else []  # (the run's; refused for dense, which searches none)
    evaluate = ["evaluate", "--run", str(joint_run), "--split", "test", "--decoder", decoder, *beams, "--no-progress"]
    if decoder == "hybrid":  # evaluate never chooses a fusion: without one it says how to choose it
        (joint_run / HYBRID_FILE).unlink(missing_ok=True)
        assert main(evaluate) == 2
        assert f"semid choose-fusion --run {joint_run}" in capsys.readouterr().err
        assert not (joint_run / HYBRID_FILE).exists() and not chosen
        assert main(["choose-fusion", "--run", str(joint_run)]) == 0
        before = (joint_run / HYBRID_FILE).read_bytes()
    assert main(evaluate) == 0
    m = json.loads((joint_run / f"metrics_test_{decoder}.json").read_text())  # (not the run's decoder: its own file)
    assert m["users_evaluated"] == 24 and m["invalid_items"] == 0 and m["duplicate_items"] == 0
    assert m["decoder"] == f"t5.{decoder}"
    if decoder == "hybrid":  # the blend weight was chosen on validation users and stored for the checkpoint
        assert (joint_run / HYBRID_FILE).read_bytes() == before  # evaluate read it and wrote nothing
        stored = json.loads(before)
        assert stored["validation_users"] == {"fit": 12, "select": 12} and chosen == [(stored["fusion"], stored["params"])]
        assert decoders_for(load_run(joint_run), ["hybrid"], num_beams=12)["hybrid"].fusion == chosen[0]
        # ... on those users' *validation* targets (catalogue rows), half to fit and half to choose, never test targets
        split = leave_one_out(load_dataset(folders["data"]))
        rows = load_run(joint_run).ids.rows_of(split.valid_targets)
        assert len(seen) == 1 and seen[0][2] == POOL_FUSIONS
        np.testing.assert_array_equal(np.sort(np.concatenate(seen[0][:2])), np.sort(rows))
        assert not np.array_equal(np.sort(np.concatenate(seen[0][:2])), np.sort(load_run(joint_run).ids.rows_of(split.test_targets)))


def test_recommend_with_every_decoder(joint_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = load_run(joint_run)
    for decoder in ("auto", "dense"):
        rec = recommend(r, [[3, 4, 5], [7]], k=5, decoder=decoder)
        assert all(len(set(x.items.tolist())) == 5 and np.isin(x.items, r.ids.item_ids).all() for x in rec)
        assert all((np.diff(x.scores) <= 1e-6).all() for x in rec)
    rec = recommend(r, [[3, 4, 5]], k=5, decoder="hybrid", alpha=0.5, num_beams=20)
    assert len(set(rec[0].items.tolist())) == 5
    assert main(["recommend", "--run", str(joint_run), "--history", "3,4,5", "-k", "5", "--decoder", "dense", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 5


def test_dense_only_training_with_sampled_softmax(folders: dict[str, Path]) -> None:
    run = folders["root"] / "dense_only"
    flags = ["--dense", "content", "--objective", "dense", "--dense-option", "loss=sampled", "--dense-option", "num_random_negatives=8"]
    assert main(["train", "--data", str(folders["data"]), "--ids", str(folders["ids"]), "--out", str(run), *TRAIN_FLAGS, *flags]) == 0
    valid = json.loads((run / "metrics_valid.json").read_text())
    assert valid["decoder"] == "t5.dense"  # validated (and the best checkpoint chosen) by the dense decoder
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["hyper_parameters"]["decoder"] == "dense"


def test_dense_flag_errors(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--data", str(folders["data"]), "--ids", str(folders["ids"]), "--out", "x", "--dense-option", "colour=red"])
    assert "KEY one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the causal model's head's fields: a T5 head has no code vectors handed in
        main(["train", "--data", str(folders["data"]), "--ids", str(folders["ids"]), "--out", "x", "--dense-option", "code_dim=4"])
    assert "KEY one of" in capsys.readouterr().err


def test_stored_alpha_is_reused_only_for_the_same_checkpoint(joint_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import shutil

    from semid.data import load_dataset
    from semid.split import leave_one_out

    run = tmp_path / "run"
    shutil.copytree(joint_run, run)
    (run / HYBRID_FILE).unlink(missing_ok=True)
    r = load_run(run)
    split = leave_one_out(load_dataset(r.data_dir))
    choose_run_fusion(r, split)
    stored = json.loads((run / HYBRID_FILE).read_text())
    assert stored["checkpoint"] == r.checkpoint.relative_to(r.path).as_posix() and stored["ids_sha256"] and stored["checkpoint_sha256"]
    stored["fusion"], stored["params"] = "blend", {"alpha": 0.123}  # reused as is while nothing changed
    (run / HYBRID_FILE).write_text(json.dumps(stored))
    assert decoders_for(r, ["hybrid"], num_beams=12)["hybrid"].fusion == ("blend", {"alpha": 0.123})
    # the same file name with other content (e.g. a resumed training's new best.ckpt): stale, and never re-chosen
    # by building decoders (a read path): an error says to choose it
    ckpt = torch.load(r.checkpoint, weights_only=False)
    ckpt["global_step"] += 1
    torch.save(with_integrity(ckpt), r.checkpoint)  # written as semid writes checkpoints (a digest of the new content)
    with caplog.at_level(logging.INFO, logger="generator.runs.fusion_store"), pytest.raises(ValueError, match="semid choose-fusion"):
        decoders_for(r, ["hybrid"], num_beams=12)
    assert "checkpoint_sha256" in caplog.text
    assert json.loads((run / HYBRID_FILE).read_text()) == stored  # left as it was
    choose_run_fusion(r, split)
    assert json.loads((run / HYBRID_FILE).read_text())["checkpoint_sha256"] != stored["checkpoint_sha256"]
    (run / HYBRID_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"hybrid\.json: corrupt"):
        decoders_for(r, ["hybrid"], num_beams=12)


def test_hybrid_on_the_validation_split_needs_an_explicit_alpha(joint_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "--run", str(joint_run), "--split", "valid", "--decoder", "hybrid", "--num-beams", "12", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tuned on" in err and "--split test" in err and "--alpha" in err
    assert main([*argv, "--alpha", "0.5"]) == 0


def test_a_hybrid_json_of_the_earlier_t5_schema_ranks_as_the_blend_it_stored(joint_run: Path, tmp_path: Path) -> None:
    import shutil

    from generator.runs.fusion_store import choice_key

    run = tmp_path / "run"
    shutil.copytree(joint_run, run)
    r = load_run(run)
    key = {**choice_key(r), "num_candidates": min(50, r.ids.num_items)}
    histories = [[3, 4, 5], [7], [10, 11, 12, 13]]
    ranked = {}
    for name, stored in (("earlier", {"alpha": 0.3, "metric": "ndcg@10", "validation_users": 24}),  # before the one schema
                         ("one schema", {"fusion": "blend", "params": {"alpha": 0.3}, "metric": "ndcg@10"})):
        (run / HYBRID_FILE).write_text(json.dumps({**stored, **key}))
        ranked[name] = recommend(r, histories, k=5, decoder="hybrid", num_beams=12)
    ranked["given"] = recommend(r, histories, k=5, decoder="hybrid", num_beams=12, alpha=0.3)
    ranked["other"] = recommend(r, histories, k=5, decoder="hybrid", num_beams=12, alpha=0.9)
    for name in ("one schema", "given"):
        for a, b in zip(ranked["earlier"], ranked[name], strict=True):
            assert np.array_equal(a.items, b.items) and np.array_equal(a.scores, b.scores)
    assert not all(np.array_equal(a.scores, b.scores) for a, b in zip(ranked["earlier"], ranked["other"], strict=True))


def test_choose_fusion_passes_num_beams_to_the_t5_hybrid(joint_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # the T5 hybrid takes its candidates from a beam search of max(beams, C) beams, and is served with max(20, C): other
    # counts were taken and changed nothing (at most C), or chose a fusion for a pool never served (a helper's audit)
    import shutil

    from generator.runs import decoders

    run = Path(shutil.copytree(joint_run, tmp_path / "joint"))
    beams = []

    def spy(*args, **kwargs):
        beams.append(kwargs["num_beams"])
        return choose_run_fusion(*args, **kwargs)

    monkeypatch.setattr(decoders, "choose_run_fusion", spy)
    assert main(["choose-fusion", "--run", str(run), "--num-beams", "12"]) == 2
    assert "a fusion chosen with other beams would not be the one served" in capsys.readouterr().err
    assert main(["choose-fusion", "--run", str(run), "--num-beams", "40"]) == 0  # max(20, C = min(50, N = 40)): served
    assert main(["choose-fusion", "--run", str(run)]) == 0
    assert beams == [40, 20]


def test_dense_embeddings_are_kept_on_resume_and_read_only_by_a_content_head() -> None:
    """A resume with other content vectors kept the old ones (or failed with a traceback on another width), and with
    `--dense id` the flag was recorded and never read (a helper's audit)."""
    from generator.runs.options import FIXED_ON_RESUME, TrainOptions

    assert "dense_embeddings" in FIXED_ON_RESUME
    with pytest.raises(ValueError, match="read only with `dense` 'content' or 'both' \\(this run's: id\\)"):
        TrainOptions(preset="cpu", dense="id", dense_embeddings="other")
    assert TrainOptions(preset="cpu", dense="both", dense_embeddings="other").dense_embeddings == "other"
