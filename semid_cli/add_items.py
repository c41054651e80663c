"""`semid add-items --run RUN --data DATA`: add new items to a trained run for good (no retraining)."""

from __future__ import annotations

import argparse
from pathlib import Path

from semid_cli.args import add_run

DESCRIPTION = (
    "Give the items of DATA above the run's last id semantic IDs from the run's fitted quantizer, and "
    "write a new version of RUN/semantic_ids.npz (atomically) that extends the one the checkpoint was trained "
    "with. Every decoder, `semid recommend` and `semid evaluate` then serve the new items; old items keep their "
    "IDs and their order among themselves. Runs of the causal design only."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--data", required=True, type=Path,
                   help="dataset folder with the run's items (ids 1..n, unchanged) and the new ones (n+1..), with embeddings")
    p.add_argument("--embeddings", help="item_emb_<NAME>.npy of DATA (default: the run's, else minilm)")
    p.add_argument("--quantizer", type=Path, help="fitted quantizer.pt (default: beside the IDs the run was trained with)")


def run(args: argparse.Namespace) -> int:
    from generator.runs.catalogue import add_items

    added = add_items(args.run, args.data, embeddings=args.embeddings, quantizer=args.quantizer)
    print(f"added {added.item_ids.size:,} items (ids {int(added.item_ids[0])}..{int(added.item_ids[-1])}): "
          f"{added.before:,} -> {added.after:,} items, {added.colliding:,} sharing base codes")
    print(f"wrote {added.path} (a new version, extending the one before; the one it replaced is kept beside it)")
    print(f"the hybrid decoder's fusion was chosen for the IDs before: run `semid choose-fusion --run {args.run}` once "
          "before `--decoder hybrid`")
    return 0
