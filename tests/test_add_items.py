"""`semid add-items`: items that came after training join a causal run for good, through a chained IDs version.

A tiny causal run (content inputs, dense head) is trained on a catalogue of 34 items; 6 more arrive later in a new
data folder whose first 34 items are the same (same embeddings).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.models.checkpoint import ids_digest
from generator.runs.batches import history_batches
from generator.runs.decoders import decoders_for
from generator.runs.folder import load_run, read_config, write_config
from generator.runs.lineage import ADDED_CONTENT, lineage
from generator.runs.recommend import recommend
from rqvae import load_quantizer
from semid.ids import SemanticIDs
from semid_cli import main
from tests.test_generator_helpers import write_random_dataset

OLD, NEW = 34, 40
FLAGS = ["--max-epochs", "2", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0",
         "--dense", "both"]


def _embeddings(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.normal(size=(NEW, 16)).astype(np.float32)[:n]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("add_items")
    old = write_random_dataset(root / "old", num_items=OLD)
    np.save(old / "item_emb_minilm.npy", _embeddings(OLD))
    new = write_random_dataset(root / "new", num_items=NEW, seed=1)
    np.save(new / "item_emb_minilm.npy", _embeddings(NEW))
    mid = write_random_dataset(root / "mid", num_items=37, seed=2)
    np.save(mid / "item_emb_minilm.npy", _embeddings(37))
    ids = root / "ids"
    assert main(["fit-codebooks", "--embeddings", str(old / "item_emb_minilm.npy"), "--out", str(ids), "--levels", "2",
                 "--codebook-size", "4", "--no-progress"]) == 0
    run = root / "run"
    assert main(["train", "--data", str(old), "--ids", str(ids), "--out", str(run), *FLAGS]) == 0
    pristine = root / "pristine"
    shutil.copytree(run, pristine)  # the run before any items were added
    return {"root": root, "old": old, "new": new, "mid": mid, "ids": ids, "run": run, "pristine": pristine}


def _fresh(world: dict[str, Path], name: str) -> Path:
    out = world["root"] / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(world["pristine"], out)
    return out


HISTORIES = [[1, 2, 3], [10, 12, 14, 16], [5], [30, 31]]


def _scores(run, name: str) -> torch.Tensor:
    """Each decoder's score of every item for HISTORIES: (B, N) from the exact or dense head."""
    from generator.training.causal_data import history_batch

    dec = decoders_for(run, [name])[name].shared  # the run's CausalDecoders (paths, tables, item vectors)
    b = history_batch([np.array(h) for h in HISTORIES], np.full(len(HISTORIES), -1), run.ids, run.max_history)
    with torch.inference_mode():
        h = run.model.last_hidden(b.histories, b.lengths)
        p = dec.parts(h, levels=True)
        # the per-level terms add up to the exact score, added items' (normalised over trained siblings) included
        torch.testing.assert_close(p.code_levels.sum(1), p.exact, rtol=0, atol=1e-5)
        return p.exact if name == "exact" else run.model.dense_queries(h) @ dec._vectors.T


def test_add_items_writes_a_chained_version_with_quantizer_codes(world: dict[str, Path], capsys) -> None:
    run = _fresh(world, "run_codes")
    trained = SemanticIDs.load(run / "semantic_ids.npz")
    assert main(["add-items", "--run", str(run), "--data", str(world["new"])]) == 0
    assert "added 6 items (ids 35..40): 34 -> 40 items" in capsys.readouterr().out
    ids = SemanticIDs.load(run / "semantic_ids.npz")
    assert ids.num_items == NEW and ids.head(OLD) == trained  # old items keep their rows and tuples
    quantizer = load_quantizer(world["ids"] / "quantizer.pt")
    np.testing.assert_array_equal(ids.codes[OLD:, :-1], quantizer.encode(_embeddings(NEW)[OLD:]))
    assert lineage(run / "semantic_ids.npz") == [{"digest": ids_digest(trained), "num_items": OLD}]
    assert SemanticIDs.load(run / "semantic_ids.v1.npz") == trained  # the version replaced is kept
    np.testing.assert_array_equal(SemanticIDs.load_arrays(run / "semantic_ids.npz")[ADDED_CONTENT], _embeddings(NEW)[OLD:])
    # nothing more to add: a clear error, the file unchanged
    before = (run / "semantic_ids.npz").read_bytes()
    assert main(["add-items", "--run", str(run), "--data", str(world["new"])]) == 2
    assert "none above the run's 40: nothing to add" in capsys.readouterr().err
    assert (run / "semantic_ids.npz").read_bytes() == before


