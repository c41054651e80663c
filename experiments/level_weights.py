"""Where does the code head lose to the dense head? Each level of an item's score taken from one head or the other.

    python -m experiments.level_weights --run RUN [--val-users 5000] [--test-users N] [--tag NAME]

An item's exact (beam) score is a sum over code levels of log p(code_l | codes before), and the dense log-softmax
is the same kind of sum along the prefix tree (``generator.decoding.fusion.dense_levels``: the item's share of its
depth-(l + 1) node's mass within its depth-l node's). Two screens on the same users:

1. **swap**: every assignment of a head to each level (``c``: the code head's term, ``d``: the dense head's), on
   validation users. ``ccc...`` is the exact decoder, ``ddd...`` the dense one.
2. **level weights**: the code head's terms re-weighted, ``sum_l w_l code_l`` (weights on a grid, the last
   informative level's 1), chosen on validation users by NDCG@10 and scored on test users (all, or a seeded
   sample, labelled as such) against unit weights.

Writes ``experiments/results/level_weights[_TAG].md`` with the command.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import torch

from generator.decoding.fusion import dense_levels
from generator.runs.batches import split_batches
from generator.runs.decoders import decoders_for
from generator.runs.folder import load_run
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import atomic_open
from semid.metrics import ndcg_at_k, recall_at_k
from semid.split import leave_one_out

RESULTS = Path("experiments/results")
GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def level_terms(run, shared, split, which: str, rows, batch_size: int = 250, *, dense: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(code terms (U, L, N), dense terms (U, L, N) or None, target rows (U,)) of the users ``rows`` (float16)."""
    code, dense_terms, targets = [], [], []
    for b in split_batches(run, split, which, rows, batch_size):  # loop over batches of users
        p = shared.history_parts(b.histories, levels=True)
        code.append(p.code_levels.half())
        if dense:
            dense_terms.append(dense_levels(p.dense, p.item_nodes).half())
        targets.append(torch.from_numpy(run.ids.rows_of(b.targets.numpy())))
    return torch.cat(code), torch.cat(dense_terms) if dense else None, torch.cat(targets)


def score(terms: list[torch.Tensor], targets: torch.Tensor, chunk: int = 1000) -> tuple[float, float]:
    """Recall@10 and NDCG@10 of the sum of per-level terms (each (U, N)), ``chunk`` users at a time."""
    top = torch.cat([sum(t[i:i + chunk].float() for t in terms).topk(10, dim=1).indices for i in range(0, targets.numel(), chunk)])
    return float(recall_at_k(top, targets, 10).mean()), float(ndcg_at_k(top, targets, 10).mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--run", required=True)
    p.add_argument("--val-users", type=int, default=5000)
    p.add_argument("--test-users", type=int, help="a seeded sample of test users (default: all)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run)
    split = leave_one_out(load_dataset(run.data_dir))
    shared = decoders_for(run, ["exact"])["exact"].shared
    Cv, Dv, tv = level_terms(run, shared, split, "valid", sample_users(split.num_users, args.val_users, 0))
    live = [lv for lv in range(Cv.shape[1]) if bool(Cv[:, lv].any())]  # levels with siblings somewhere
    lines = [f"# Per-level screens of `{args.run}` ({run.checkpoint.name})", "",
             f"Validation: a seeded sample of {tv.numel()} users. Levels with siblings: {live} of {Cv.shape[1]}.", "",
             "## Swap: each level's term from the code head (c) or the dense head (d), validation", "",
             "| levels | R@10 | N@10 |", "| --- | ---: | ---: |"]
    for src in itertools.product("cd", repeat=len(live)):  # loop over 2^L assignments
        r, n = score([(Cv if s == "c" else Dv)[:, lv] for lv, s in zip(live, src, strict=True)], tv)
        lines.append(f"| {''.join(src)} | {r:.4f} | {n:.4f} |")
    rows = []
    for ws in itertools.product(GRID, repeat=len(live) - 1):  # loop over the grid
        w = dict(zip(live[:-1], ws, strict=True)) | {live[-1]: 1.0}
        rows.append((score([Cv[:, lv] * w[lv] for lv in live], tv), w))
    (unit_r, unit_n), (best_r, best_n), best = score([Cv[:, lv] for lv in live], tv), *max(rows, key=lambda x: x[0][1])
    del Cv, Dv
    Ct, _, tt = level_terms(run, shared, split, "test", sample_users(split.num_users, args.test_users, 0), dense=False)
    sample = f"a seeded sample of {tt.numel()}" if args.test_users else f"all {tt.numel()}"
    lines += ["", "## Code-level weights: chosen on validation (NDCG@10), scored on test users (" + sample + ")", "",
              "| weights | validation R@10 / N@10 | test R@10 / N@10 |", "| --- | --- | --- |"]
    for name, w, (vr, vn) in (("unit", dict.fromkeys(live, 1.0), (unit_r, unit_n)), ("chosen", best, (best_r, best_n))):
        r, n = score([Ct[:, lv] * w[lv] for lv in live], tt)
        lines.append(f"| {name} {[w[lv] for lv in live]} | {vr:.4f} / {vn:.4f} | {r:.4f} / {n:.4f} |")
    command = "python -m experiments.level_weights " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines += ["", "Command:", "", f"    {command}", ""]
    text = "\n".join(lines)
    print(text)
    with atomic_open(RESULTS / f"level_weights{'_' + args.tag if args.tag else ''}.md", "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
