"""Learning curves on Beauty: quality against training minutes, per design and decoder, on this CPU.

    python -m experiments.learning_curve train --design causal --budgets 5,15,30,60      # one design, one process
    python -m experiments.learning_curve report                                          # table + plot of all

``train`` trains one design for the largest budget (wall clock, ``--threads`` torch threads) and keeps the best
checkpoint *as of* each budget (chosen on ``--val-users`` validation users for the decoder the design serves with;
``generator.runs.train.BudgetSnapshots``); then every snapshot is evaluated on **all** test users with each decoder the
run has (beam with 20 beams, exact, dense, hybrid with alpha chosen on 2,000 validation users). It records training
throughput (next-item targets per second: targets per epoch x epochs / training seconds) and decoding users/s.

Designs:
- ``flat-t5``: today's flat T5 encoder-decoder (``cpu`` preset) with a jointly trained dense head (``--dense both``);
- ``item-t5``: the same T5 reading one encoder position per history item (``item-t5`` preset, no user token);
- ``causal``: the default design (one position per item, every target in one pass, code head + dense head, joint);
- ``dense-only``: the same causal backbone trained with the dense loss alone (the SASRec-like yardstick);
- ``causal-gen``: an ablation, the causal design with the code head alone (no dense head or loss).

Two designs can run side by side with one thread each (2 cores). ``report`` writes
``experiments/results/learning_curve.{md,json}`` and ``learning_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from generator.runs.decoders import choose_run_fusion
from generator.runs.evaluate import evaluate_run
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.train import train_run
from semid.io import atomic_open, write_json

RESULTS = Path(__file__).parent / "results"
DESIGNS: dict[str, dict[str, Any]] = {
    "flat-t5": {"options": {"preset": "cpu", "dense": "both", "objective": "joint", "val_every": 0.5},
                "decoders": ["beam", "dense", "hybrid"]},
    "item-t5": {"options": {"preset": "item-t5", "dense": "both", "objective": "joint", "val_every": 0.5},
                "decoders": ["beam", "dense", "hybrid"]},
    # the default: its members follow the time budget (one per 7.5 CPU-minutes, 1 to 4), so its curve joins runs of
    # two and four members (learning_curve_causal.json says which row is which)
    "causal": {"options": {"preset": "causal", "dense": "id", "objective": "joint", "decoder": "beam"},
               "decoders": ["beam", "exact", "dense", "hybrid"]},
    # the default's model alone (one member), the default before its members followed the budget: its curve is kept
    "causal-single": {"options": {"preset": "causal", "dense": "id", "objective": "joint", "decoder": "beam",
                                  "model_options": {"members": 1}},
                      "decoders": ["beam", "exact", "dense", "hybrid"]},
    # the width-128 default before it served its weights' moving average (--ema 0): its curve is kept
    "causal-before-ema": {"options": {"preset": "causal", "dense": "id", "objective": "joint", "decoder": "beam", "ema": 0.0},
                          "decoders": ["beam", "exact", "dense", "hybrid"]},
    # the width-64 default (full softmax) before width 128 with the sampled head won: its curve is kept
    "causal-64": {"options": {"preset": "causal-64", "dense": "id", "objective": "joint", "decoder": "beam"},
                  "decoders": ["beam", "exact", "dense", "hybrid"]},
    # the default design before the quality study (no ID input, dropout 0.2, no sibling smoothing): its curve is kept
    "causal-before-study": {"options": {"preset": "causal-64", "dense": "id", "objective": "joint", "decoder": "beam",
                                        "model_options": {"id_input": False, "dropout": 0.2}, "label_smoothing": 0.0},
                            "decoders": ["beam", "exact", "dense", "hybrid"]},
    "dense-only": {"options": {"preset": "causal-64", "dense": "id", "objective": "dense", "decoder": "dense"},
                   "decoders": ["dense"]},
    "causal-gen": {"options": {"preset": "causal-64", "dense": "none", "decoder": "beam"},  # ablation: no dense loss
                   "decoders": ["beam", "exact"]},
}
PEERS = {  # ../shared/data/README.md, test R@10 / N@10
    "TIGER (published)": (0.0648, 0.0384),
    "SASRec, 12 min on this CPU": (0.0700, 0.0369),
    "RPG (KDD 2025)": (0.0809, 0.0464),
}


def _budget(minutes: float, clock: str) -> dict[str, str]:
    """The training option that stops at ``minutes`` on ``clock`` ("wall": max_time, "cpu": max_cpu_time)."""
    hms = f"{int(minutes // 60):02d}:{int(minutes % 60):02d}:{round(minutes % 1 * 60):02d}"
    return {"max_cpu_time": hms} if clock == "cpu" else {"max_time": hms}


def train(args: argparse.Namespace) -> None:
    train_design(args.design, DESIGNS[args.design], args, RESULTS / f"learning_curve_{args.design}{args.tag}.json",
                 "python -m experiments.learning_curve " + shlex.join(sys.argv[1:]))


def train_design(name: str, spec: dict[str, Any], args: argparse.Namespace, out_file: Path, command: str) -> None:
    """Train ``spec["options"]`` for the largest of ``args.budgets`` minutes into ``args.work/name``; evaluate the best
    checkpoint as of each budget on the test split with each of ``spec["decoders"]``; write ``out_file``.

    A schedule that follows the budget (cosine, a cooldown: ``OptimConfig.needs_budget``) is at a different point of
    its decay at each budget, so a snapshot of a longer run is not what that budget buys: such a design trains one run
    per budget instead, into ``args.work/name/<M>min``."""
    budgets = sorted(float(b) for b in args.budgets.split(","))
    clock = getattr(args, "clock", "wall")
    common = {**spec["options"], "max_epochs": None, "val_users": args.val_users, "final_val_users": 0, "patience": 0,
              "progress": False, "threads": args.threads, "seed": args.seed}
    per_budget = TrainOptions(**common, **_budget(max(budgets), clock)).optim().needs_budget
    plan = [(m, [m]) for m in budgets] if per_budget else [(max(budgets), budgets)]
    rows, runs = [], []
    for top, snaps_at in plan:  # loop over runs (one, or one per budget)
        run_dir = Path(args.work) / name / f"{top:g}min" if per_budget else Path(args.work) / name
        options = TrainOptions(**common, **_budget(top, clock))
        t0 = time.perf_counter()
        result = train_run(args.data, Path(args.ids) / "semantic_ids.npz", run_dir, options, snapshots=snaps_at)
        train_s = time.perf_counter() - t0
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        snaps = json.loads((run_dir / "checkpoints" / "snapshots.json").read_text())
        torch.set_num_threads(args.threads)
        for minutes in snaps_at:
            snap = snaps.get(f"{minutes:g}")
            if snap is None:
                continue
            ckpt = run_dir / "checkpoints" / snap["checkpoint"]
            for decoder in spec["decoders"]:
                if decoder == "hybrid":  # the fusion for this snapshot's checkpoint, chosen on validation users
                    choose_run_fusion(load_run(run_dir, ckpt), batch_size=args.eval_batch_size)
                m = evaluate_run(run_dir, "test", checkpoint=ckpt, decoder=decoder, num_beams=20, batch_size=args.eval_batch_size,
                                 max_users=args.max_users)
                rows.append({"design": name, "minutes": minutes, "decoder": decoder, "step": snap["step"],
                             "val_score": snap["best_score"], **{k: m[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")},
                             "users": m["users_evaluated"], "users_per_s": round(m["users_evaluated"] / max(m["seconds"], 1e-9), 1)})
                print(json.dumps(rows[-1]), flush=True)
        runs.append((config, train_s, result))
    config, train_s, result = runs[-1]  # the longest run's counts
    targets_per_s = config["targets_per_epoch"] * config["epochs"] / config["train_seconds"]
    out = {"design": name, "options": config["train"], "monitor": config.get("monitor"), "epochs": config["epochs"],
           "steps": config["steps"], "train_seconds": config["train_seconds"], "targets_per_epoch": config["targets_per_epoch"],
           "targets_per_s": round(targets_per_s, 1), "wall_s": round(sum(r[1] for r in runs), 1), "rows": rows,
           "runs": "one per budget" if per_budget else "one, snapshots at each budget",
           "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
           "command": command, "best_score": result.best_score}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_file, out)


def report(args: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"learning_curve_*{args.tag}.json"))
            if p.stem.removeprefix("learning_curve_").removesuffix(args.tag) in DESIGNS]
    lines = ["# Learning curves on Amazon Beauty (test split, all 22,363 users, full catalogue)", "",
             "Each design trained once on this 2-core CPU for the largest budget, one torch thread; at each budget the",
             "best checkpoint so far (chosen on 1,000 validation users, for the decoder the design serves with) is",
             "evaluated on the test split. Beam: 20 beams. Hybrid: alpha chosen on 2,000 validation users.", "",
             "| design | minutes | decoder | R@5 | N@5 | R@10 | N@10 | decode users/s |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        for r in run["rows"]:
            lines.append(f"| {r['design']} | {r['minutes']:g} | {r['decoder']} | {r['recall@5']:.4f} | {r['ndcg@5']:.4f} | "
                         f"{r['recall@10']:.4f} | {r['ndcg@10']:.4f} | {r['users_per_s']:.0f} |")
    lines += ["", "| peer (published or measured elsewhere) | R@10 | N@10 |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r:.4f} | {n:.4f} |" for name, (r, n) in PEERS.items()]
    lines += ["", "| design | epochs | steps | training s | next-item targets per epoch | targets/s | threads |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        # the step count at the last budget (snapshots.json) is the truth: config.yaml of runs made before the
        # end-of-training last.ckpt fix recorded the stale last.ckpt's count
        steps = max([run["steps"], *(r["step"] for r in run["rows"])])
        per_epoch = run["steps"] / run["epochs"] if run["epochs"] else float("nan")
        epochs = steps / per_epoch
        run["true_steps"], run["true_epochs"] = steps, round(epochs, 2)
        run["targets_per_s"] = round(run["targets_per_epoch"] * epochs / run["train_seconds"], 1)
        lines.append(f"| {run['design']} | {epochs:.1f} | {steps} | {run['train_seconds']} | {run['targets_per_epoch']:,} | "
                     f"{run['targets_per_s']:.0f} | {run['threads']} |")
    lines += ["", "Notes:", ""] + [f"- {run['design']}: {run['note']}" for run in runs if run.get("note")]
    lines += ["", "Commands:", ""] + [f"    {run['command']}" for run in runs] + [
        f"    python -m experiments.learning_curve {shlex.join(sys.argv[1:])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_open(RESULTS / f"learning_curve{args.tag}.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / f"learning_curve{args.tag}.json", {"runs": runs})
    _plot(runs, RESULTS / f"learning_curve{args.tag}.png")


def _plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
    colours = {"beam": "tab:blue", "exact": "tab:orange", "dense": "tab:green", "hybrid": "tab:red"}
    for i, run in enumerate(runs):
        for decoder in dict.fromkeys(r["decoder"] for r in run["rows"]):
            pts = [(r["minutes"], r["recall@10"]) for r in run["rows"] if r["decoder"] == decoder]
            default = run["design"] == "causal"  # the default's curve stands out
            ax.plot(*zip(*pts, strict=True), marker="o", ls="-" if default else styles[i % len(styles)], color=colours.get(decoder),
                    lw=2.5 if default else 1.0, alpha=1.0 if default else 0.55, ms=5 if default else 3,
                    label=f"{run['design']}{' (default)' if default else ''} / {decoder}")
    for name, (r, _) in PEERS.items():
        ax.axhline(r, ls=":", lw=1, color="grey")
        ax.text(0.5, r, name, fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("training minutes (one thread: CPU time; wall clock on an idle machine before the study)")
    ax.set_ylabel("test Recall@10 (all users)")
    ax.set_title("Amazon Beauty: Recall@10 against training time")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--design", choices=sorted(DESIGNS), required=True)
    t.add_argument("--data", default="../shared/data/beauty")
    t.add_argument("--ids", default="experiments/runs/beauty_ids", help="a `semid fit-codebooks` folder")
    t.add_argument("--work", default="experiments/runs/learning_curve")
    t.add_argument("--budgets", default="5,15,30,60", help="minutes")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--clock", choices=("cpu", "wall"), default="wall",
                   help="budgets in wall-clock minutes (an idle machine) or CPU minutes of the process (a shared one)")
    t.add_argument("--val-users", type=int, default=1000)
    t.add_argument("--max-users", type=int, default=None, help="test users (default all)")
    t.add_argument("--eval-batch-size", type=int, default=256)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--tag", default="")
    r = sub.add_parser("report")
    r.add_argument("--tag", default="")
    args = p.parse_args(argv)
    train(args) if args.cmd == "train" else report(args)


if __name__ == "__main__":
    main()
