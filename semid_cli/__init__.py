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
import re
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


_GIVEN = "_semid_flags_given"  # the namespace's record of the single-valued flags given (removed after parsing)


class _Once:
    """A single-valued flag given twice is said on stderr (the last one won in silence: `--history 1,2 --history 3`
    recommended for [3]); the last still wins, as with any argparse tool (an alias's default, then its override).
    Flags meant to repeat (`--run`, `--model-option`) append and are left alone."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        seen = vars(namespace).setdefault(_GIVEN, {})
        if option_string is not None and self.dest in seen:
            first = "" if seen[self.dest] == option_string else f" (after {seen[self.dest]})"
            print(f"{parser.prog}: note: {option_string} given twice{first}: the last one is used, "
                  f"{values if values is not None else option_string}", file=sys.stderr)
        seen[self.dest] = option_string
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]


_ONCE = {kind: type(f"Once{kind.__name__}", (_Once, kind), {}) for kind in (
    argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
    argparse.BooleanOptionalAction)}


def _common() -> argparse.ArgumentParser:
    """--debug and -v, taken before the command and after it (every error's hint names --debug)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log at INFO level, with Lightning's detail")
    return common


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that command's module is imported (the others get a stub). Its
    ``flag_names`` maps each command's argument names to its flags (what an error naming `num_beams` means)."""
    parser = argparse.ArgumentParser(prog="semid", description="Generative retrieval with semantic IDs.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, with Lightning's detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.flag_names = {}  # type: ignore[attr-defined]
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            cmd = importlib.import_module(module)
            p = sub.add_parser(name, help=help_text, description=cmd.DESCRIPTION, parents=[_common()])
            cmd.add_arguments(p)
            p.set_defaults(func=cmd.run)
            for action in p._actions:
                if type(action) in _ONCE:
                    action.__class__ = _ONCE[type(action)]
            parser.flag_names[name] = {a.dest: max(a.option_strings, key=len) for a in p._actions  # type: ignore[attr-defined]
                                       if a.option_strings and a.dest not in ("help", "debug", "verbose")}
        else:
            sub.add_parser(name, help=help_text)
    return parser


def as_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each `name` of an argument named as its flag (`num_beams` -> `--num-beams`)."""
    return re.sub(r"`([a-z_]+)`", lambda m: f"`{flags[m[1]]}`" if m[1] in flags else m[0], message)


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


# library argument names whose flag is named otherwise (the rest are the flags' own `dest`)
_ALIASES = {"recommend": {"user_ids": "--user"}, "evaluate": {"ks": "--k"}}


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
    vars(args).pop(_GIVEN, None)
    console.setup(args.verbose)
    main_thread = threading.current_thread() is threading.main_thread()  # (train and serve install their own)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as e:  # OSError: a path unreadable, unwritable, in the way, a disk full
        if args.debug:
            raise
        flags = {**_ALIASES.get(args.command, {}), **parser.flag_names.get(args.command, {})}  # type: ignore[attr-defined]
        print(f"semid {args.command}: error: {as_flags(os_message(e), flags)}  (--debug shows the traceback)", file=sys.stderr)
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