def test_added_items_are_served_by_every_decoder_and_old_scores_do_not_change(world: dict[str, Path]) -> None:
    run_dir = _fresh(world, "run_serve")
    before = load_run(run_dir)
    exact0, dense0 = _scores(before, "exact"), _scores(before, "dense")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 0
    run = load_run(run_dir)
    assert run.model.num_items == NEW and run.model.trained_items == OLD and run.data_dir == world["new"].resolve()
    exact1, dense1 = _scores(run, "exact"), _scores(run, "dense")
    # old items' scores, and so their order among themselves, are what they were before the items were added
    torch.testing.assert_close(exact1[:, :OLD], exact0, rtol=0, atol=1e-5)
    torch.testing.assert_close(dense1[:, :OLD], dense0, rtol=0, atol=1e-5)
    assert torch.isfinite(exact1[:, OLD:]).all() and torch.isfinite(dense1[:, OLD:]).all()
    for decoder, options in {"beam": {"num_beams": NEW}, "exact": {}, "dense": {}, "hybrid": {"alpha": 0.5}}.items():
        got = recommend(run, HISTORIES, k=NEW, decoder=decoder, exclude_history=False, **options)
        for row in got:  # every item, new ones included, exactly once
            assert sorted(row.items.tolist()) == list(range(1, NEW + 1)), decoder
    # the level-by-level fusion ranks every item, the new ones too, exactly once
    L = run.model.layout.num_levels
    levels = decoders_for(run, ["hybrid"], fusion=("levels", {"weights": [0.3] * (L - 1) + [0.9]}))["hybrid"]
    for b in history_batches(run, [np.asarray(h) for h in HISTORIES], None, 2):
        for row in levels(b, NEW).items:
            assert sorted(row.tolist()) == list(range(1, NEW + 1))
    # the beam's scores are the exact scores (the same normalisation over the trained children)
    beam = recommend(run, HISTORIES, k=NEW, decoder="beam", num_beams=NEW, exclude_history=False)
    for b, row in enumerate(beam):
        np.testing.assert_allclose(row.scores, exact1[b, row.items - 1].numpy(), atol=1e-4)
    # histories holding new items are read (their input vectors come from their codes and content)
    assert recommend(run, [[35, 36, 2]], k=5, decoder="dense")[0].items.shape == (5,)


def test_versions_chain_and_a_checkpoint_refuses_ids_that_do_not_extend_its_own(world: dict[str, Path], capsys) -> None:
    run_dir = _fresh(world, "run_chain")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["mid"])]) == 0  # 34 -> 37
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 0  # 37 -> 40
    entries = lineage(run_dir / "semantic_ids.npz")
    assert [e["num_items"] for e in entries] == [OLD, 37]
    assert SemanticIDs.load_arrays(run_dir / "semantic_ids.npz")[ADDED_CONTENT].shape == (NEW - OLD, 16)
    assert load_run(run_dir).model.num_items == NEW
    # tampered: two old items swap tuples, lineage kept -> refused, naming the checkpoint
    ids = SemanticIDs.load(run_dir / "semantic_ids.npz")
    codes = ids.codes.copy()
    codes[[0, 1]] = codes[[1, 0]]
    meta = SemanticIDs.load_metadata(run_dir / "semantic_ids.npz")
    extra = SemanticIDs.load_arrays(run_dir / "semantic_ids.npz")
    SemanticIDs(codes, ids.item_ids, ids.codebook_sizes).save(
        run_dir / "semantic_ids.npz", arrays=extra, **{k: v for k, v in meta.items() if k not in ("format", "version", "codebook_sizes")})
    with pytest.raises(ValueError, match="trained with other semantic IDs"):
        load_run(run_dir)
    # a lineage that does not hold the checkpoint's version -> refused
    ids.save(run_dir / "semantic_ids.npz", arrays=extra, lineage=[{"digest": "0" * 64, "num_items": OLD}], data=meta["data"])
    with pytest.raises(ValueError, match="does not extend"):
        load_run(run_dir)
    assert main(["evaluate", "--run", str(run_dir), "--max-users", "3"]) == 2
    assert "does not extend" in capsys.readouterr().err


