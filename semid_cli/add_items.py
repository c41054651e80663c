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


def _name(text: str) -> str:
    if not text.strip():  # (an empty name was taken as the default)
        raise argparse.ArgumentTypeError(f"must name the embeddings, NAME of DATA's item_emb_<NAME>.npy, got {text!r}; "
                                         "leave out --embeddings for those the quantizer was fitted on")
    return text


def _serves_hybrid(run_dir: Path) -> bool:
    """Whether the run has a hybrid to choose a fusion for, from its config (no model loaded): a dense head
    (``dense_dim`` > 0), trained with the code head (`semid train` chooses a fusion for those: a dense-only run has
    no hybrid) or with a fusion chosen since."""
    from generator.runs.folder import HYBRID_FILE, read_config

    config = read_config(run_dir)
    dense_dim = (config.get("model") or {}).get("dense_dim") or 0
    joint = (config.get("train") or {}).get("objective", "joint") == "joint"
    return dense_dim > 0 and (joint or (run_dir / HYBRID_FILE).is_file())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run(p)
    p.add_argument("--data", required=True, type=Path,
                   help="dataset folder with the run's items (ids 1..n, unchanged) and the new ones (n+1..), with embeddings")
    p.add_argument("--embeddings", type=_name, help="item_emb_<NAME>.npy of DATA (default: the run's, else minilm)")
    p.add_argument("--quantizer", type=Path, help="fitted quantizer.pt (default: beside the IDs the run was trained with)")


def run(args: argparse.Namespace) -> int:
    from generator.runs.catalogue import add_items

    added = add_items(args.run, args.data, embeddings=args.embeddings, quantizer=args.quantizer)
    print(f"added {added.item_ids.size:,} items (ids {int(added.item_ids[0])}..{int(added.item_ids[-1])}): "
          f"{added.before:,} -> {added.after:,} items, {added.colliding:,} sharing base codes")
    print(f"wrote {added.path} (a new version, extending the one before; the one it replaced is kept beside it)")
    if _serves_hybrid(args.run):  # (a run with no dense head has no hybrid: the advice would fail)
        print(f"the hybrid decoder's fusion was chosen for the IDs before: run `semid choose-fusion --run {args.run}` "
              "once before `--decoder hybrid`")
    return 0
