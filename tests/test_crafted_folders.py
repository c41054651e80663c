"""Crafted and careless folders (issue 22, items 2, 3, 7, 8, 11): a symlinked `RUN/train.lock` never writes its target,
`semid demo` deletes only its own run folder, `semid train --out` refuses someone's folder, `fit-codebooks --out LINK`
writes through the link, and what a kill -9 or a crafted manifest leaves is cleaned or refused by name.

One tiny causal run (2 optimiser steps) and one codebooks folder are made once; each test works on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from generator.runs.folder import read_config, write_config
from semid.codebooks import check_codebooks, check_out
from semid.io import folder_lock
from semid_cli import main
from tests.test_generator_helpers import write_random_dataset

SECRET = b"precious bytes \x00\xff that must stay\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted")
    data = write_random_dataset(root / "data")
    np.save(data / "item_emb_minilm.npy", np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    ids = root / "ids"
    assert main(["fit-codebooks", "--embeddings", str(data / "item_emb_minilm.npy"), "--out", str(ids), "--levels", "2",
                 "--codebook-size", "4", "--no-progress"]) == 0
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(ids), "--out", str(run), "--max-steps", "2", "--batch-size", "8",
                 "--num-beams", "10", "--final-val-users", "0", "--no-progress"]) == 0
    return {"data": data, "ids": ids, "run": run}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _train_argv(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(world["data"]), "--ids", str(world["ids"]), "--out", str(out), "--max-steps", "3",
            "--batch-size", "8", "--num-beams", "10", "--final-val-users", "0", "--no-progress", *extra]


# ---- item 2: the lock never follows a link nor writes a file that is not its own ----------------------------------
@pytest.mark.parametrize("command", ["train", "train --resume", "add-items"])
def test_a_symlinked_train_lock_keeps_its_target_byte_for_byte(world, tmp_path: Path, capsys, command: str) -> None:
    run = _copy(world["run"], tmp_path / "run")
    victim = tmp_path / "important.txt"
    victim.write_bytes(SECRET)
    (run / "train.lock").symlink_to(victim)
    before = _files(run)
    if command == "add-items":
        argv = ["add-items", "--run", str(run), "--data", str(world["data"])]
    else:
        argv = _train_argv(world, run, *(["--resume"] if command.endswith("resume") else []))
    rc, err = main(argv), capsys.readouterr().err
    assert victim.read_bytes() == SECRET, err  # first: the file outside the run is untouched
    assert rc == 2
    assert f"{run / 'train.lock'}: is a symbolic link" in err and "not followed" in err and f"rm {run / 'train.lock'}" in err
    assert "precious" not in err and "Traceback" not in err  # the target's bytes are never shown
    assert (run / "train.lock").is_symlink() and _files(run) == before


@pytest.mark.parametrize("kind", ["hard link", "fifo", "folder"])
def test_a_lock_path_that_is_not_a_plain_file_of_its_own_is_refused_and_left_alone(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    lock = folder / "train.lock"
    victim = tmp_path / "important.txt"
    victim.write_bytes(SECRET)
    if kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    with pytest.raises(FileExistsError, match=r"train\.lock: .*(hard links|not a regular file|cannot be opened)"), \
            folder_lock(folder, "train.lock"):
        pass
    assert victim.read_bytes() == SECRET and os.path.lexists(lock)


def test_a_stale_lock_holding_no_pid_is_taken_over_without_showing_its_content(tmp_path: Path, caplog) -> None:
    (tmp_path / "train.lock").write_bytes(SECRET)
    with folder_lock(tmp_path, "train.lock"):
        assert (tmp_path / "train.lock").read_text() == f"{os.getpid()}\n"
    assert "not a pid" in caplog.text and "precious" not in caplog.text


def test_a_lock_this_user_cannot_open_names_its_live_holder_and_is_never_called_removable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's live lock (not writable by this user) was reported as "cannot be opened as a lock file ...
    remove it", and removing it let a second writer in beside the running training (a helper's audit). A held lock
    names its holder; only one no one holds is called removable. (Simulated: root's opens never fail.)"""
    import errno
    import fcntl

    import semid.io

    lock = tmp_path / "train.lock"
    lock.write_text("4242\n")
    held = os.open(lock, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another open file: conflicts as another process's would
    real = os.open

    def no_write(path, flags, *args):  # noqa: ANN001, ANN002, ANN202
        if Path(path) == lock and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, flags, *args)

    monkeypatch.setattr(semid.io.os, "open", no_write)
    try:
        with pytest.raises(FileExistsError, match=r"another user's command \(pid 4242\) is using this folder now"), \
                folder_lock(tmp_path, "train.lock"):
            pass
        fcntl.flock(held, fcntl.LOCK_SH)  # a reader's lock (distill, combine): held too (a shared try succeeded)
        with pytest.raises(FileExistsError, match=r"another user's command \(pid 4242\) is using this folder now"), \
                folder_lock(tmp_path, "train.lock"):
            pass
    finally:
        fcntl.flock(held, fcntl.LOCK_UN)
        os.close(held)
    with pytest.raises(FileExistsError, match=r"cannot be opened as a lock file \(Permission denied\)\. .*remove it"), \
            folder_lock(tmp_path, "train.lock"):
        pass
    assert lock.read_text() == "4242\n"


