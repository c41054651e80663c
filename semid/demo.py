"""The end-to-end demo: ``python -m semid.demo --data ../shared/data/beauty --out runs/demo`` (``make demo``).

Today it loads the dataset, prints its summary and the leave-one-out split, and writes ``OUT/data_summary.json``.
Later steps (codebooks, the generator, evaluation) extend :func:`main`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from semid.data import format_summary, leave_one_out, load_dataset, summary
from semid.io import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m semid.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/beauty"), help="dataset folder")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the demo's outputs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not (args.data / "items.jsonl").is_file():
        print(
            f"demo: no dataset at {args.data} (expected items.jsonl and sequences.txt there). Point --data at "
            "../shared/data/beauty, or make a dataset folder with `semid prepare`.",
            file=sys.stderr,
        )
        return 2
    try:
        dataset = load_dataset(args.data)
    except (ValueError, FileNotFoundError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    stats = summary(dataset)
    print(format_summary(stats))

    split = leave_one_out(dataset)
    train = sum(len(t) for t in split.train)
    print(
        f"\nleave-one-out: {split.num_users:,} users ({split.num_skipped:,} with < 3 items left out); "
        f"{train:,} training items, {split.valid_targets.size:,} validation and "
        f"{split.test_targets.size:,} test targets"
    )
    stats["split"] = {
        "users": split.num_users,
        "skipped_users": split.num_skipped,
        "train_items": train,
        "valid_targets": int(split.valid_targets.size),
        "test_targets": int(split.test_targets.size),
    }
    write_json(args.out / "data_summary.json", stats)
    print(f"wrote {args.out / 'data_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
