"""Every decoder with and without the users' histories in its rankings, on every test user (paired).

    python -m experiments.unseen --run RUN [--decoders beam,exact,dense,hybrid] [--popularity] [--checkpoint last.ckpt] [--out unseen_TAG]

``semid serve`` leaves a request's history out of its answer by default; ``semid evaluate`` ranks every item (the
benchmark's protocol) unless asked ``--exclude-history`` (each user's ranking then as ``Recommender.recommend`` returns
it for that user alone, with the beams the service decodes it with: ``protocol.call_beams``). This measures both on the same users with
``generator.runs.evaluate.evaluate``: R@10 / N@10 of each decoder both ways, the paired difference (95% bootstrap
interval over users), and the hybrid against each of its parts under each protocol. Writes ``experiments/results/<out>.{md,json}`` with the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from generator.runs.evaluate import evaluate
from generator.runs.folder import load_run
from generator.runs.recommender import distinct_counts, drop_history
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import paired_bootstrap
from semid.split import Split, leave_one_out

RESULTS = Path(__file__).parent / "results"


def per_user(ranks: np.ndarray, rows: np.ndarray, users: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-user R@k and N@k (U,) in split-row order from an evaluation's ranks (in its own user order)."""
    hit = (ranks >= 0) & (ranks < k)
    rec, ndcg = np.zeros(users), np.zeros(users)
    rec[rows] = hit
    ndcg[rows] = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    return rec, ndcg


def popularity(split: Split, exclude: bool, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-user R@k / N@k (U,) of the baseline that ranks the test histories' most frequent items first, the same list
    for everyone; ``exclude``: each user's first k of that list outside its own history (``drop_history``)."""
    hists = [split.test_history(i) for i in range(split.num_users)]
    order = np.bincount(np.concatenate(hists)).argsort(kind="stable")[::-1]  # most frequent first
    want = k + (int(distinct_counts(hists).max()) if exclude else 0)
    top = np.tile(order[:want], (split.num_users, 1))
    if exclude:
        top = drop_history(top, np.zeros(top.shape), hists, k)[0]
    hit = top[:, :k] == split.test_targets[:, None]
    ranks = np.where(hit.any(1), hit.argmax(1), -1)
    return per_user(ranks, np.arange(split.num_users), split.num_users, k)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--decoders", default="beam,exact,dense,hybrid")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="unseen")
    p.add_argument("--popularity", action="store_true", help="also the popularity baseline both ways (a row)")
    p.add_argument("--checkpoint", help="a checkpoint file name under RUN/checkpoints (default: the run's best)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run, None if args.checkpoint is None else args.run / "checkpoints" / args.checkpoint)
    split = leave_one_out(load_dataset(run.data_dir))
    U = split.num_users
    res: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray, float]] = {}
    for name in args.decoders.split(","):  # loop over decoders (a few)
        for excl in (False, True):
            r = evaluate(run, split, "test", decoder=name, batch_size=args.batch_size, exclude_history=excl)
            res[name, excl] = (*per_user(r.ranks, r.user_rows, U), r.seconds)
            print(f"{name:>7} exclude_history={excl}: R@10 {res[name, excl][0].mean():.4f} N@10 "
                  f"{res[name, excl][1].mean():.4f} ({r.seconds:.0f} s)", flush=True)
    names = args.decoders.split(",")
    if args.popularity:
        for excl in (False, True):
            res["popularity", excl] = (*popularity(split, excl), 0.0)
        names = [*names, "popularity"]
    command = shlex.join(["python", "-m", "experiments.unseen", *(sys.argv[1:] if argv is None else argv)])
    L = ["# Rankings with and without the users' histories (`semid serve` leaves them out by default)", "",
         f"Command: `{command}`. Run `{args.run}` ({run.checkpoint.name}); test split, all {U:,} users, full catalogue, "
         "one torch thread. *Protocol*: every item ranked (the benchmark's protocol, `semid evaluate`); *unseen*: the "
         "user's history left out (`semid evaluate --exclude-history`: each user's ranking as `Recommender.recommend` "
         "returns it for that user alone, the decoder asked for 10 more per distinct history item, with the beams the service "
         "gives such a call: 20 doubled until they hold them). Paired 95% bootstrap intervals over users.", "",
         "| decoder | protocol R@10 | protocol N@10 | unseen R@10 | unseen N@10 | ΔR@10 [95% CI] | rel. | ΔN@10 [95% CI] | rel. |",
         "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
    out: dict = {"command": command, "run": str(args.run), "users": U, "decoders": {}}
    for name in names:
        (r0, n0, _), (r1, n1, _) = res[name, False], res[name, True]
        dr, dn = paired_bootstrap(r1, r0), paired_bootstrap(n1, n0)
        L.append(f"| {name} | {r0.mean():.4f} | {n0.mean():.4f} | {r1.mean():.4f} | {n1.mean():.4f} | {dr[0]:+.4f} "
                 f"[{dr[1]:+.4f}, {dr[2]:+.4f}] | {dr[0] / r0.mean():+.1%} | {dn[0]:+.4f} [{dn[1]:+.4f}, {dn[2]:+.4f}] | "
                 f"{dn[0] / n0.mean():+.1%} |")
        out["decoders"][name] = {"protocol": [float(r0.mean()), float(n0.mean())], "unseen": [float(r1.mean()), float(n1.mean())],
                                 "delta_r10": dr, "delta_n10": dn}
    if args.popularity:
        L += ["", "Each decoder's R@10 over the popularity baseline's, under each protocol:", "",
              "| decoder | protocol | unseen |", "| --- | ---: | ---: |"]
        L += [f"| {n} | {res[n, False][0].mean() / res['popularity', False][0].mean():.2f}x | "
              f"{res[n, True][0].mean() / res['popularity', True][0].mean():.2f}x |" for n in names if n != "popularity"]
    if "hybrid" in names:
        L += ["", "The hybrid against each part, under each protocol (R@10, paired):", "",
              "| protocol | vs | ΔR@10 [95% CI] | rel. |", "| --- | --- | --- | ---: |"]
        for excl in (False, True):
            for part in (n for n in names if n not in ("hybrid", "popularity")):
                d = paired_bootstrap(res["hybrid", excl][0], res[part, excl][0])
                L.append(f"| {'unseen' if excl else 'protocol'} | {part} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] | "
                         f"{d[0] / res[part, excl][0].mean():+.1%} |")
                out.setdefault("hybrid_vs", {})[f"{'unseen' if excl else 'protocol'}:{part}"] = d
    text = "\n".join(L) + "\n"
    print(text)
    with atomic_open(RESULTS / f"{args.out}.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / f"{args.out}.json", out)


if __name__ == "__main__":
    main()
