"""`semid combine --run A --run B [...] --out NEW`: one ensemble run of the members of causal runs trained apart."""

from __future__ import annotations

import argparse
from pathlib import Path

from semid_cli.args import positive_int

DESCRIPTION = (
    "Write a new run folder OUT whose model is every member of the causal runs named with --run (trained apart: other "
    "seeds, at the same time on other cores or machines), scoring an item by the sum of the members' log-likelihoods "
    "as `--model-option members=K` does in one run. The runs must share data, semantic IDs and model config (members "
    "aside) and have no items added; they are only read. OUT serves, evaluates and distils like any run, with the "
    "hybrid's fusion chosen on validation users; it is not resumable (train the sources further instead)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, action="append", type=Path, help="a causal run folder; twice or more")
    p.add_argument("--out", required=True, type=Path, help="the new run folder (must not exist, or be empty)")
    p.add_argument("--no-fusion", action="store_true", help="do not choose the hybrid's fusion (choose it later with "
                   "`semid choose-fusion`)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from generator.runs.combine import combine_runs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = combine_runs(args.run, args.out, fusion=not args.no_fusion)
    chosen = record.get("fusion")
    print(f"{record['members']} members from {len(record['sources'])} runs; "
          + (f"hybrid fusion {chosen.get('fusion') if isinstance(chosen, dict) else chosen}; " if chosen else "")
          + f"wrote {args.out}")
    return 0
