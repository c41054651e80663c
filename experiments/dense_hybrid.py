"""Beam vs dense vs hybrid decoding on Beauty's test split: one table of quality and speed.

    python -m experiments.dense_hybrid --run RUN [--dense-run RUN2] [--max-users N] [--tag NAME]

``RUN`` is a run folder trained with a dense head (``semid train ... --dense both --objective joint``): its beam
search (``auto``: the fast constrained beam search), its dense head (MIPS over all items) and the hybrid of the two
(the union of the beam's and the dense head's top ``--num-candidates``, each scored by teacher forcing, re-ranked by
alpha * generative + (1 - alpha) * dense log-probability, alpha chosen
on ``--alpha-users`` *validation* users). ``--dense-run`` takes the dense row from another run (e.g. one trained
with ``--objective dense``). Rows: R@5, N@5, R@10, N@10 over all test users (or a seeded sample), users/second
(decoding only, one process, ``torch.get_num_threads()`` threads; the one-off alpha search is not timed).

Writes the printed table, the runs' training budgets and the command to
``experiments/results/dense_hybrid[_TAG].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from generator.decoding.protocol import Decoder, Histories
from generator.runs.batches import Labelled, split_batches
from generator.runs.decoders import choose_run_fusion, decoders_for, stored_fusion
from generator.runs.folder import HYBRID_FILE, load_run
from generator.runs.recommender import on_device
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.ids import SemanticIDs
from semid.io import atomic_open, write_json
from semid.metrics import RankingMetrics
from semid.split import leave_one_out

RESULTS = Path(__file__).parent / "results"
PUBLISHED = {  # ../shared/data/README.md: R@5, N@5, R@10, N@10
    "TIGER (published)": (0.0454, 0.0321, 0.0648, 0.0384),
    "SASRec tuned (Cornac)": (0.0508, 0.0348, 0.0740, 0.0423),
    "RPG (KDD 2025)": (0.0550, 0.0381, 0.0809, 0.0464),
}


def budget(run_dir: Path) -> dict[str, Any]:
    """How a run was trained, from its config.yaml."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    train = config.get("train", {})
    return {
        "run": str(run_dir),
        "preset": train.get("preset"),
        "dense": train.get("dense"),
        "objective": train.get("objective") if train.get("dense") else "generative",
        "dense_options": train.get("dense_options"),
        "epochs": config.get("epochs"),
        "steps": config.get("steps"),
        "train_seconds": config.get("train_seconds"),
        "max_time": train.get("max_time"),
        "accelerator": train.get("accelerator"),
    }


def describe(decoder: Decoder) -> str:
    """The decoder's registry name and settings, e.g. ``hybrid(alpha=0.3, num_candidates=50, num_beams=20)``."""
    keys = ("alpha", "num_candidates", "num_beams", "kind", "epsilon", "prefix_levels", "max_per_prefix")
    settings = ", ".join(f"{key}={getattr(decoder, key)!r}" for key in keys if getattr(decoder, key, None) is not None)
    return f"{decoder.name}({settings})"


