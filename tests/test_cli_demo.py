from semid_cli import main


def test_demo_without_a_dataset_says_what_to_do(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no dataset here" in err and "semid prepare" in err
    assert not (tmp_path / "out").exists()  # nothing written before the input was checked


def test_demo_without_embeddings_names_the_file_and_the_fix(tiny_dataset_dir, tmp_path, capsys):
    rc = main(["demo", "--data", str(tiny_dataset_dir), "--out", str(tmp_path / "out"), "--embeddings", "absent"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "item_emb_absent.npy: no item embeddings here" in err and "semid embed" in err


def test_demo_eval_users_takes_a_count_or_all(tiny_dataset_dir, tmp_path, capsys):
    import pytest

    for bad in ("0", " 5", "\u0665"):  # the same rule as evaluate's --max-users: ASCII digits only (int() takes these two)
        with pytest.raises(SystemExit):
            main(["demo", "--data", str(tiny_dataset_dir), "--out", str(tmp_path / "out"), "--eval-users", bad])
        assert f"argument --eval-users: must be a positive int (users sampled) or 'all', got {bad!r}" in capsys.readouterr().err
    from semid_cli import build_parser

    assert build_parser("demo").parse_args(["demo"]).eval_users is None  # all test users by default
    assert build_parser("demo").parse_args(["demo", "--eval-users", "500"]).eval_users == 500


def test_demo_fits_a_small_catalogue_it_was_pointed_at(tmp_path, capsys):
    """`semid demo --data` on a catalogue of fewer than 256 items failed at the codebooks ("pass --codebook-size 41 or
    less", a flag demo does not have), leaving data_summary.json behind (a helper's audit)."""
    import numpy as np

    from tests.test_generator_helpers import NUM_ITEMS, write_random_dataset

    data = write_random_dataset(tmp_path / "data")
    np.save(data / "item_emb_rand.npy", np.random.default_rng(0).normal(size=(NUM_ITEMS, 8)).astype(np.float32))
    rc = main(["demo", "--data", str(data), "--out", str(tmp_path / "out"), "--embeddings", "rand", "--max-time",
               "00:00:05", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out/run/config.yaml").is_file() and (tmp_path / "out/ids/semantic_ids.npz").is_file()
