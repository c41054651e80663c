"""`semid distill --run RUN --out NEW`: a new run whose code heads learned from RUN's dense head."""

from __future__ import annotations

import argparse
from pathlib import Path

from semid_cli.args import add_run

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
    p.add_argument("--epochs", type=int, default=2, help="passes over the training windows (default 2)")
    p.add_argument("--temperature", type=float, default=3.0, help="the teacher's softmax temperature (default 3)")
    p.add_argument("--weight", type=float, default=0.5, help="the teacher's share of each level's target (default 0.5)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of the code heads (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=128, help="training windows a step (default 128; the teacher "
                   "of a batch is positions x items floats: lower it for large catalogues)")
    p.add_argument("--val-users", type=int, default=5000, help="validation users that choose the epoch (default 5,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from generator.runs.distill import distill_run
    from generator.training.distill import DistillOptions

    options = DistillOptions(epochs=args.epochs, temperature=args.temperature, weight=args.weight, lr=args.lr,
                             batch_size=args.batch_size, val_users=args.val_users, seed=args.seed)  # checked before anything is loaded
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    record = distill_run(args.run, args.out, options)
    first, kept = record["history"][0], record["history"][record["epoch_kept"]]
    print(f"validation exact NDCG@10 {first['ndcg@10']:.4f} -> {kept['ndcg@10']:.4f} (epoch {record['epoch_kept']} "
          f"of {len(record['history']) - 1} kept); wrote {args.out}")
    return 0