def score(
    decoder: Decoder, batches: list[Labelled], ids: SemanticIDs, *, device: str, ks=(5, 10), cold_from: int | None = None,
) -> dict[str, Any]:
    """Decode every batch's histories; Recall/NDCG@ks of its targets, and decoding users/second.

    ``decoder`` is bound to its model, tree and item vectors (on ``device``); ``ids`` are the items it ranks (returned
    items outside them are errors). With ``cold_from``, also the share of returned items with ids >= cold_from
    (``cold_share``).
    """
    metrics = RankingMetrics(ks)
    known = torch.from_numpy(ids.item_ids)
    bad = cold = 0
    first = batches[0].histories  # one untimed call: allocations, lazy set-up (item vectors)
    decoder(Histories(first.tokens[:8], first.mask[:8]).to(device), max(ks))
    start = time.perf_counter()
    for b in batches:  # loop over batches of users
        items = decoder(b.histories.to(device), max(ks)).items.cpu()
        bad += int((~torch.isin(items, known)).sum()) + int((items.sort(1).values.diff(dim=1) == 0).sum())
        metrics.update(items, b.targets)
        cold += int((items >= cold_from).sum()) if cold_from is not None else 0
    seconds = time.perf_counter() - start
    if bad:  # a real check, not an assert (which `python -O` strips)
        raise RuntimeError(f"{bad} invalid or duplicate items returned by {describe(decoder)}")
    return {**metrics.compute(), "users": metrics.count, "seconds": round(seconds, 2), "users_per_s": metrics.count / seconds,
            "decoder": describe(decoder),
            **({"cold_share": cold / (metrics.count * max(ks))} if cold_from is not None else {})}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="run folder with a dense head (beam and hybrid rows)")
    p.add_argument("--dense-run", type=Path, help="run folder for the dense row (default --run)")
    p.add_argument("--data", type=Path, help="dataset folder (default: the run's)")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--max-users", type=int, help="a seeded sample of test users (default: all)")
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--num-candidates", type=int, default=50, help="candidates per history from each of beam and dense; the hybrid re-ranks their union")
    p.add_argument("--alpha-users", type=int, default=2000, help="validation users for choosing alpha")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args(argv)
    if args.split == "valid":  # alpha is chosen on validation users: scoring the hybrid on them would be biased
        p.error("--split valid would score the hybrid on the validation users its alpha was chosen on; use --split test")

    dense_dir = args.dense_run or args.run
    run = load_run(args.run)
    dense_run = load_run(dense_dir) if dense_dir != args.run else run
    data = args.data or run.data_dir
    split = leave_one_out(load_dataset(data))
    run, dense_run = on_device(run, args.device), (on_device(dense_run, args.device) if dense_run is not run else None)
    dense_run = dense_run or run  # one copy on the device when both are one run

    # alpha on validation users only (chosen once, then read from RUN/hybrid.json), before anything is timed
    if stored_fusion(run, args.num_candidates, required=False) is None:
        choose_run_fusion(run, split, num_candidates=args.num_candidates, num_beams=args.num_beams,
                          users=args.alpha_users, batch_size=args.batch_size, seed=args.seed)
    decoders = decoders_for(run, ["beam", "hybrid"], num_beams=args.num_beams, num_candidates=args.num_candidates)
    decoders["dense"] = decoders_for(dense_run, ["dense"])["dense"]
    alpha_info = json.loads((args.run / HYBRID_FILE).read_text())

    user_rows = sample_users(split.num_users, args.max_users, args.seed)
    rows: dict[str, Any] = {}
    for name, r in (("beam", run), ("dense", dense_run), ("hybrid", run)):
        batches = split_batches(r, split, args.split, user_rows, args.batch_size)
        rows[name] = score(decoders[name], batches, r.ids, device=args.device)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)

    lines: list[str] = []
    say = lines.append
    users = rows["beam"]["users"]
    say(f"# Beam vs dense vs hybrid: Beauty {args.split} split, {users} users" + (" (sample)" if args.max_users else " (all)"))
    say("")
    say("| decoder | R@5 | N@5 | R@10 | N@10 | users/s |")
    say("| --- | --- | --- | --- | --- | --- |")
    for name, m in rows.items():
        say(f"| {name} | {m['recall@5']:.4f} | {m['ndcg@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | {m['users_per_s']:.1f} |")
    for name, (r5, n5, r10, n10) in PUBLISHED.items():
        say(f"| {name} | {r5:.4f} | {n5:.4f} | {r10:.4f} | {n10:.4f} | |")
    say("")
    say(f"hybrid: fusion {alpha_info['fusion']} {alpha_info['params']} chosen on {alpha_info['validation_users']} validation users by "
        f"{alpha_info['metric']}; union of beam top-{args.num_candidates} and dense top-{args.num_candidates} (teacher-forced generative scores) re-ranked; table by fusion: {alpha_info['table']}")
    say(f"beam: {args.num_beams} beams; dense: exact MIPS (torch matmul + topk) over all {run.ids.num_items} items")
    budgets = {"beam/hybrid": budget(args.run), **({"dense": budget(dense_dir)} if dense_dir != args.run else {})}
    for name, b in budgets.items():
        say(f"training ({name}): {b}")
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, device {args.device}")
    say("")
    say(f"command: `python -m experiments.dense_hybrid {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    print("\n".join(lines))

    stem = "dense_hybrid" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_open(RESULTS / f"{stem}.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    write_json(RESULTS / f"{stem}.json", {"rows": rows, "alpha": alpha_info, "budgets": budgets, "split": args.split,
                                          "argv": sys.argv[1:] if argv is None else argv})


if __name__ == "__main__":
    main()
