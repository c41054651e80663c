"""The `semid` command line. Each command lives in its own module with a `register(subparsers)` function.

This package sits above the library: it may import `semid`, `rqvae` and `generator`, and none of them imports it
(tests/test_package_layout.py checks both; see docs/architecture.md).
Library code raises ValueError / TypeError / FileNotFoundError with a message that names the file, line or argument;
the command line prints that message and exits with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from semid_cli import console

# command -> (module, one-line help), in the order they appear in `semid --help`. Only the module of the command
# being run is imported, so `semid prepare` loads neither torch nor lightning nor transformers.
COMMANDS = {
    "prepare": ("semid_cli.prepare", "convert raw interaction data into a dataset folder"),
    "embed": ("semid_cli.embed", "embed item text with a local transformers model folder"),
    "fit-codebooks": ("semid_cli.codebooks", "fit codebooks (residual k-means or RQ-VAE) and write semantic IDs"),
    "train": ("semid_cli.train", "train the generator into a run folder"),
    "evaluate": ("semid_cli.evaluate", "evaluate a run on the validation or test users"),
    "recommend": ("semid_cli.recommend", "top-k items for a history"),
    "choose-fusion": ("semid_cli.choose_fusion", "choose the hybrid decoder's fusion on validation users"),
    "add-items": ("semid_cli.add_items", "add items that came after training to a run, for good"),
    "serve": ("semid_cli.serve", "serve a run over HTTP: recommend, items, health, metrics, reload"),
    "digest": ("semid_cli.digest", "print the digests that pin a run, to check with --expect-sha256"),
    "demo": ("semid_cli.demo", "fit codebooks, train, evaluate and recommend on a dataset folder (about 10 minutes)"),
}
COMMAND_MODULES = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is imported (the others get a stub)."""
    parser = argparse.ArgumentParser(prog="semid", description="Generative retrieval with semantic IDs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, with Lightning's detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is not an option), if it is one of ours."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    parser = build_parser(command) if command is not None else build_parser()
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"semid {args.command}: error: {e}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    except BaseException as e:  # generator.training.resume.TrainingInterrupted (SIGINT/SIGTERM), not imported here: exit 130/143
        if args.debug or not isinstance(getattr(e, "exit_code", None), int):
            raise
        print(f"semid {args.command}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
