"""`semid fit-codebooks`: the four files, for both methods, and the errors a user can make. Tiny data only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rqvae import load_quantizer
from semid import SemanticIDs
from semid_cli import main

FAST = {"rqvae": ["--max-epochs", "2"], "rqkmeans": []}


@pytest.fixture
def embeddings(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 12))[rng.integers(0, 6, 120)] * 3 + rng.standard_normal((120, 12))).astype(
        np.float32
    )
    x[100:] = x[:20]  # exact duplicates: collide unless balanced
    path = tmp_path / "item_emb_test.npy"
    np.save(path, x)
    return path


# two one-step epochs on 120 items leave some RQ-VAE codes unused, which fit_codebooks rightly warns about
@pytest.mark.filterwarnings("ignore:level 0 uses:UserWarning")
@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
@pytest.mark.parametrize("balanced", ["--balanced", "--no-balanced"])
def test_writes_all_four_files(method: str, balanced: str, embeddings: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ids"
    argv = ["fit-codebooks", "--embeddings", str(embeddings), "--out", str(out), "--method", method, balanced]
    argv += [
        "--levels",
        "2",
        "--codebook-size",
        "8",
        "--extra-level-size",
        "64",
        "--no-progress",
        *FAST[method],
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "code_usage.png",
        "manifest.json",
        "quantizer.pt",
        "semantic_ids.npz",
        "stats.json",
    ]
    ids = SemanticIDs.load(out / "semantic_ids.npz")
    assert ids.num_items == 120 and ids.codebook_sizes == (8, 8, 64)
    meta = SemanticIDs.load_metadata(out / "semantic_ids.npz")
    assert meta["method"] == method and meta["embeddings"] == str(embeddings)
    stats = json.loads((out / "stats.json").read_text())
    assert [lvl["codebook_size"] for lvl in stats["per_level"]] == [8, 8]
    assert stats["items_colliding"] == ids.collision_stats().items_colliding
    if balanced == "--no-balanced":
        assert stats["items_colliding"] >= 40  # the 20 duplicated rows and their originals
    elif np.unique(ids.codes[:, 0], return_counts=True)[1].max() <= 8:  # every prefix has room for its items
        assert stats["items_colliding"] == 0
    assert stats["seconds"] > 0 and 0 < stats["reconstruction_rel"] < 1
    quantizer = load_quantizer(out / "quantizer.pt")  # with weights_only=True
    x = np.load(embeddings)
    np.testing.assert_array_equal(quantizer.encode(x)[:, 0], ids.codes[:, 0])
    assert torch.load(out / "quantizer.pt", weights_only=True)["method"] == method
    assert (out / "code_usage.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "codes used per level" in printed and "items colliding" in printed
    assert not list(out.glob(".*"))  # no temporary files left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--codebook-size", "1"], "`--codebook-size` must be an int >= 2, got 1"),
        (["--levels", "0"], "`--levels` must be an int >= 1, got 0"),
        (["--codebook-size", "500"], "item_emb_test.npy: 120 rows (items), fewer than --codebook-size 500: every code "
         "of a level needs an item; pass --codebook-size 120 or less"),
        # checked before the fit (they were reached after it: a 40-level fit, then "an int64 key can hold")
        (["--levels", "40", "--codebook-size", "4"], "--levels 40 of --codebook-size 4 (and --extra-level-size 256) make "
         "more ID prefixes than an int64 key holds"),
        (["--extra-level-size", "0"], "--extra-level-size must be a positive int"),
        (["--extra-level-size", "70000"], "--extra-level-size 70,000 is more than max(65,536, the 120 items)"),  # (it was
        # refused after the whole fit, as "codebook size 70,000 at level 2", no flag named: a helper's audit)
        (["--method", "rqkmeans", "--max-epochs", "3"], "--max-epochs applies to --method rqvae only"),
        (["--no-balanced", "--extra-level-size", "1"], "raise `--extra-level-size`"),
    ],
)
def test_errors_are_one_line_and_status_2(
    extra: list[str], message: str, embeddings: Path, tmp_path: Path, capsys
) -> None:
    argv = [
        "fit-codebooks",
        "--embeddings",
        str(embeddings),
        "--out",
        str(tmp_path / "ids"),
        "--method",
        "rqkmeans",
    ]
    argv += ["--levels", "2", "--codebook-size", "8", "--no-progress", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_or_bad_embeddings_file(tmp_path: Path, capsys) -> None:
    assert (
        main(["fit-codebooks", "--embeddings", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no embeddings file here" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    x = np.ones((20, 4), np.float32)
    x[3, 1] = np.nan
    np.save(bad, x)
    assert (
        main(
            ["fit-codebooks", "--embeddings", str(bad), "--out", str(tmp_path / "o"), "--codebook-size", "4"]
        )
        == 2
    )
    assert "bad.npy: row 3 (item 4) has NaN or inf values" in capsys.readouterr().err  # the file named (issue 22)
    np.save(bad, np.ones((0, 4), np.float32))  # no rows: it said "pass --codebook-size 0 or less"
    assert main(["fit-codebooks", "--embeddings", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.npy: 0 rows (items): codebooks need two items or more" in capsys.readouterr().err


def test_out_that_is_not_a_codebooks_folder_is_refused_unless_overwrite(
    embeddings: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"  # a run folder: its IDs copy has the same name as ours
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("format: semid.run\n")
    (run / "semantic_ids.npz").write_bytes(b"the run's own IDs")
    argv = ["fit-codebooks", "--embeddings", str(embeddings), "--method", "rqkmeans", "--levels", "2"]
    argv += ["--codebook-size", "8", "--extra-level-size", "64", "--no-progress"]
    assert main([*argv, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run}: not empty and not a codebooks folder (it holds checkpoints/, config.yaml, which" in err
    assert "--overwrite" in err
    assert (run / "semantic_ids.npz").read_bytes() == b"the run's own IDs"  # untouched
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "semantic_ids.npz"]

    # a codebooks folder, complete or interrupted, is re-fitted in place without the flag
    ids = tmp_path / "ids"
    assert main([*argv, "--out", str(ids)]) == 0
    ids.chmod(0o750)
    assert main([*argv, "--out", str(ids), "--seed", "1"]) == 0
    assert ids.stat().st_mode & 0o777 == 0o750  # the folder replaced whole keeps its permissions (it became 0o755)
    (ids / "stats.json").unlink()
    (ids / ".quantizer.pt.x1y2.pt").write_bytes(b"")  # left by a killed atomic write
    assert main([*argv, "--out", str(ids)]) == 0
    (ids / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(ids)]) == 2
    assert "(it holds notes.txt, which" in capsys.readouterr().err

    # --overwrite writes our four files and leaves the others alone
    assert main([*argv, "--out", str(run), "--overwrite"]) == 0
    assert SemanticIDs.load(run / "semantic_ids.npz").num_items == 120
    assert (run / "config.yaml").read_text() == "format: semid.run\n"
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_empty_or_truncated_embeddings_file(embeddings: Path, tmp_path: Path, capsys) -> None:
    whole = embeddings.read_bytes()
    for content, message in [(b"", "the file is empty (0 bytes)"), (whole[: len(whole) // 2], "truncated or damaged")]:
        embeddings.write_bytes(content)
        assert main(["fit-codebooks", "--embeddings", str(embeddings), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert f"{embeddings}: not a readable .npy array: {message}" in err and "write it again" in err
    assert not (tmp_path / "o").exists()


def test_an_out_under_a_file_is_refused_before_the_fit(embeddings: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("")
    argv = ["fit-codebooks", "--embeddings", str(embeddings), "--out", str(tmp_path / "afile" / "ids"), "--levels", "2",
            "--codebook-size", "8", "--no-progress"]
    assert main(argv) == 2  # (after the fit: "[Errno 17] File exists: '.../afile'")
    assert f"{tmp_path / 'afile'} is a file, not a folder; choose another --out" in capsys.readouterr().err


def test_an_operating_system_error_is_a_line_naming_the_path_and_status_2(
    embeddings: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import semid_cli.codebooks as cli

    def denied(*args, **kwargs):  # what writing into a read-only folder raises (root is never refused: simulated)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro" / ".ids.writing-1"))

    monkeypatch.setattr(cli, "write_codebooks", denied)
    argv = ["fit-codebooks", "--embeddings", str(embeddings), "--out", str(tmp_path / "ids"), "--levels", "2",
            "--codebook-size", "8", "--no-progress"]
    assert main(argv) == 2  # (a traceback and status 1 before)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'ro' / '.ids.writing-1'}: permission denied; check its permissions, or choose another path" in err
    assert "Traceback" not in err


def test_warnings_print_as_one_line(capsys) -> None:
    import warnings

    from semid_cli import console

    with warnings.catch_warnings():  # (Python's format added the file, line and source line of the warn call)
        warnings.simplefilter("always")
        console.setup(False)
        warnings.warn("level 0 uses 3 of its 8 codes", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "warning: level 0 uses 3 of its 8 codes\n"
