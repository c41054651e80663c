"""`semid distill --run RUN --out NEW`: a new run whose code heads learned from RUN's dense head."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from semid_cli.args import add_fields, add_run, fields_given, positive_int

DESCRIPTION = (
    "Fine-tune the code heads of a causal run with a dense head on the run's own dense softmax (an ensemble's: all "
    "members' together), over its training windows, and write the result as a new run folder OUT; the epoch kept is "
    "the best on validation users (epoch 0, the run as it was, when none beats it). RUN is only read. The beam then "
    "searches the distilled trees: on Beauty's four-member default (60 CPU-minutes) test beam R@10 0.0820 -> 0.0835, "
    "about 5 CPU-minutes (experiments/results/study.md). OUT serves and evaluates like any run; it is not resumable "
    "(train RUN further instead)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--out", required=True, type=Path, help="the new run folder (must not exist, or be empty)")
    from generator.training.distill_options import DistillOptions  # light: torch only once the command runs

    add_fields(p, DistillOptions)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from generator.runs.distill import distill_run
    from generator.training.distill_options import DistillOptions

    try:  # checked before anything is loaded; its fields named as their flags (`--val-users`, not `val_users`)
        options = DistillOptions(**fields_given(DistillOptions, args))
    except ValueError as e:
        names = {f.name for f in dataclasses.fields(DistillOptions)}
        raise ValueError(re.sub(r"`([a-z_]+)`", lambda m: f"`--{m[1].replace('_', '-')}`" if m[1] in names else m[0], str(e))) from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = distill_run(args.run, args.out, options)
    first, kept = record["history"][0], record["history"][record["epoch_kept"]]
    print(f"validation exact NDCG@10 {first['ndcg@10']:.4f} -> {kept['ndcg@10']:.4f} (epoch {record['epoch_kept']} "
          f"of {len(record['history']) - 1} kept); wrote {args.out}")
    return 0
