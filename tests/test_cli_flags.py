"""The command line's flags as a user types them (a helper's audit, December 2026): --debug after the command (every
error's hint names it), a flag given twice said, and errors that name the flag, not the library's argument."""

from __future__ import annotations

from pathlib import Path

import pytest

from semid_cli import main


def test_debug_and_verbose_are_taken_after_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run folder"):  # (it was "unrecognized arguments: --debug")
        main(["recommend", "--run", str(tmp_path / "none"), "--history", "1", "--debug"])
    assert main(["recommend", "--run", str(tmp_path / "none"), "--history", "1", "-v"]) == 2


def test_a_flag_given_twice_is_said(serve_world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--run", str(serve_world["v1"]), "--history", "1,2", "--history", "3", "-k", "2", "--json"]) == 0
    out = capsys.readouterr()
    assert "--history given twice: the last one is used, [3]" in out.err and '"history": [\n    3\n  ]' in out.out
    assert main(["recommend", "--run", str(serve_world["v1"]), "--history", "3", "-k", "2", "--no-exclude-history",
                 "--exclude-history", "--json"]) == 0
    assert "--exclude-history given twice (after --no-exclude-history)" in capsys.readouterr().err


def test_errors_name_the_flags(serve_world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(serve_world["v1"]), "--k", "5,30", "--max-users", "2"]) == 2
    err = capsys.readouterr().err
    assert "`--num-beams` must be" in err and "`num_beams`" not in err
