"""`semid train --target title [--tokenizer DIR] [--encoder DIR]` end to end, and the title / grounded decoders of
`semid evaluate` and `semid recommend` (same output format as every other decoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from generator.models.titles import TitleGenerator
from generator.runs.evaluate import evaluate_run
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.recommend import recommend
from semid.titles import TitleTokenizer
from semid_cli import main
from tests.test_embed import model_dir  # noqa: F401 (a tiny local BERT folder: the grounding encoder)
from tests.test_generator_helpers import NUM_ITEMS, write_ids, write_random_dataset

FLAGS = ["--max-epochs", "2", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress",
         "--model-option", "title_dim=16", "--model-option", "d_model=16", "--model-option", "num_heads=2"]


def tiny_local_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over the random dataset's titles ("item <id>"), saved as a transformers folder."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([f"item {i}" for i in range(1, NUM_ITEMS + 1)],
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def title_runs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("titles")
    data = write_random_dataset(root / "data")
    ids = root / "ids"
    ids.mkdir()
    write_ids(ids / "semantic_ids.npz")
    bpe = root / "bpe"
    base = ["train", "--data", str(data), "--ids", str(ids), "--target", "title", *FLAGS]
    assert main([*base, "--out", str(bpe), "--model-option", "tokenizer_vocab=300", "--encoder", str(model_dir)]) == 0
    local = root / "local"
    tok_dir = tiny_local_tokenizer(root / "tiny-tokenizer")
    assert main([*base, "--out", str(local), "--tokenizer", str(tok_dir)]) == 0
    causal = root / "causal"
    assert main(["train", "--data", str(data), "--ids", str(ids), "--out", str(causal), *FLAGS[:8]]) == 0
    return {"data": data, "ids": ids, "bpe": bpe, "local": local, "tokenizer": tok_dir, "causal": causal}


def test_a_title_run_trains_selects_on_the_title_beam_and_keeps_its_tokenizer(title_runs: dict[str, Path]) -> None:
    config = yaml.safe_load((title_runs["bpe"] / "config.yaml").read_text())
    assert config["train"]["target"] == "title" and config["monitor"] == "val/title-beam/ndcg@10"
    assert config["design"] == "causal"  # the backbone is the causal design's
    valid = json.loads((title_runs["bpe"] / "metrics_valid.json").read_text())
    assert valid["decoder"] == "title.title-beam" and valid["invalid_items"] == 0
    run = load_run(title_runs["bpe"])
    assert isinstance(run.model, TitleGenerator) and run.design == "title"
    assert run.tokenizer.kind == "bpe" and (title_runs["bpe"] / "tokenizer" / "tokenizer.json").is_file()
    titles = [f"item {i}" for i in range(1, NUM_ITEMS + 1)]
    assert run.tokenizer.decode(run.tokenizer.encode(titles)) == titles


def test_the_local_tokenizer_path_is_used_and_copied_into_the_run(title_runs: dict[str, Path]) -> None:
    run = load_run(title_runs["local"])
    assert run.tokenizer.kind == "transformers"
    assert run.tokenizer.encode(["item 7"]) == TitleTokenizer.from_pretrained(title_runs["tokenizer"]).encode(["item 7"])
    assert run.model.config.vocab_size == run.tokenizer.vocab_size  # unique titles: no disambiguation token


@pytest.mark.parametrize("run_name,decoder", [("bpe", "title-beam"), ("bpe", "title-grounded"), ("local", "auto"),
                                              ("causal", "codes-grounded")])
def test_evaluate_the_title_and_grounded_decoders(title_runs: dict[str, Path], run_name: str, decoder: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(title_runs[run_name]), "--decoder", decoder, "--num-beams", "10"]) == 0
    out = capsys.readouterr().out
    assert "Recall@10" in out and "invalid items 0, duplicate items 0" in out
    own = decoder in ("auto", "title-beam")  # the decoder the run was validated with: the protocol's file; others their own
    m = json.loads((title_runs[run_name] / ("metrics_test.json" if own else f"metrics_test_{decoder}.json")).read_text())
    assert m["users_evaluated"] == 24 and m["decoder"].endswith(decoder if decoder != "auto" else "title-beam")


def test_recommend_with_the_title_decoders(title_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--run", str(title_runs["bpe"]), "--history", "1,2,3", "-k", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["items"]
    assert len(rows) == 5 and len({r["item_id"] for r in rows}) == 5 and all(r["title"].startswith("item ") for r in rows)
    run = load_run(title_runs["causal"])
    rec = recommend(run, [[1, 2, 3], [4]], k=5, num_beams=10, decoder="codes-grounded")
    assert all(len(set(r.items.tolist())) == 5 for r in rec)


def test_title_options_that_do_not_apply_are_errors(title_runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="causal backbone"):
        TrainOptions(target="title", preset="tiger")
    with pytest.raises(ValueError, match="are for `target` 'title'"):
        TrainOptions(tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="target"):
        TrainOptions(target="words")
    with pytest.raises(ValueError, match="not a folder"):
        TrainOptions(target="title", tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown `model_options`"):
        TrainOptions(target="title", model_options={"node_vectors": False})
    with pytest.raises(ValueError, match="decoder"):
        evaluate_run(title_runs["bpe"], "test", decoder="exact", num_beams=10)
    with pytest.raises(ValueError, match="names none"):
        evaluate_run(title_runs["local"], "test", decoder="title-grounded", num_beams=10)
    with pytest.raises(ValueError, match="decoder"):
        evaluate_run(title_runs["causal"], "test", decoder="title-beam", num_beams=10)
    with pytest.raises(SystemExit):
        main(["train", "--data", "d", "--ids", "i", "--out", "o", "--target", "words"])


def test_a_title_run_evaluates_without_the_history_as_its_recommender_serves(title_runs: dict[str, Path]) -> None:
    """The title beam takes a call's own beam count (k plus the history's distinct items): it used to keep its
    loaded count and refuse (issue 18's review)."""
    import numpy as np

    from generator.runs.evaluate import evaluate
    from generator.runs.recommender import Recommender
    from semid.data import load_dataset
    from semid.split import leave_one_out

    run = load_run(title_runs["bpe"])
    split = leave_one_out(load_dataset(title_runs["data"]))
    got = evaluate(run, split, "test", decoder="title-beam", num_beams=10, batch_size=4, exclude_history=True)
    rec = Recommender.from_run(title_runs["bpe"], decoder="title-beam", num_beams=10)
    for r, rank in zip(got.user_rows, got.ranks, strict=True):  # loop over users: each one's own call
        items = rec.recommend([split.test_history(int(r))], k=10, exclude_history=True)[0].items
        assert not set(items.tolist()) & set(split.test_history(int(r)).tolist())
        hit = np.flatnonzero(items == split.test_targets[r])
        assert rank == (int(hit[0]) if hit.size else -1)
    assert len(rec.recommend([split.test_history(0)], k=15)[0].items) == 15  # more items than the loaded beams


def test_commands_for_causal_runs_name_a_title_run_as_such(title_runs: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A title run's config.yaml says design "causal" (its train.target says title): add-items and distill read the
    design from both, as loading does, and refuse it by name before anything is written."""
    run = title_runs["bpe"]
    before = sorted(p.name for p in run.iterdir())
    assert main(["add-items", "--run", str(run), "--data", str(title_runs["data"])]) == 2
    assert "a run of the 'title' design; items can be added to runs of the causal design" in capsys.readouterr().err
    assert main(["distill", "--run", str(run), "--out", str(tmp_path / "d")]) == 2
    assert "a run of the 'title' design; distillation is for runs of the causal design" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "d").exists()


# ---- a helper's audit of the title and grounded decoders (December 2026) -------------------------------------------
def test_codes_grounded_takes_each_calls_beams(title_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """It decoded with the beams it was loaded with: a history of more distinct items than beams less k (left out as
    served) was refused, and `num_beams=` changed nothing."""
    from generator.runs.recommender import Recommender

    long_history = ",".join(str(i) for i in range(1, 13))  # 12 distinct items: k 10 + 12 > the 20 loaded beams
    assert main(["recommend", "--run", str(title_runs["causal"]), "--history", long_history, "-k", "10",
                 "--decoder", "codes-grounded", "--json"]) == 0
    assert len([r["item_id"] for r in json.loads(capsys.readouterr().out)["items"]]) == 10
    run = load_run(title_runs["causal"])
    few = Recommender(run, decoders=["codes-grounded"], num_beams=4, maps=False)
    many = Recommender(run, decoders=["codes-grounded"], num_beams=30, maps=False)
    got = few.recommend([[3, 5]], 4, "codes-grounded", num_beams=30, exclude_history=False)[0]
    want = many.recommend([[3, 5]], 4, "codes-grounded", exclude_history=False)[0]
    assert got.items.tolist() == want.items.tolist()


def test_a_title_run_grounds_on_a_moved_dataset_and_its_encoder_path_is_absolute(
        title_runs: dict[str, Path], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.copytree(title_runs["data"], tmp_path / "data")
    shutil.copytree(model_dir, tmp_path / "enc")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--data", "data", "--ids", str(title_runs["ids"]), "--out", str(run), "--target", "title",
                 *FLAGS[2:], "--max-epochs", "1", "--model-option", "tokenizer_vocab=300", "--encoder", "enc"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["encoder"] == str((tmp_path / "enc").resolve())
    (tmp_path / "data").rename(tmp_path / "moved")
    monkeypatch.chdir(title_runs["data"].parent)  # another directory: the relative path named no folder there
    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--history", "1,2", "-k", "3", "--decoder", "title-grounded",
                 "--data", str(tmp_path / "moved"), "--json"]) == 0  # (it read the recorded data folder: "no dataset folder")
    assert len([r["item_id"] for r in json.loads(capsys.readouterr().out)["items"]]) == 3
    result = evaluate_run(run, "test", decoder="title-grounded", num_beams=10, data_dir=tmp_path / "moved", max_users=5)
    assert result["users_evaluated"] == 5


def test_a_damaged_or_changed_grounding_cache_is_made_again(title_runs: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import numpy as np

    from generator.runs.folder import TITLE_EMB_FILE

    run = tmp_path / "run"
    shutil.copytree(title_runs["bpe"], run)
    ask = ["recommend", "--run", str(run), "--history", "1,2", "-k", "5", "--decoder", "title-grounded", "--json"]
    capsys.readouterr()
    assert main(ask) == 0
    first = [r["item_id"] for r in json.loads(capsys.readouterr().out)["items"]]
    emb = run / TITLE_EMB_FILE
    np.save(emb, np.load(emb)[::-1].copy())  # another array under the same record: its answers changed in silence
    assert main(ask) == 0 and [r["item_id"] for r in json.loads(capsys.readouterr().out)["items"]] == first
    for damage in ("[1]", '{"dig'):  # (a traceback; an error naming no file)
        (run / (TITLE_EMB_FILE + ".json")).write_text(damage)
        assert main(ask) == 0 and [r["item_id"] for r in json.loads(capsys.readouterr().out)["items"]] == first
    assert json.loads((run / (TITLE_EMB_FILE + ".json")).read_text())["sha256"]


def test_a_title_runs_tokenizer_is_pinned_and_reused_by_tokenizer(title_runs: dict[str, Path], tmp_path: Path) -> None:
    from generator.runs.pinning import pinned_files

    assert "tokenizer/tokenizer.json" in pinned_files(title_runs["bpe"])
    assert not any(n.startswith("tokenizer/") for n in pinned_files(title_runs["causal"]))
    own = TitleTokenizer.from_pretrained(title_runs["bpe"] / "tokenizer")  # (refused: "needs a pad token and an eos")
    saved = TitleTokenizer.load(title_runs["bpe"] / "tokenizer")
    assert (own.kind, own.pad_id, own.eos_id, own.vocab_size) == (saved.kind, saved.pad_id, saved.eos_id, saved.vocab_size)
    assert own.encode(["item 7"]) == saved.encode(["item 7"])


def test_title_options_refused_before_the_run_folder_is_made(title_runs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "--data", str(title_runs["data"]), "--ids", str(title_runs["ids"]), "--target", "title", *FLAGS]
    assert main([*base, "--out", str(tmp_path / "a"), "--dense-embeddings", "nope"]) == 2  # (recorded, ignored)
    assert "`--dense-embeddings` names the dense head" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--model-option", "tokenizer_vocab=100"]) == 2
    assert "--model-option tokenizer_vocab" in capsys.readouterr().err
    empty = tmp_path / "empty-encoder"
    empty.mkdir()
    assert main([*base, "--out", str(tmp_path / "c"), "--encoder", str(empty)]) == 2  # (failed only at evaluate)
    assert "has no config.json" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")
