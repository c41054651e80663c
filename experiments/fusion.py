"""The hybrid decoder's fusions on Beauty: chosen on validation, measured on every test user with paired intervals.

    python -m experiments.fusion --run RUN [--checkpoint F] [--val-users 2000] [--max-users N] [--tag NAME]

1. Every fusion of ``generator.decoding.fusion`` (pool blend, full-catalogue blend whole or level by level, LIGER,
   reciprocal-rank fusion, learned per-candidate blend) is fitted on ``--val-users`` validation users and the hybrid's fusion is chosen on
   as many other validation users (exactly what ``semid choose-fusion`` does; the choice is stored in
   RUN/hybrid.json).
2. On the test split (all users unless ``--max-users``): beam, exact, dense and each fusion, one timed pass each
   (the encoder pass included, in this process, one thread unless OMP_NUM_THREADS says otherwise), Recall/NDCG@5/10.
3. Paired differences, hybrid minus each part, with a 95% bootstrap interval over users (2,000 resamples).

Writes ``experiments/results/fusion[_TAG].{md,json}`` with the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding import registry
from generator.decoding.fusion import FUSIONS, FusionChoice
from generator.decoding.protocol import Decoder
from generator.decoding.registry import CAUSAL, Ingredients
from generator.runs.batches import Labelled, split_batches
from generator.runs.decoders import decoders_for, trained_tree
from generator.runs.folder import load_run
from generator.runs.fusion_store import choose_fusion
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import ndcg_at_k, paired_bootstrap, recall_at_k
from semid.split import leave_one_out

RESULTS = Path(__file__).parent / "results"
KS = (5, 10)


def timed_pass(decoder: Decoder, batches: list[Labelled], k: int) -> tuple[np.ndarray, float]:
    """(items (U, k), seconds) of ``decoder`` over the prepared batches: encoder pass + decoding, timed."""
    out = []
    start = time.perf_counter()
    for b in batches:  # loop over batches of users
        out.append(decoder(b.histories, k).items.cpu())
    return torch.cat(out).numpy(), time.perf_counter() - start


def fusion_decoders(run: Any, choice: FusionChoice, *, num_beams: int, num_candidates: int) -> dict[str, Decoder]:
    """``hybrid:<kind>`` for every fusion of ``generator.decoding.fusion``: the run's hybrid decoder with that fusion and
    the parameters fitted for it on validation users (``choice.table``), built through the registry."""
    ing = Ingredients(CAUSAL, run.model, run.tree, run.layout, run.ids, num_beams=num_beams, num_candidates=num_candidates,
                      trained_tree=trained_tree(run))
    return {f"hybrid:{kind}": registry.build(dataclasses.replace(ing, fusion=(kind, choice.table[kind]["params"])), "hybrid")
            for kind in FUSIONS}  # loop over fusions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--run", type=Path, required=True, help="a causal run folder with a dense head")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint of the run instead of its best one")
    p.add_argument("--val-users", type=int, default=5000, help="validation users to fit on (as many again choose)")
    p.add_argument("--max-users", type=int, help="a seeded sample of test users (default: all)")
    p.add_argument("--num-beams", type=int, default=20, help="beams of the beam decoder (default 20)")
    p.add_argument("--num-candidates", type=int, default=50, help="C: each list's candidates in a pool (default 50)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    run = load_run(args.run, args.checkpoint)
    split = leave_one_out(load_dataset(run.data_dir))
    decoders = decoders_for(run, ["beam", "exact", "dense"], num_beams=args.num_beams, num_candidates=args.num_candidates)
    dec = decoders["beam"].shared  # the CausalDecoders the three share (item paths, edge tables, item vectors)
    t0 = time.perf_counter()
    choice = choose_fusion(run, functools.partial(dec.history_parts, levels=True), split, num_candidates=dec.num_candidates, max_users=args.val_users, batch_size=args.batch_size, seed=args.seed)
    choose_s = time.perf_counter() - t0
    print(f"chosen on validation: {choice.kind} {choice.params} ({choose_s:.0f} s)", file=sys.stderr, flush=True)
    decoders |= fusion_decoders(run, choice, num_beams=args.num_beams, num_candidates=args.num_candidates)

    rows = sample_users(split.num_users, args.max_users, args.seed)
    batches = split_batches(run, split, "test", rows, args.batch_size)
    tgt = np.concatenate([b.targets.numpy() for b in batches])
    per_user: dict[str, dict[str, np.ndarray]] = {}
    table: dict[str, dict[str, float]] = {}
    names = ["beam", "exact", "dense", *(f"hybrid:{kind}" for kind in FUSIONS)]
    for name in names:  # loop over decoders
        items, secs = timed_pass(decoders[name], batches, max(KS))
        per_user[name] = {f"{m}@{k}": fn(items, tgt, k) for k in KS for m, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))}
        table[name] = {m: float(v.mean()) for m, v in per_user[name].items()} | {"users_per_s": len(tgt) / secs}
        print(f"{name}: {table[name]}", file=sys.stderr, flush=True)

    hybrid = f"hybrid:{choice.kind}"

    def paired(a: str, b: str) -> dict[str, list[float]]:
        out = {}
        for m in ("recall@10", "ndcg@10"):
            mean, lo, hi = paired_bootstrap(per_user[a][m], per_user[b][m], seed=args.seed)
            base = table[b][m]
            out[m] = [mean, lo, hi, mean / base if base else float("nan")]
        return out

    diffs = {other: paired(hybrid, other) for other in names if other != hybrid}
    parts = ("exact", "dense")
    per_fusion = {f"{name} vs {part}": paired(name, part) for name in names if name.startswith("hybrid:") for part in parts}

    lines: list[str] = []
    say = lines.append
    n = len(tgt)
    say("# The hybrid's fusions on Beauty (causal design)")
    say("")
    say(f"run `{args.run}`, checkpoint `{run.checkpoint.name}`; test: {n} users" + (" (sample)" if args.max_users else " (all)")
        + f"; full-catalogue ranking; one thread; C = {dec.num_candidates} per list, {args.num_beams} beams")
    say("")
    say(f"Chosen on validation: **{choice.kind}** {choice.params} (fitted on {args.val_users} validation users, "
        "chosen by NDCG@10 on as many others)")
    say("")
    say("| fusion | params | val NDCG@10 (fit users) | val NDCG@10 (choice users) |")
    say("| --- | --- | --- | --- |")
    for kind, row in choice.table.items():
        params = {k: ([round(x, 3) for x in v] if isinstance(v, list) else v) for k, v in row["params"].items()}
        say(f"| {kind} | {params} | {row['fit_ndcg@10']:.4f} | {row['select_ndcg@10']:.4f} |")
    say("")
    say("## Test")
    say("")
    say("| decoder | R@5 | N@5 | R@10 | N@10 | users/s |")
    say("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        m = table[name]
        mark = " (chosen)" if name == hybrid else ""
        say(f"| {name}{mark} | {m['recall@5']:.4f} | {m['ndcg@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | {m['users_per_s']:.0f} |")
    say("")
    sections = {f"Paired differences on test: {hybrid} minus each (mean, 95% bootstrap interval over users, relative)": ("vs", diffs),
                "Every fusion against each part (paired, 95% bootstrap interval)": ("fusion vs part", per_fusion)}
    for title, (first, rows_) in sections.items():  # two tables of paired differences
        say(f"## {title}")
        say("")
        say(f"| {first} | ΔR@10 | 95% CI | rel. | ΔN@10 | 95% CI | rel. |")
        say("| --- | --- | --- | --- | --- | --- | --- |")
        for label, d in rows_.items():
            r, g = d["recall@10"], d["ndcg@10"]
            say(f"| {label} | {r[0]:+.4f} | [{r[1]:+.4f}, {r[2]:+.4f}] | {r[3]:+.1%} | {g[0]:+.4f} | [{g[1]:+.4f}, {g[2]:+.4f}] | {g[3]:+.1%} |")
        say("")
    say(f"command: `python -m experiments.fusion {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    print("\n".join(lines))
    stem = "fusion" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_open(RESULTS / f"{stem}.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    write_json(RESULTS / f"{stem}.json", {"choice": choice._asdict(), "test": table, "differences": diffs, "per_fusion": per_fusion,
                                          "test_users": n, "argv": sys.argv[1:] if argv is None else argv})


if __name__ == "__main__":
    main()