def test_readers_share_the_lock_and_a_writer_excludes_them(tmp_path: Path) -> None:
    """`semid distill` and `combine` only read their source, yet took the exclusive lock: of three distills of one
    run, two were refused as if a writer held it (a helper's audit). Readers share it; a writer excludes readers and
    readers a writer; the last reader out removes the file, and a reader never writes its pid."""
    lock = tmp_path / "train.lock"
    with folder_lock(tmp_path, "train.lock", shared=True), folder_lock(tmp_path, "train.lock", shared=True):
        assert lock.read_text() == ""  # (the file names an exclusive holder only)
        with pytest.raises(FileExistsError, match=r"a command is reading or writing this folder now"), \
                folder_lock(tmp_path, "train.lock", what="a training"):
            pass
    assert not lock.exists()  # the last reader removed it
    with folder_lock(tmp_path, "train.lock", what="a training"):
        with pytest.raises(FileExistsError, match=rf"a training \(pid {os.getpid()}\) is writing this folder now"), \
                folder_lock(tmp_path, "train.lock", shared=True, what="a training"):
            pass
    import fcntl

    lock.write_text("")
    held = os.open(lock, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # a writer that has not written its pid yet (or the last reader leaving)
    try:
        with pytest.raises(FileExistsError, match=r"a command is reading or writing this folder now"), \
                folder_lock(tmp_path, "train.lock", shared=True, what="a training"):
            pass  # (was: "a training (pid None) is writing")
    finally:
        os.close(held)
    lock.unlink()
    with folder_lock(tmp_path, "train.lock", shared=True):  # one reader still in: the first out leaves the file
        with folder_lock(tmp_path, "train.lock", shared=True):
            pass
        assert lock.exists()
    assert not lock.exists()


# ---- item 3: the demo checks every argument and its folder before it deletes anything -----------------------------
def _demo(world: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["demo", "--data", str(world["data"]), "--out", str(out), "--max-time", "00:00:05", "--eval-users", "5",
                 "--no-progress", *extra])


def _demo_folder(world: dict[str, Path], out: Path) -> Path:
    """A folder an earlier demo wrote: its codebooks (reused) and its run."""
    out.mkdir()
    _copy(world["ids"], out / "ids")
    _copy(world["run"], out / "run")
    (out / "data_summary.json").write_text("{}\n")
    return out


def test_demo_keeps_its_run_when_a_later_argument_is_invalid(world, tmp_path: Path, capsys) -> None:
    out = _demo_folder(world, tmp_path / "demo")
    before = _files(out)
    assert _demo(world, out, "--max-time", "abc") == 2
    assert "`--max-time` must be HH:MM:SS or DD:HH:MM:SS, got 'abc'" in capsys.readouterr().err
    assert _files(out) == before  # not even data_summary.json rewritten


def test_demo_keeps_a_run_that_a_training_holds(world, tmp_path: Path, capsys) -> None:
    out = _demo_folder(world, tmp_path / "demo")
    before = _files(out / "run")
    with folder_lock(out / "run", "train.lock", what="a training"):  # stands for a training in another process
        assert _demo(world, out) == 2
        assert _files(out / "run") == {**before, "train.lock": f"{os.getpid()}\n".encode()}
    assert f"a training or add-items (pid {os.getpid()}) is writing this folder now" in capsys.readouterr().err
    assert _files(out / "run") == before


@pytest.mark.parametrize("where", ["run", "out"])
def test_demo_keeps_a_folder_it_did_not_write(world, tmp_path: Path, capsys, where: str) -> None:
    out = _demo_folder(world, tmp_path / "demo")
    (out / "run" if where == "run" else out).joinpath("thesis.tex").write_text("years of work\n")
    before = _files(out)
    assert _demo(world, out) == 2
    err = capsys.readouterr().err
    assert "thesis.tex" in err and ("not a demo folder" in err if where == "out" else "semid does not write in a run folder" in err)
    assert _files(out) == before


def test_the_demo_replaces_its_own_run_folder(world, tmp_path: Path) -> None:
    from semid_cli.demo import check_demo_out, replace_demo_run

    out = _demo_folder(world, tmp_path / "demo")
    check_demo_out(out)  # an earlier demo's folder passes
    replace_demo_run(out / "run", delete=True)
    assert not (out / "run").exists() and (out / "ids" / "semantic_ids.npz").is_file()


# ---- item 7: `train --out` into a folder that is not a run folder is refused --------------------------------------
@pytest.mark.parametrize("what", ["codebooks folder", "foreign folder", "file"])
def test_train_refuses_an_out_that_is_not_a_run_folder(world, tmp_path: Path, capsys, what: str) -> None:
    if what == "codebooks folder":
        out = _copy(world["ids"], tmp_path / "cb")
    elif what == "foreign folder":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    else:
        out = tmp_path / "a-file"
        out.write_bytes(SECRET)
    before = _files(out) if out.is_dir() else out.read_bytes()
    assert main(_train_argv(world, out)) == 2
    err = capsys.readouterr().err
    if what == "file":
        assert f"{out}: exists and is a file; give --out a new folder" in err and "Errno" not in err
        assert out.read_bytes() == before
    else:
        shown = "code_usage.png, manifest.json, quantizer.pt" if what == "codebooks folder" else "notes.txt"
        assert f"{out}: not empty and not a run folder (it holds {shown}" in err
        assert _files(out) == before
        if what == "codebooks folder":
            check_codebooks(out)  # still whole: `train --ids` reads it as before


def test_train_still_reuses_a_folder_left_by_a_setup_that_failed_before_config_yaml(world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    shutil.copyfile(world["ids"] / "semantic_ids.npz", out / "semantic_ids.npz")  # what a failed title setup leaves
    (out / "train.lock").write_text("999999999\n")  # and a kill -9
    assert main(_train_argv(world, out)) == 0, capsys.readouterr().err
    assert (out / "config.yaml").is_file()


# ---- item 8: fit-codebooks --out LINK ---------------------------------------------------------------------------
def test_fit_codebooks_writes_through_a_symlink_and_leaves_no_temporary_folder(world, tmp_path: Path) -> None:
    target = _copy(world["ids"], tmp_path / "real" / "cb")
    link = tmp_path / "links" / "cb_link"
    link.parent.mkdir()
    link.symlink_to(target)
    old = link.parent / ".cb_link.writing-999999999-abcdefgh"  # what an older semid left for good
    old.symlink_to(target)
    emb = world["data"] / "item_emb_minilm.npy"
    assert main(["fit-codebooks", "--embeddings", str(emb), "--out", str(link), "--levels", "2", "--codebook-size", "4",
                 "--seed", "1", "--no-progress"]) == 0
    assert link.is_symlink() and Path(os.readlink(link)) == target  # the link stays a link to the same folder
    check_codebooks(link)  # the new set, whole
    assert json.loads((target / "stats.json").read_text())["config"]["seed"] == 1
    left = [p.name for p in [*link.parent.iterdir(), *target.parent.iterdir()] if ".writing-" in p.name or ".old-" in p.name]
    assert left == []
    file_link = tmp_path / "file_link"
    file_link.symlink_to(emb)
    with pytest.raises(FileExistsError, match="a symbolic link to .*item_emb_minilm.npy, which is not a folder"):
        check_out(file_link, overwrite=False)


# ---- item 11: leftovers ------------------------------------------------------------------------------------------
def _kill_mid_write(path: Path) -> Path:
    """A process killed (SIGKILL) inside semid.io.atomic_path while writing ``path``; returns its temporary file."""
    import subprocess
    import sys

    code = ("import os, signal, sys\nfrom semid.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half a checkpoint')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=Path(__file__).parents[1], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    (left,) = path.parent.glob(f".{path.name}.*{path.suffix}")
    return left


def test_resume_and_a_new_training_remove_a_checkpoint_write_cut_short(world, tmp_path: Path, capsys) -> None:
    run = _copy(world["run"], tmp_path / "run")
    left = _kill_mid_write(run / "checkpoints" / "resume.ckpt")
    assert main(_train_argv(world, run, "--resume")) == 0, capsys.readouterr().err
    assert not left.exists() and not list((run / "checkpoints").glob(".*"))
    # a first run killed while writing its first checkpoint: a new training into it cleans and goes on
    fresh = _copy(world["run"], tmp_path / "fresh")
    shutil.rmtree(fresh / "checkpoints")
    (fresh / "checkpoints").mkdir()
    write_config(fresh, {**read_config(fresh), "best_checkpoint": None})
    left = _kill_mid_write(fresh / "checkpoints" / "resume.ckpt")
    assert main(_train_argv(world, fresh)) == 0, capsys.readouterr().err
    assert not left.exists() and (fresh / "checkpoints" / "best.ckpt").is_file()


def test_a_manifest_entry_outside_the_codebooks_folder_is_refused_by_name(world, tmp_path: Path, capsys) -> None:
    ids = _copy(world["ids"], tmp_path / "ids")
    outside = world["data"] / "items.jsonl"
    manifest = json.loads((ids / "manifest.json").read_text())
    shutil.copytree(world["data"], tmp_path / "data")  # so that ids/../data/items.jsonl exists, with this digest
    manifest["files"]["../data/items.jsonl"] = {"bytes": outside.stat().st_size,
                                                "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (ids / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: lists '\.\./data/items\.jsonl', which is not a file of a codebooks folder"):
        check_codebooks(ids)
    assert main(["train", "--data", str(world["data"]), "--ids", str(ids), "--out", str(tmp_path / "run")]) == 2
    assert "'../data/items.jsonl'" in capsys.readouterr().err and not (tmp_path / "run").exists()
