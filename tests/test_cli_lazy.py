"""The command line imports only the module of the command being run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from semid_cli import COMMANDS, build_parser

HEAVY = ("torch", "lightning", "transformers")
PROBE = """
import sys
from semid_cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules))
"""


def _loaded(argv: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True, text=True, check=True)
    return next(line for line in out.stdout.splitlines() if line.startswith("LOADED"))


def test_prepare_help_imports_no_torch_lightning_or_transformers() -> None:
    assert _loaded(["prepare", "--help"]) == "LOADED []"
    assert _loaded(["--debug", "prepare", "--help"]) == "LOADED []"


def test_help_of_commands_that_load_the_run_later_imports_none_of_them() -> None:
    # their shared flags (semid_cli.args) must not import generator (and with it torch) to add --decoder & co.
    assert _loaded(["digest", "--help"]) == "LOADED []"
    assert _loaded(["choose-fusion", "--help"]) == "LOADED []"
    assert _loaded(["distill", "--help"]) == "LOADED []"  # its flags come from DistillOptions' fields


def test_train_help_does_import_what_it_needs() -> None:
    assert "lightning" in _loaded(["train", "--help"])  # the probe sees imports: the test above is not vacuous


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_parses_its_help_alone(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser(command).parse_args([command, "--help"])
    assert e.value.code == 0 and command in capsys.readouterr().out
