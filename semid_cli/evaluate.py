"""`semid evaluate --run RUN [--split valid|test] [--decoder NAME]`: Recall/NDCG@K; writes RUN/metrics_<split>.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from generator.runs.evaluate import DecoderError, evaluate_run, parse_ks
from generator.runs.folder import metrics_file
from semid_cli.args import (
    add_decoder,
    add_expect_sha256,
    add_run,
    add_run_data,
    add_table_dtype,
    check_beams_used,
    check_device,
    nonnegative_int,
    positive_users,
)
from semid_cli.console import progress_default

DESCRIPTION = (
    "Leave-one-out evaluation of a run's best checkpoint over the whole catalogue. Prints the "
    "metrics and writes RUN/metrics_<split>.json."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--k", default="5,10", help="cut-offs, comma-separated (default 5,10)")
    p.add_argument("--num-beams", type=int, help="beams (>= the largest k; default: those the run was validated with, 20 unless trained "
                   "otherwise); not for exact and dense, "
                   "which search no beams")
    p.add_argument("--max-users", type=positive_users, default=None, help="a seeded sample of this many users (default all)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the user sample")
    p.add_argument("--batch-size", type=int, default=64, help="users decoded together")
    add_decoder(p)
    p.add_argument("--alpha", type=float, help="hybrid blend weight (default: chosen on validation users, RUN/hybrid.json)")
    p.add_argument("--exclude-history", action="store_true",
                   help="rank only items outside each user's history (as `semid serve` does by default; writes "
                        "RUN/metrics_<split>_unseen.json; default: the benchmark protocol, every item ranked)")
    add_table_dtype(p)
    add_run_data(p)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint file instead of the run's best")
    add_expect_sha256(p)
    p.add_argument("--device", help="cpu, cuda, ... (default cuda where available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar (default: one on a terminal)")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"`--batch-size` must be a positive int (users decoded together), got {args.batch_size!r}")
    check_device(args.device)
    ks = parse_ks(args.k)
    from generator.decoding.registry import BEAMLESS, resolve
    from generator.designs.registry import for_config
    from generator.runs.folder import read_config

    name = resolve(for_config(read_config(args.run)).name, args.decoder)  # (a title run's config says "causal")
    check_beams_used(args.num_beams, name)
    beams = (read_config(args.run).get("train") or {}).get("num_beams")  # what the run was validated with: its protocol
    num_beams = (beams if isinstance(beams, int) else 20) if args.num_beams is None else args.num_beams
    from generator.runs.pinning import pin

    loaded = pin(args.run, args.expect_sha256, args.checkpoint)  # before the run is loaded; again once it is loaded,
    try:  # before any work or write
        m = evaluate_run(
            args.run, args.split, ks=ks, num_beams=num_beams, max_users=args.max_users, seed=args.seed,
            batch_size=args.batch_size, decoder=args.decoder, data_dir=args.data, checkpoint=args.checkpoint,
            device=args.device, progress=progress_default(args.progress), alpha=args.alpha, table_dtype=args.table_dtype,
            exclude_history=args.exclude_history, loaded=loaded,
        )
    except DecoderError as e:  # a RuntimeError, which semid_cli.main does not catch
        if args.debug:
            raise
        print(f"semid evaluate: error: {e}", file=sys.stderr)
        return 1
    beams = "" if name in BEAMLESS else f", {m['num_beams']} beams"
    print(f"{args.split}: {m['users_evaluated']} users, checkpoint {m['checkpoint']}{beams}, decoder {m['decoder']}"
          + (", histories excluded" if args.exclude_history else ""))
    for k in ks:
        print(f"  Recall@{k:<3} {m[f'recall@{k}']:.4f}   NDCG@{k:<3} {m[f'ndcg@{k}']:.4f}")
    print(f"  invalid items {m['invalid_items']}, duplicate items {m['duplicate_items']}, {m['seconds']:.1f} s")
    print(f"wrote {m['file']}" + ("  (a sample: the all-users file is left as it was)" if args.max_users is not None
                                  and Path(m["file"]).name != metrics_file(args.run, args.split, unseen=args.exclude_history).name else ""))
    return 0
