"""An ensemble of causal runs: the sum of the members' exact log-likelihoods over every item, on the test split.

    python -m experiments.ensemble --member RUN[:CHECKPOINT] --member RUN[:CHECKPOINT] [...] [--tag NAME]

Each member ranks every item by its exact log-likelihood under the code head (``exact``: one matrix product per level,
what the beam searches; the beam's R@10 is within 0.0005 of it on Beauty); the ensemble ranks by the sum over
members, i.e. the product of their distributions (a geometric mean, renormalised). Reported beside each member alone
and, paired by user, against the best member (95% bootstrap interval, ``semid.metrics.paired_bootstrap``). The budget
of an ensemble is the sum of its members' training budgets: say so where its figure is quoted.

With ``--compose beam,exact,dense`` the members are also made one model (``EnsembleGenerator.of``, the design a run
trains with ``--model-option members=K``) and evaluated with semid's own decoders on the same users: its beam and
exact give the sum of the members' log-likelihoods (each level normalised per member), its dense head the sum of
their dense logits.

Writes ``experiments/results/ensemble[_TAG].{md,json}`` with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import Any

import numpy as np
import torch

from experiments.paired import RESULTS, _side
from generator.models.ensemble import EnsembleGenerator
from generator.runs.batches import split_batches
from generator.runs.decoders import decoders_for
from generator.runs.evaluate import evaluate
from generator.runs.folder import load_run
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import ndcg_at_k, paired_bootstrap, recall_at_k
from semid.split import leave_one_out

K = 10


def member_scores(spec: str, max_users: int | None, seed: int, batch_size: int,
                  ) -> tuple[list[torch.Tensor], np.ndarray, str, int]:
    """One member's exact log-likelihoods (a (B, N) tensor per batch of test users), the targets, its name and the
    split's count of test users."""
    path, ckpt = _side(spec)
    run = load_run(path, ckpt)
    if run.design != "causal":
        raise SystemExit(f"{path}: an ensemble member must be a causal run (exact log-likelihoods), got {run.design!r}")
    split = leave_one_out(load_dataset(run.data_dir))
    shared = decoders_for(run, ["exact"])["exact"].shared  # the run's decoders (paths, edge tables), built once
    batches = split_batches(run, split, "test", sample_users(split.num_users, max_users, seed), batch_size)
    scores = [shared.history_parts(b.histories).exact for b in batches]  # loop over batches of users
    if not torch.equal(shared.item_ids, torch.arange(1, shared.item_ids.numel() + 1)):
        raise SystemExit(f"{path}: the run's rows are not items 1..N in order; this script sums scores by row")
    return scores, np.concatenate([b.targets.numpy() for b in batches]), f"{spec} ({run.checkpoint.name})", split.num_users


def composed(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The members as one :class:`~generator.models.ensemble.EnsembleGenerator`, evaluated with ``--compose``'s
    decoders on the test split (the run folder of the first member lends its IDs, tree and data)."""
    runs = [load_run(*_side(spec)) for spec in args.member]
    run = dataclasses.replace(runs[0], model=EnsembleGenerator.of([r.model for r in runs]).eval())
    split = leave_one_out(load_dataset(run.data_dir))
    out = {}
    for name in args.compose.split(","):  # loop over decoders
        r = evaluate(run, split, "test", decoder=name, max_users=args.max_users, seed=args.seed, num_beams=20)
        out[name] = {"recall@10": r.metrics["recall@10"], "ndcg@10": r.metrics["ndcg@10"]}
        print(name, out[name], flush=True)
    return out


def metrics(scores: list[torch.Tensor], targets: np.ndarray) -> dict[str, np.ndarray]:
    items = np.concatenate([(s.topk(K, dim=1).indices + 1).numpy() for s in scores])  # rows -> item ids
    return {"recall@10": recall_at_k(items, targets, K), "ndcg@10": ndcg_at_k(items, targets, K)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--member", action="append", required=True, help="RUN[:CHECKPOINT], twice or more")
    p.add_argument("--max-users", type=int, help="a seeded sample of test users (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--budget", default="", help="the members' training budgets, in words, for the report")
    p.add_argument("--compose", default="", help="also make the members one model (generator.models.ensemble: the "
                   "sum of their logits, level by level) and evaluate it with these decoders, e.g. beam,exact")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if len(args.member) < 2:
        raise SystemExit("an ensemble needs two --member or more")
    torch.set_num_threads(1)
    names, per, total, targets = [], [], None, None
    for spec in args.member:
        scores, t, name, of = member_scores(spec, args.max_users, args.seed, args.batch_size)
        if targets is not None and not np.array_equal(t, targets):
            raise SystemExit(f"{spec}: ranks other test targets than the first member (another data folder or split)")
        targets = t
        names.append(name)
        per.append(metrics(scores, t))
        total = scores if total is None else [a + b for a, b in zip(total, scores, strict=True)]
    ens = metrics(total, targets)
    best = max(range(len(per)), key=lambda i: per[i]["recall@10"].mean())
    n = len(targets)
    sample = n < of  # (--max-users at or above the test users' count ranks them all)
    out: dict[str, Any] = {"members": names, "budget": args.budget, "users": n, "sample": sample,
                           "command": "python -m experiments.ensemble " + shlex.join(sys.argv[1:]),
                           "threads": 1, "rows": []}
    lines = ["# An ensemble of causal runs (sum of exact log-likelihoods), Beauty test split", "",
             f"{n} test users" + (" (a seeded sample)" if sample else " (all)") + f"; top {K} of the catalogue; "
             "one torch thread." + (f" Budget: {args.budget}." if args.budget else ""), "",
             "| ranker | R@10 | N@10 |", "| --- | ---: | ---: |"]
    for name, m in zip(names, per, strict=True):
        out["rows"].append({"ranker": name, **{k: float(v.mean()) for k, v in m.items()}})
        lines.append(f"| {name}, exact | {m['recall@10'].mean():.4f} | {m['ndcg@10'].mean():.4f} |")
    out["rows"].append({"ranker": "ensemble", **{k: float(v.mean()) for k, v in ens.items()}})
    lines += [f"| ensemble (sum of log-likelihoods) | {ens['recall@10'].mean():.4f} | {ens['ndcg@10'].mean():.4f} |", "",
              f"Ensemble minus the best member ({names[best]}), paired by user, 95% bootstrap interval (2,000 resamples):", "",
              "| metric | difference | 95% CI | relative |", "| --- | ---: | --- | ---: |"]
    for m in ("recall@10", "ndcg@10"):
        mean, lo, hi = paired_bootstrap(ens[m], per[best][m], seed=args.seed)
        base = float(per[best][m].mean())
        out[m] = {"diff": mean, "ci": [lo, hi], "relative": mean / base if base else None}
        lines.append(f"| {m} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {mean / base:+.1%} |")
    if args.compose:
        lines += ["", "The members made one model (`EnsembleGenerator.of`: the sum of the members' log-likelihoods, each "
                  "level normalised per member; the dense head the sum of their logits), decoded by semid's decoders "
                  "(20 beams):", "",
                  "| decoder | R@10 | N@10 |", "| --- | ---: | ---: |"]
        for name, m in composed(args).items():
            out["rows"].append({"ranker": f"composed {name}", "recall@10": m["recall@10"], "ndcg@10": m["ndcg@10"]})
            lines.append(f"| {name} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} |")
    lines += ["", "Command:", "", "    " + out["command"], ""]
    stem = "ensemble" + (f"_{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{stem}.json", out)
    with atomic_open(RESULTS / f"{stem}.md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
