"""Two checkpoints (or decoders) on the same test users, with paired 95% bootstrap intervals of their difference.

    python -m experiments.paired --a RUN[:CHECKPOINT] --b RUN[:CHECKPOINT] [--decoder beam] [--tag NAME]

Both are decoded on every test user (or a seeded sample, ``--max-users``, labelled as such); per-user Recall@10 and
NDCG@10 are paired by user and the difference A - B is reported with a 95% bootstrap interval over users (2,000
resamples, ``semid.metrics.paired_bootstrap``). Writes ``experiments/results/paired[_TAG].{md,json}`` with the command.
A difference whose interval holds 0 is not told apart from no difference on this split.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.runs.evaluate import evaluate
from generator.runs.folder import load_run
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import paired_bootstrap
from semid.split import leave_one_out

RESULTS = Path("experiments/results")


def _side(text: str) -> tuple[Path, Path | None]:
    run, _, ckpt = text.partition(":")
    return Path(run), (Path(run) / "checkpoints" / ckpt if ckpt else None)


def per_user(spec: str, decoder: str, max_users: int | None, seed: int, batch_size: int, exclude_history: bool = False,
             ) -> tuple[dict[str, np.ndarray], str]:
    """Per-user Recall@10 / NDCG@10 of one run's checkpoint on the test split (users in split-row order), by
    ``generator.runs.evaluate.evaluate`` (``exclude_history``: the history left out, as served)."""
    path, ckpt = _side(spec)
    run = load_run(path, ckpt)
    split = leave_one_out(load_dataset(run.data_dir))
    r = evaluate(run, split, "test", decoder=decoder, max_users=max_users, seed=seed, batch_size=batch_size,
                 exclude_history=exclude_history)
    order = np.argsort(r.user_rows)
    ranks, rows = r.ranks[order], r.user_rows[order]
    hit = (ranks >= 0) & (ranks < 10)
    return {"recall@10": hit.astype(np.float64), "ndcg@10": np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0),
            "targets": split.test_targets[rows], "of": np.asarray(split.num_users)}, run.checkpoint.name


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--a", required=True, help="RUN[:CHECKPOINT] (default checkpoint: the run's best)")
    p.add_argument("--b", required=True, help="RUN[:CHECKPOINT]")
    p.add_argument("--decoder", default="beam", help="a decoder both runs serve (default beam)")
    p.add_argument("--decoder-b", help="B's decoder, where it differs from A's")
    p.add_argument("--max-users", type=int, help="a seeded sample of test users (default: all)")
    p.add_argument("--seed", type=int, default=0, help="of the user sample and the bootstrap")
    p.add_argument("--batch-size", type=int, default=256, help="users decoded together")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--exclude-history", action="store_true", help="both sides leave each user's history out (as served)")
    p.add_argument("--tag", default="", help="results file suffix")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dec_b = args.decoder_b or args.decoder
    a, ckpt_a = per_user(args.a, args.decoder, args.max_users, args.seed, args.batch_size, args.exclude_history)
    b, ckpt_b = per_user(args.b, dec_b, args.max_users, args.seed, args.batch_size, args.exclude_history)
    if not np.array_equal(a["targets"], b["targets"]):
        raise SystemExit("A and B rank other test targets (another data folder or split): they cannot be paired")
    n = len(a["recall@10"])
    sample = n < int(a["of"])  # (--max-users at or above the test users' count ranks them all)
    out: dict[str, Any] = {"a": f"{args.a} ({ckpt_a}, {args.decoder})", "b": f"{args.b} ({ckpt_b}, {dec_b})", "users": n,
                           "sample": sample, "command": "python -m experiments.paired " + shlex.join(sys.argv[1:] if argv is None else argv)}
    lines = [f"# Paired comparison on the test split{' (histories left out, as served)' if args.exclude_history else ''}", "", f"A: `{out['a']}`  ", f"B: `{out['b']}`  ",
             f"{n} test users" + (" (a seeded sample)" if sample else " (all)") + "; 95% bootstrap interval over users "
             "(2,000 resamples)", "", "| metric | A | B | A - B | 95% CI | relative |", "| --- | ---: | ---: | ---: | --- | ---: |"]
    for m in ("recall@10", "ndcg@10"):
        mean, lo, hi = paired_bootstrap(a[m], b[m], seed=args.seed)
        base = float(b[m].mean())
        out[m] = {"a": float(a[m].mean()), "b": base, "diff": mean, "ci": [lo, hi], "relative": mean / base if base else None}
        rel = f"{mean / base:+.1%}" if base else "n/a"
        lines.append(f"| {m} | {a[m].mean():.4f} | {base:.4f} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {rel} |")
    lines += ["", "Command:", "", f"    {out['command']}", ""]
    text = "\n".join(lines)
    print(text)
    name = f"paired{'_' + args.tag if args.tag else ''}"
    with atomic_open(RESULTS / f"{name}.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / f"{name}.json", out)


if __name__ == "__main__":
    main()