def test_evaluate_on_the_new_data_scores_every_decoder(world: dict[str, Path]) -> None:
    from generator.runs.evaluate import evaluate_run

    run_dir = _fresh(world, "run_eval")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 0
    with pytest.raises(ValueError, match="semid choose-fusion"):  # the fusion stored was chosen for the IDs before
        evaluate_run(run_dir, "test", decoder="hybrid", num_beams=10)
    assert main(["choose-fusion", "--run", str(run_dir)]) == 0
    for decoder in ("beam", "exact", "dense", "hybrid"):
        m = evaluate_run(run_dir, "test", decoder=decoder, num_beams=10)
        assert m["users_evaluated"] == 24 and m["invalid_items"] == 0 and m["duplicate_items"] == 0
    stored = json.loads((run_dir / "hybrid.json").read_text())
    assert stored["ids_sha256"] == ids_digest(SemanticIDs.load(run_dir / "semantic_ids.npz"))  # chosen for the new IDs


def test_train_refuses_ids_fitted_on_another_catalogue_of_the_same_size(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    other = Path(shutil.copytree(world["old"], tmp_path / "other"))  # same item count, other embeddings
    np.save(other / "item_emb_minilm.npy", _embeddings(OLD)[::-1].copy())
    assert main(["train", "--data", str(other), "--ids", str(world["ids"]), "--out", str(tmp_path / "run"), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"but this dataset's {other / 'item_emb_minilm.npy'} has sha256" in err and "fitted on other embeddings" in err
    assert not (tmp_path / "run").exists()


def test_add_items_errors_name_what_to_do(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    run_dir = _fresh(world, "run_errors")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"]), "--quantizer", str(tmp_path / "q.pt")]) == 2
    assert "q.pt" in capsys.readouterr().err
    other = tmp_path / "other_ids"  # a quantizer of another fit: it would give the new items another tokeniser's codes
    assert main(["fit-codebooks", "--embeddings", str(world["mid"] / "item_emb_minilm.npy"), "--out", str(other),
                 "--levels", "2", "--codebook-size", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"]), "--quantizer", str(other / "quantizer.pt")]) == 2
    assert "quantizer.pt: fitted with other semantic IDs" in capsys.readouterr().err
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"]),  # the run's own, named: accepted
                 "--quantizer", str(world["ids"] / "quantizer.pt")]) == 0
    run_dir = _fresh(world, "run_errors")
    config = read_config(run_dir)  # its IDs' folder refitted since: the default quantizer there is another fit's too
    write_config(run_dir, {**config, "ids_source": str(other / "semantic_ids.npz")})
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 2
    assert "no longer the semantic IDs the run was trained with (refitted?)" in capsys.readouterr().err
    write_config(run_dir, config)
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["old"])]) == 2
    assert "nothing to add" in capsys.readouterr().err
    # the quantizer's input and the model's content are separate embeddings: content of the wrong width is refused
    # (codes from `--embeddings other`, content from the run's own `minilm`), and nothing is written
    wide = tmp_path / "wide"
    shutil.copytree(world["new"], wide)
    np.save(wide / "item_emb_other.npy", _embeddings(NEW))
    np.save(wide / "item_emb_minilm.npy", np.zeros((NEW, 8), dtype=np.float32))
    before = (run_dir / "semantic_ids.npz").read_bytes()
    np.save(world["old"] / "item_emb_other.npy", _embeddings(OLD))  # (the run's folder has the codes' file too)
    try:
        assert main(["add-items", "--run", str(run_dir), "--data", str(wide), "--embeddings", "other"]) == 2
        assert "item_emb_minilm.npy has width 8, but the run was trained with content of width 16" in capsys.readouterr().err
    finally:
        (world["old"] / "item_emb_other.npy").unlink()
    assert (run_dir / "semantic_ids.npz").read_bytes() == before and not (run_dir / "semantic_ids.v1.npz").exists()
    # a data folder whose first items are not the run's (item 3 is another product): refused, the IDs untouched
    moved = tmp_path / "moved"
    shutil.copytree(world["new"], moved)
    lines = (moved / "items.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"A0003"', '"B0003"')
    (moved / "items.jsonl").write_text("\n".join(lines) + "\n")
    before = (run_dir / "semantic_ids.npz").read_bytes()
    assert main(["add-items", "--run", str(run_dir), "--data", str(moved)]) == 2
    assert "item 3 is 'B0003', but the run's item 3 is 'A0003'" in capsys.readouterr().err
    assert (run_dir / "semantic_ids.npz").read_bytes() == before
    # the run's items with another title, or embeddings made again by another encoder: refused too (both passed)
    retitled = Path(shutil.copytree(world["new"], tmp_path / "retitled"))
    lines = (retitled / "items.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"item 5"', '"item five"')
    (retitled / "items.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["add-items", "--run", str(run_dir), "--data", str(retitled)]) == 2
    assert "item 5's title is 'item five', but the run's item 5's title is 'item 5'" in capsys.readouterr().err
    reembedded = Path(shutil.copytree(world["new"], tmp_path / "reembedded"))
    emb = _embeddings(NEW)
    emb[6] += 0.01
    np.save(reembedded / "item_emb_minilm.npy", emb)
    assert main(["add-items", "--run", str(run_dir), "--data", str(reembedded)]) == 2
    assert "item_emb_minilm.npy: item 7's embedding differs from the run's" in capsys.readouterr().err
    # codes from `--embeddings other` (the run's items' rows as the quantizer's input), content from the run's `minilm`
    # with one of the run's items changed: the model's content is checked too
    other = Path(shutil.copytree(reembedded, tmp_path / "other"))
    np.save(other / "item_emb_other.npy", _embeddings(NEW))
    np.save(world["old"] / "item_emb_other.npy", _embeddings(OLD))
    try:
        assert main(["add-items", "--run", str(run_dir), "--data", str(other), "--embeddings", "other"]) == 2
        assert "item_emb_minilm.npy: item 7's embedding differs" in capsys.readouterr().err
    finally:
        (world["old"] / "item_emb_other.npy").unlink()
    assert (run_dir / "semantic_ids.npz").read_bytes() == before
    # the run's own data folder prepared again in place (items renumbered): what DATA is checked against has changed
    inplace = Path(shutil.copytree(world["old"], tmp_path / "inplace"))
    write_config(run_dir, {**read_config(run_dir), "data": str(inplace)})
    lines = (inplace / "items.jsonl").read_text().splitlines()
    (inplace / "items.jsonl").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    assert main(["add-items", "--run", str(run_dir), "--data", str(world["new"])]) == 2
    assert f"{inplace}: the run's data folder changed since the run's items were numbered" in capsys.readouterr().err
    assert (run_dir / "semantic_ids.npz").read_bytes() == before


def test_the_embeddings_check_reads_rows_of_either_order(tmp_path: Path) -> None:
    from semid.safe_read import npy_rows

    a = np.arange(60, dtype=np.float32).reshape(12, 5)
    np.save(tmp_path / "c.npy", a)
    np.save(tmp_path / "f.npy", np.asfortranarray(a))  # (columns first: read through a map)
    for name in ("c.npy", "f.npy"):
        for lo, hi in ((0, 12), (3, 7), (11, 12), (5, 5)):
            assert np.array_equal(npy_rows(tmp_path / name, lo, hi), a[lo:hi]), (name, lo, hi)


def test_add_items_advises_choose_fusion_only_for_a_run_with_a_hybrid(world: dict[str, Path], capsys) -> None:
    run = _fresh(world, "run_advice")  # a dense head: its fusion was chosen for the IDs before
    assert main(["add-items", "--run", str(run), "--data", str(world["new"])]) == 0
    assert f"semid choose-fusion --run {run}" in capsys.readouterr().out
    bare = world["root"] / "run_no_dense"  # no dense head, no hybrid: that advice would fail
    flags = [f for f in FLAGS if f not in ("--dense", "both")]
    assert main(["train", "--data", str(world["old"]), "--ids", str(world["ids"]), "--out", str(bare), *flags,
                 "--max-epochs", "1", "--dense", "none"]) == 0
    capsys.readouterr()
    assert main(["add-items", "--run", str(bare), "--data", str(world["new"])]) == 0
    out = capsys.readouterr().out
    assert "added 6 items" in out and "choose-fusion" not in out and "hybrid" not in out


def test_add_items_names_the_real_problem_first(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = _fresh(world, "run_first")
    before = (run / "semantic_ids.npz").read_bytes()
    junk = tmp_path / "junk.pt"  # no stats.json beside it: the file itself is what is wrong, and said first
    junk.write_bytes(b"junk\n")
    assert main(["add-items", "--run", str(run), "--data", str(world["new"]), "--quantizer", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "junk.pt: not a quantizer file" in err and "stats.json" not in err, err
    for empty in ("", " "):  # an empty name was taken as the default
        with pytest.raises(SystemExit) as exit_:
            main(["add-items", "--run", str(run), "--data", str(world["new"]), "--embeddings", empty])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "argument --embeddings: must name the embeddings" in err, err
    from generator.runs.catalogue import add_items

    with pytest.raises(ValueError, match="`embeddings` .* got ''"):
        add_items(run, world["new"], embeddings="")
    assert (run / "semantic_ids.npz").read_bytes() == before


def test_choose_fusion_refuses_num_beams_on_a_causal_run(world: dict[str, Path], capsys) -> None:
    run = _fresh(world, "run_beams")  # the causal hybrid scores every item: no beam search reads --num-beams
    before = (run / "hybrid.json").read_bytes()
    assert main(["choose-fusion", "--run", str(run), "--num-beams", "40"]) == 2
    err = capsys.readouterr().err
    assert "--num-beams 40: the hybrid of a causal run searches no beams" in err and "leave out --num-beams" in err
    assert (run / "hybrid.json").read_bytes() == before


def test_a_damaged_stats_json_beside_the_quantizer_is_named(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    """stats.json (written by fit-codebooks) that is not an object, or whose `collaborative` has no int width, was an
    AttributeError / KeyError; now an error naming the file, and nothing is written."""
    run = _fresh(world, "run_stats")
    before = (run / "semantic_ids.npz").read_bytes()
    ids = tmp_path / "ids"
    shutil.copytree(world["ids"], ids)
    for text in ("[1]", '{"collaborative": {"w": 3}}', "{not json"):
        (ids / "stats.json").write_text(text)
        assert main(["add-items", "--run", str(run), "--data", str(world["new"]), "--quantizer", str(ids / "quantizer.pt")]) == 2
        err = capsys.readouterr().err
        assert "stats.json: " in err and "fit the codebooks again" in err, err
    assert (run / "semantic_ids.npz").read_bytes() == before


def test_embeddings_of_another_name_than_the_quantizers_are_refused(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`--embeddings w16` where the run's data folder has no item_emb_w16.npy: the new items' codes came from whatever
    encoder made it, with a warning only; the quantizer's stats.json names the file it was fitted on."""
    run = _fresh(world, "run_w16")
    new = Path(shutil.copytree(world["new"], tmp_path / "new"))
    np.save(new / "item_emb_w16.npy", np.random.default_rng(0).normal(size=(NEW, 16)).astype(np.float32))
    before = (run / "semantic_ids.npz").read_bytes()
    assert main(["add-items", "--run", str(run), "--data", str(new), "--embeddings", "w16"]) == 2
    err = capsys.readouterr().err
    assert "--embeddings w16: the quantizer was fitted on item_emb_minilm.npy" in err and "pass --embeddings minilm" in err, err
    assert (run / "semantic_ids.npz").read_bytes() == before


def test_a_run_with_added_items_resumes(world: dict[str, Path]) -> None:
    """A resume checks the run's copy of its IDs against those it was trained with: after add-items that copy is
    their extension, whose lineage names them (kept resumable)."""
    run = _fresh(world, "run_resume")
    assert main(["add-items", "--run", str(run), "--data", str(world["new"])]) == 0
    flags = [f if f != "2" else "3" for f in FLAGS]  # one more epoch
    assert main(["train", "--data", str(world["old"]), "--ids", str(world["ids"]), "--out", str(run), "--resume", *flags]) == 0
