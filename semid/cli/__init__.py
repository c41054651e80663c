"""The `semid` command line. Each command lives in its own module with a `register(subparsers)` function.

This package is the only place that imports both `rqvae` and `generator` (see docs/architecture.md).
Library code raises ValueError / TypeError / FileNotFoundError with a message that names the file, line or argument;
the command line prints that message and exits with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# command modules, in the order they appear in `semid --help`
COMMAND_MODULES = (
    "semid.cli.prepare",
    "semid.cli.embed",
    "semid.cli.codebooks",
    "semid.cli.train",
    "semid.cli.evaluate",
    "semid.cli.recommend",
    "semid.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semid", description="Generative retrieval with semantic IDs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"semid {args.command}: error: {e}  (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
