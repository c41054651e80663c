"""The `semid` command line. Each command lives in its own module, which states only what is its own: `DESCRIPTION`
(its --help text), `add_arguments(parser)` (its flags; those several commands share come from `semid_cli.args`) and
`run(args) -> exit status`. Its name, module and one-line help are in `COMMANDS` below.

This package sits above the library: it may import `semid`, `rqvae` and `generator`, and none of them imports it
(tests/test_package_layout.py checks both; see docs/architecture.md).
Library code raises ValueError / TypeError / FileNotFoundError with a message that names the file, line or argument;
the command line prints that message and exits with status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from semid_cli import console

# command -> (module, one-line help), in the order they appear in `semid --help`. Only the module of the command
# being run is imported, so `semid prepare` loads neither torch nor lightning nor transformers.
COMMANDS = {
    "prepare": ("semid_cli.prepare", "convert raw interaction data into a dataset folder"),
    "embed": ("semid_cli.embed", "embed item text with a local transformers model"),
    "fit-codebooks": ("semid_cli.codebooks", "fit codebooks on item embeddings and write semantic IDs"),
    "train": ("semid_cli.train", "train the generator (default: the causal item-level design; --preset tiger: "
              "TIGER's T5) into a run folder"),
    "evaluate": ("semid_cli.evaluate", "rank each user's held-out item over the whole catalogue with a decoder; "
                 "Recall/NDCG@K"),
    "recommend": ("semid_cli.recommend", "top-k items for a history of item ids"),
    "choose-fusion": ("semid_cli.choose_fusion", "choose the hybrid decoder's fusion on validation users (RUN/hybrid.json)"),
    "add-items": ("semid_cli.add_items", "add items that came after training to a run (codes from its quantizer, a "
                  "new version of its IDs)"),
    "distill": ("semid_cli.distill", "a new run whose code heads learned from the run's dense head (the beam gains)"),
    "combine": ("semid_cli.combine", "one run whose model is the members of causal runs trained apart (an ensemble)"),
    "serve": ("semid_cli.serve", "serve a run over HTTP (JSON): recommend, items, health, metrics, reload"),
    "digest": ("semid_cli.digest", "print the digests that pin a run (config, semantic IDs, best checkpoint)"),
    "demo": ("semid_cli.demo", "fit codebooks, train, evaluate and recommend on a dataset folder (about 10 minutes)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is imported (the others get a stub)."""
    parser = argparse.ArgumentParser(prog="semid", description="Generative retrieval with semantic IDs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, with Lightning's detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            cmd = importlib.import_module(module)
            p = sub.add_parser(name, help=help_text, description=cmd.DESCRIPTION)
            cmd.add_arguments(p)
            p.set_defaults(func=cmd.run)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is not an option), if it is one of ours."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


_OS_HINTS = {errno.EACCES: "check its permissions, or choose another path", errno.EPERM: "check its permissions, or "
             "choose another path", errno.EROFS: "the file system is read-only: choose another path", errno.ENOTDIR:
             "a part of that path is a file, not a folder: choose another path", errno.EEXIST: "something is already "
             "there: choose another path", errno.ENOSPC: "the disk is full: free some space, or choose another folder",
             errno.EISDIR: "that is a folder: give a file"}


def os_message(e: BaseException) -> str:
    """An error's message for the command line: semid's own as written; the operating system's (``errno`` set) as
    "PATH: what failed; what to do" rather than "[Errno 13] Permission denied: 'PATH'"."""
    if not isinstance(e, OSError) or e.errno is None or not e.strerror:
        return str(e)
    hint = _OS_HINTS.get(e.errno)
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{e.strerror.lower()}" + (f"; {hint}" if hint else "")


class Terminated(BaseException):
    """SIGTERM, raised where the command is (a command's temporary files are then removed as on an error)."""

    exit_code = 128 + signal.SIGTERM

    def __str__(self) -> str:
        return "stopped by SIGTERM"


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    parser = build_parser(command) if command is not None else build_parser()
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    main_thread = threading.current_thread() is threading.main_thread()  # (train and serve install their own)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as e:  # OSError: a path unreadable, unwritable, in the way, a disk full
        if args.debug:
            raise
        print(f"semid {args.command}: error: {os_message(e)}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (a traceback of 20 lines before)
        if args.debug:
            raise
        print(f"semid {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except BaseException as e:  # TrainingInterrupted (SIGINT/SIGTERM in training), Terminated: exit 130/143
        if args.debug or not isinstance(getattr(e, "exit_code", None), int):
            raise
        print(f"semid {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if main_thread and previous is not None:  # (None: a handler not set from Python, which cannot be set back)
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
