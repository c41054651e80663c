import os
import stat

import pytest

from semid.io import atomic_open, write_json


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == '{\n  "x": 1\n}\n'  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left behind


def test_atomic_write_gets_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "b.json", [])
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644


def test_atomic_write_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                               else "fsync file"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    write_json(tmp_path / "c.json", {"x": 1})
    assert events == ["fsync file", "rename", "fsync folder"]


def test_no_write_changes_the_process_umask_even_for_a_moment(tmp_path, monkeypatch):
    """Another thread creating a file while the umask is 0 would make it world-writable: nothing may set it."""
    from rqvae._checkpoint import save_checkpoint
    from semid.codebooks import _remove
    from semid.io import make_temp_dir

    mask = os.umask(0o027)
    try:
        def refuse(_mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", refuse)
        write_json(tmp_path / "d.json", [])
        save_checkpoint({"method": "rqkmeans"}, tmp_path / "q.pt")
        folder = make_temp_dir(tmp_path, ".cb.writing-1-")
        monkeypatch.undo()
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "q.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750 and folder.name.startswith(".cb.writing-1-")
    _remove(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "q.pt"]
