"""`semid digest --run RUN [--combined]`: the sha256 of the files a run serves with (``pinning.pinned_files``), to keep
outside the run and check with `semid evaluate|recommend|serve --expect-sha256 FILE_OR_HEX` (generator.runs.pinning)."""

from __future__ import annotations

import argparse
from pathlib import Path

from semid_cli.args import add_run

DESCRIPTION = (
    "Print the sha256 of the files a run serves with (config.yaml, semantic_ids.npz, the best "
    "checkpoint, hybrid.json where there is one, a title run's tokenizer files), in sha256sum's format. Keep them "
    "outside the run folder and pass them to `semid evaluate|recommend|serve --expect-sha256`: the digests semid "
    "writes inside the files find damage, not edits. "
    "A run that does not load (a damaged file) is refused, not pinned."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--checkpoint", type=Path, help="pin this checkpoint of the run instead of the best one")
    p.add_argument("--combined", action="store_true", help="print one digest for the whole run instead of one per file")


def run(args: argparse.Namespace) -> int:
    from generator.runs.folder import load_run
    from generator.runs.pinning import combined_digest, file_states, format_digests, run_digests

    states = file_states(args.run, args.checkpoint)  # before the hash: a rewrite while it reads is seen below
    digests = run_digests(args.run, args.checkpoint)  # (names a missing file)
    load_run(args.run, args.checkpoint, mmap=True, tree=False)  # a run that does not load is not pinned: its error
    if file_states(args.run, args.checkpoint) != states:  # rewritten while it was checked (not read a second time)
        raise ValueError(f"{args.run}: its files changed while `semid digest` read them; run it again when the run is idle")
    print(combined_digest(digests) if args.combined else format_digests(digests), end="\n" if args.combined else "")
    return 0
