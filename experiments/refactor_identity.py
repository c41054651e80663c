"""Same metrics and the same recommendations before and after a refactor, for every decoder of every design.

Three small Beauty runs (causal, T5, title) are trained once with the code *before* the change, and the hybrid's
fusion is chosen by that code (the run folders as users have them); then each decoder is evaluated on the test users
(all, or a seeded sample) and asked for one recommendation, once with the code before and once with the code after,
each on its own copy of those folders. ``compare`` prints the table
(``experiments/results/refactor_identity.md``) and exits non-zero on any difference.

    git archive BEFORE | tar -x -C /tmp/before          # the code before, as a folder
    python -m experiments.refactor_identity train --code /tmp/before --work /tmp/identity
    python -m experiments.refactor_identity evaluate --code /tmp/before --work /tmp/identity --side before
    python -m experiments.refactor_identity evaluate --code . --work /tmp/identity --side after
    python -m experiments.refactor_identity compare --work /tmp/identity

The models are weak (a few hundred steps): the point is identity, not quality. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from semid.io import atomic_open

# run -> `semid train` flags (beside --data/--ids/--out)
RUNS = {
    "causal": ["--max-steps", "400"],
    "t5": ["--preset", "cpu", "--dense", "both", "--max-steps", "300"],
    "title": ["--target", "title", "--max-steps", "150"],
}
# run -> (decoder, test users); users 0 = all
DECODERS = {
    "causal": [("beam", 0), ("exact", 0), ("dense", 0), ("hybrid", 0), ("codes-grounded", 1000)],
    "t5": [("beam", 2000), ("dense", 2000), ("hybrid", 2000), ("generate", 100)],
    "title": [("title-beam", 1000)],  # title-grounded needs a run trained with --encoder
}
HISTORY = "12,45,99,1024"


def _semid(code: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(code.resolve()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "semid_cli", *args]
    # run from the code's folder: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code.resolve())
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def train(args: argparse.Namespace) -> None:
    work = Path(args.work)
    for name, flags in RUNS.items():
        out = work / "runs" / name
        if (out / "config.yaml").is_file():
            continue
        _semid(Path(args.code), "train", "--data", args.data, "--ids", args.ids, "--out", str(out), "--threads", "1",
               "--val-users", "200", "--final-val-users", "0", "--no-progress", *flags)
        print(f"trained {name}", flush=True)


def evaluate(args: argparse.Namespace) -> None:
    work, code = Path(args.work), Path(args.code)
    side = work / args.side
    results = {}
    for name, decoders in DECODERS.items():
        run = side / name
        if not run.exists():  # before: the trained run, its fusion chosen by the code before; after: that very folder
            source = work / "runs" / name if args.side == "before" else work / "before" / name
            shutil.copytree(source, run, ignore=shutil.ignore_patterns("metrics_*.json"))
            if args.side == "before" and any(d == "hybrid" for d, _ in decoders):
                _semid(code, "choose-fusion", "--run", str(run), "--users", "1000")
        for decoder, users in decoders:
            sample = ["--max-users", str(users)] if users else []
            r = _semid(code, "evaluate", "--run", str(run), "--split", "test", "--decoder", decoder, "--no-progress", *sample)
            metrics = json.loads(_last_json(run, users))
            rec = _semid(code, "recommend", "--run", str(run), "--history", HISTORY, "-k", "10", "--json",
                         "--decoder", decoder).stdout
            results[f"{name}/{decoder}"] = {"users": users, "metrics": metrics, "recommend": json.loads(rec),
                                            "printed": r.stdout.strip().splitlines()[-1:]}
            print(f"{args.side} {name} {decoder}: {metrics.get('recall@10')}", flush=True)
    with atomic_open(side / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)


def _last_json(run: Path, users: int) -> str:
    """The metrics file the evaluation just wrote (the code before wrote every decoder's to one name; later code
    writes a decoder other than the default to its own file): the newest ``metrics_test*.json``."""
    files = run.glob(f"metrics_test*_sample{users}.json" if users else "metrics_test*.json")
    return max(files, key=lambda p: p.stat().st_mtime_ns).read_text(encoding="utf-8")


def compare(args: argparse.Namespace) -> None:
    work = Path(args.work)
    before = json.loads((work / "before" / "results.json").read_text(encoding="utf-8"))
    after = json.loads((work / "after" / "results.json").read_text(encoding="utf-8"))
    lines = ["| run | decoder | test users | before R@10 | after R@10 | before N@10 | after N@10 | metrics | recommend --json |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bad = 0
    for key in sorted(before):
        b, a = before[key], after.get(key)
        name, decoder = key.split("/")
        if a is None:
            lines.append(f"| {name} | {decoder} | | | missing after | | | | |")
            bad += 1
            continue
        mb, ma = _metric_values(b["metrics"]), _metric_values(a["metrics"])
        same_m, same_r = mb == ma, b["recommend"] == a["recommend"]
        bad += (not same_m) + (not same_r)
        users = f"{b['users']:,} (seeded sample)" if b["users"] else "all"
        lines.append(f"| {name} | {decoder} | {users} | {mb.get('recall@10', 0):.6f} | {ma.get('recall@10', 0):.6f} | "
                     f"{mb.get('ndcg@10', 0):.6f} | {ma.get('ndcg@10', 0):.6f} | {'identical' if same_m else 'DIFFERENT'} | "
                     f"{'identical' if same_r else 'DIFFERENT'} |")
    print("\n".join(lines))
    print("ALL IDENTICAL" if not bad else f"{bad} DIFFERENCES")
    sys.exit(1 if bad else 0)


def _metric_values(m: dict) -> dict:
    """The ranking metrics of a metrics file (not its timing or provenance fields)."""
    inner = m.get("metrics", m)
    return {k: v for k, v in inner.items() if k.startswith(("recall@", "ndcg@"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    e = sub.add_parser("evaluate")
    e.add_argument("--side", choices=("before", "after"), required=True)
    for q in (t, e):
        q.add_argument("--code", required=True, help="a folder with the code (semid_cli, generator, semid, rqvae)")
        q.add_argument("--data", default="../shared/data/beauty")
        q.add_argument("--ids", default="experiments/runs/beauty_ids")
    c = sub.add_parser("compare")
    for q in (t, e, c):
        q.add_argument("--work", required=True)
    args = p.parse_args(argv)
    {"train": train, "evaluate": evaluate, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    main()
