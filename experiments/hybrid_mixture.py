"""How complementary the two heads are, and whether a mixture of their distributions fuses them better (issue 19).

    python -m experiments.hybrid_mixture --run RUN [--val-users 10000] [--out hybrid_mixture]

1. Per test user (all of them), whether beam search's and the dense head's top 10 hold the target: both, one, or
   neither, and the per-user oracle (the better of the two for each user: a bound no global fusion reaches).
2. Fusions of the full-catalogue scores, fitted on half of ``--val-users`` validation users (NDCG@10), reported on
   the other half and on every test user: the log-linear blend ``a * exact + (1 - a) * dense`` (a product of
   experts, the hybrid's ``full`` fusion) and a linear pool ``log(a * p_exact^(1/t1) + (1 - a) * p_dense^(1/t2))``
   (each head's distribution tempered and renormalised over the catalogue, then mixed: a union-like fusion, high
   where either head is confident). Paired 95% bootstrap intervals over test users against each head.

Writes ``experiments/results/<out>.{md,json}``.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from generator.runs.batches import split_batches
from generator.runs.decoders import decoders_for
from generator.runs.folder import load_run
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import paired_bootstrap
from semid.split import leave_one_out

RESULTS = Path(__file__).parent / "results"
ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
MIX_GRID = tuple(itertools.product((0.2, 0.35, 0.5, 0.65, 0.8), (2.0, 4.0, 8.0, 16.0), (0.5, 1.0, 2.0)))


def collect(run, split, which: str, rows: np.ndarray):  # noqa: ANN001, ANN201
    """(exact (U, N) float16, dense (U, N) float16, target rows (U,), beam's top-10 rows (U, 10)) of ``rows``."""
    decs = decoders_for(run, ["hybrid", "beam"])
    shared, beam = decs["hybrid"].shared, decs["beam"]
    row_of = torch.full((int(shared.item_ids.max()) + 1,), -1, dtype=torch.long)
    row_of[shared.item_ids] = torch.arange(shared.item_ids.numel())
    E, D, T, B = [], [], [], []
    for b in split_batches(run, split, which, rows, 256):  # loop over batches of users
        parts = shared.history_parts(b.histories)
        E.append(parts.exact.half())
        D.append(parts.dense.half())
        T.append(row_of[b.targets])
        B.append(row_of[beam(b.histories, 10).items])
    return torch.cat(E), torch.cat(D), torch.cat(T), torch.cat(B)


def fused(kind: str, params: tuple, E: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    if kind == "blend":
        return params[0] * E + (1 - params[0]) * D
    a, t1, t2 = params
    return torch.logaddexp((E / t1).log_softmax(1) + np.log(a), (D / t2).log_softmax(1) + np.log(1 - a))


def per_user(scores, targets: torch.Tensor, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Recall@10 and NDCG@10 per user of ``scores(lo, hi)`` (U, N) computed ``chunk`` users at a time."""
    rec, ndcg = [], []
    for lo in range(0, targets.numel(), chunk):  # loop over chunks of users
        top = scores(lo, lo + chunk).topk(10, dim=1).indices
        rec_, ndcg_ = hits(top, targets[lo : lo + chunk])
        rec.append(rec_)
        ndcg.append(ndcg_)
    return np.concatenate(rec), np.concatenate(ndcg)


def hits(top: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    hit = top == targets[:, None]
    found = hit.any(1)
    ndcg = torch.where(found, 1.0 / torch.log2(hit.float().argmax(1).float() + 2), 0.0)
    return found.float().numpy(), ndcg.numpy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--val-users", type=int, default=10_000)
    p.add_argument("--out", default="hybrid_mixture")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run)
    split = leave_one_out(load_dataset(run.data_dir))
    vE, vD, vT, _ = collect(run, split, "valid", sample_users(split.num_users, args.val_users, 0))
    tE, tD, tT, tB = collect(run, split, "test", np.arange(split.num_users))
    half = args.val_users // 2

    def score(E: torch.Tensor, D: torch.Tensor, kind: str, params: tuple):  # noqa: ANN202
        return lambda lo, hi: fused(kind, params, E[lo:hi].float(), D[lo:hi].float())

    chosen, rows = {}, []
    for kind, grid in (("blend", [(a,) for a in ALPHAS]), ("mixture", MIX_GRID)):
        fit = {g: per_user(score(vE[:half], vD[:half], kind, g), vT[:half])[1].mean() for g in grid}
        best = max(fit, key=fit.get)
        held = per_user(score(vE[half:], vD[half:], kind, best), vT[half:])[1].mean()
        chosen[kind] = best
        rows.append((kind, best, float(fit[best]), float(held)))
    test = {"beam": hits(tB, tT), "exact": per_user(lambda lo, hi: tE[lo:hi].float(), tT),
            "dense": per_user(lambda lo, hi: tD[lo:hi].float(), tT)}
    for kind, best in chosen.items():
        test[kind] = per_user(score(tE, tD, kind, best), tT)
    b, d = test["beam"][0], test["dense"][0]
    overlap = {"both": float(((b > 0) & (d > 0)).mean()), "beam only": float(((b > 0) & (d == 0)).mean()),
               "dense only": float(((b == 0) & (d > 0)).mean()), "oracle": float(np.maximum(b, d).mean())}
    paired = {f"{a} - {c}": paired_bootstrap(test[a][0], test[c][0]) for a in chosen for c in ("beam", "dense")}
    command = shlex.join(["python", "-m", "experiments.hybrid_mixture", *sys.argv[1:]])
    L = ["# The two heads' complementarity, and a linear-pool fusion (issue 19)", "", f"Command: `{command}`. Run "
         f"`{args.run}` ({run.checkpoint.name}); test: all {tT.numel()} users; fusions fitted on {half} validation "
         f"users, shown on {args.val_users - half} others; one thread.", "",
         "| test users whose target is in the top 10 of | share |", "| --- | ---: |"]
    L += [f"| {k} | {v:.4f} |" for k, v in overlap.items()]
    L += ["", "| fusion | params (a[, t_exact, t_dense]) | val NDCG@10 (fit) | val NDCG@10 (others) |", "| --- | --- | ---: | ---: |"]
    L += [f"| {k} | {g} | {f:.4f} | {h:.4f} |" for k, g, f, h in rows]
    L += ["", "| test | R@10 | N@10 |", "| --- | ---: | ---: |"]
    L += [f"| {k} | {v[0].mean():.4f} | {v[1].mean():.4f} |" for k, v in test.items()]
    L += ["", "| paired (R@10) | mean | 95% CI |", "| --- | ---: | --- |"]
    L += [f"| {k} | {m:+.4f} | [{lo:+.4f}, {hi:+.4f}] |" for k, (m, lo, hi) in paired.items()]
    text = "\n".join(L) + "\n"
    print(text)
    with atomic_open(RESULTS / f"{args.out}.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / f"{args.out}.json", {"command": command, "overlap": overlap, "fusions": rows, "paired": paired,
                                             "test": {k: [float(v[0].mean()), float(v[1].mean())] for k, v in test.items()}})


if __name__ == "__main__":
    main()
