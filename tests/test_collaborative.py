"""Item embeddings with collaborative signal beside the text (semid.collaborative), for codebooks fitted on both."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from semid.collaborative import with_collaborative

TEXT = np.arange(1, 13, dtype=np.float32).reshape(4, 3)  # items 1..4
VECTORS = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)  # model rows 0, 1 are items 3, 1


def test_each_items_vector_lands_on_its_own_row_beside_its_normalised_text() -> None:
    out = with_collaborative(TEXT, VECTORS, np.array([3, 1]), weight=0.5)
    assert out.shape == (4, 5) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[:, :3], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out[:, :3] * np.linalg.norm(TEXT, axis=1, keepdims=True), TEXT, rtol=1e-5)
    np.testing.assert_allclose(out[2, 3:], [0.3, 0.4])  # item 3: its vector, unit norm, x 0.5
    np.testing.assert_allclose(out[0, 3:], [0.0, 0.5])  # item 1
    assert not out[[1, 3], 3:].any()  # items 2 and 4 have no vector: zeros, their codes come from their text


@pytest.mark.parametrize(("vectors", "ids", "weight", "message"), [
    (VECTORS, np.array([3, 5]), 1.0, "item ids span 3..5, but the text embeddings have rows for items 1..4"),
    (VECTORS, np.array([0, 1]), 1.0, "item ids span 0..1"),
    (VECTORS, np.array([2, 2]), 1.0, "item ids repeat"),
    (VECTORS, np.array([1]), 1.0, "2 item vectors for 1 item ids"),
    (VECTORS, np.array([1, 2]), 0.0, "`weight` must be a positive number, got 0.0"),
    (VECTORS[0], np.array([1]), 1.0, "must be 2-D"),
])
def test_mismatched_inputs_are_refused_by_name(vectors, ids, weight, message) -> None:
    with pytest.raises(ValueError, match=message.replace("`", "`").replace(".", r"\.")):
        with_collaborative(TEXT, vectors, ids, weight)


# ---- `semid fit-codebooks --collaborative RUN`, and items added later -------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from semid_cli import main
    from tests.test_generator_helpers import write_random_dataset

    root = tmp_path_factory.mktemp("collaborative")
    emb = np.random.default_rng(7).normal(size=(40, 16)).astype(np.float32)
    old = write_random_dataset(root / "old", num_items=34)
    np.save(old / "item_emb_minilm.npy", emb[:34])
    new = write_random_dataset(root / "new", num_items=40, seed=1)
    np.save(new / "item_emb_minilm.npy", emb)
    small = ["--levels", "2", "--codebook-size", "4", "--no-progress"]
    assert main(["fit-codebooks", "--embeddings", str(old / "item_emb_minilm.npy"), "--out", str(root / "ids"), *small]) == 0
    run = root / "run"
    assert main(["train", "--data", str(old), "--ids", str(root / "ids"), "--out", str(run), "--max-epochs", "1",
                 "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress"]) == 0
    cf = root / "ids_cf"
    assert main(["fit-codebooks", "--embeddings", str(old / "item_emb_minilm.npy"), "--out", str(cf), "--collaborative",
                 str(run), "--collaborative-weight", "2", *small]) == 0
    return {"root": root, "old": old, "new": new, "emb": emb, "run": run, "cf": cf, "small": small}


def test_a_collaborative_weight_without_its_run_is_refused(world: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from semid_cli import main  # (it was accepted and changed nothing)

    assert main(["fit-codebooks", "--embeddings", str(world["old"] / "item_emb_minilm.npy"), "--out",
                 str(world["root"] / "ids_w"), "--collaborative-weight", "2", *world["small"]]) == 2
    assert "--collaborative-weight weighs the vectors of --collaborative RUN" in capsys.readouterr().err
    assert not (world["root"] / "ids_w").exists()


def test_codebooks_are_fitted_on_the_text_beside_the_runs_item_vectors(world: dict) -> None:
    import json

    import torch

    from generator.runs.folder import load_run
    from rqvae import load_quantizer
    from semid.ids import SemanticIDs

    stats = json.loads((world["cf"] / "stats.json").read_text())
    run = load_run(world["run"])
    assert stats["collaborative"] == {"run": str(world["run"]), "checkpoint": run.checkpoint.name, "width": run.model.config.dense_dim,
                                      "weight": 2.0, "items": 34}
    with torch.no_grad():
        vectors = run.model.item_vectors()[:34].numpy()
    expected = with_collaborative(world["emb"][:34], vectors, run.ids.item_ids, 2.0)
    quantizer = load_quantizer(world["cf"] / "quantizer.pt")
    ids = SemanticIDs.load(world["cf"] / "semantic_ids.npz")
    # fitted on text + vectors (the first level: the balanced last level moves some items off their nearest code)
    np.testing.assert_array_equal(ids.codes[:, 0], quantizer.encode(expected)[:, 0])
    assert not np.array_equal(quantizer.encode(expected), quantizer.encode(with_collaborative(
        world["emb"][:34], np.zeros_like(vectors) + 1.0, run.ids.item_ids, 2.0)))  # the vectors matter to the codes


def test_items_added_later_get_codes_from_their_text_with_zeros_for_the_vectors_they_lack(world: dict, capsys) -> None:
    from rqvae import load_quantizer
    from semid.ids import SemanticIDs
    from semid_cli import main

    run = world["root"] / "run_cf"
    assert main(["train", "--data", str(world["old"]), "--ids", str(world["cf"]), "--out", str(run), "--max-epochs", "1",
                 "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress"]) == 0
    assert main(["add-items", "--run", str(run), "--data", str(world["new"])]) == 0
    assert "added 6 items" in capsys.readouterr().out
    text = world["emb"][34:] / np.linalg.norm(world["emb"][34:], axis=1, keepdims=True)
    width = json.loads((world["cf"] / "stats.json").read_text())["collaborative"]["width"]  # the run's vector width
    padded = np.concatenate([text, np.zeros((6, width), np.float32)], axis=1)
    codes = SemanticIDs.load(run / "semantic_ids.npz").codes[34:, :-1]
    np.testing.assert_array_equal(codes, load_quantizer(world["cf"] / "quantizer.pt").encode(padded))


def test_a_run_without_the_causal_dense_head_is_refused_by_name(world: dict, capsys) -> None:
    from semid_cli import main

    run = world["root"] / "run_nodense"
    assert main(["train", "--data", str(world["old"]), "--ids", str(world["root"] / "ids"), "--out", str(run),
                 "--max-epochs", "1", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress",
                 "--dense", "none"]) == 0
    assert main(["fit-codebooks", "--embeddings", str(world["old"] / "item_emb_minilm.npy"), "--out",
                 str(world["root"] / "x"), "--collaborative", str(run), *world["small"]]) == 2
    assert f"--collaborative {run}: a causal run without the causal design's dense head" in capsys.readouterr().err


def test_embeddings_of_another_catalogue_are_refused_and_a_run_with_added_items_is_taken(world: dict, capsys) -> None:
    """``--collaborative RUN`` glued RUN's 34 vectors onto rows 1-34 of a 40-row file of another catalogue (zeros for
    the rest) without a word; and on a run with items added (``semid add-items``) it failed with "34 item vectors for
    40 item ids" (a helper's audit). Rows must be the run's catalogue; the added items get zeros."""
    from rqvae import load_quantizer
    from semid.ids import SemanticIDs
    from semid_cli import main

    new_emb = str(world["new"] / "item_emb_minilm.npy")  # 40 rows; the run knows 34 items
    assert main(["fit-codebooks", "--embeddings", new_emb, "--out", str(world["root"] / "foreign"), "--collaborative",
                 str(world["run"]), *world["small"]]) == 2
    err = capsys.readouterr().err
    assert f"--collaborative {world['run']}: the run's catalogue holds 34 items, but --embeddings has 40 rows" in err
    assert not (world["root"] / "foreign").exists()
    grown = world["root"] / "run_grown"
    shutil.copytree(world["run"], grown)
    assert main(["add-items", "--run", str(grown), "--data", str(world["new"])]) == 0
    out = world["root"] / "ids_grown"
    assert main(["fit-codebooks", "--embeddings", new_emb, "--out", str(out), "--collaborative", str(grown), *world["small"]]) == 0
    width = json.loads((out / "stats.json").read_text())["collaborative"]["width"]
    text = world["emb"][34:] / np.linalg.norm(world["emb"][34:], axis=1, keepdims=True)
    padded = np.concatenate([text, np.zeros((6, width), np.float32)], axis=1)  # the added items: text and zeros
    np.testing.assert_array_equal(SemanticIDs.load(out / "semantic_ids.npz").codes[34:, 0],
                                  load_quantizer(out / "quantizer.pt").encode(padded)[:, 0])
