"""16-bit serving tables on a real trained run: test Recall@10 / NDCG@10 with the edge tables and item vectors stored
as float32, float16 and bfloat16 (``table_dtype``; scores computed in float32), and how many top-10 lists change.

    OMP_NUM_THREADS=1 python -m experiments.serve_tables16 --run RUN [--checkpoint CKPT] [--users 5000]

The run is read, never written (its checkpoint loaded once; the decoders are built per dtype from the same model).
Users: a seeded sample of ``--users`` test users (``generator.training.sampling.sample_users``, seed 0), or all.
Writes ``experiments/results/serve_tables16.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from generator.decoding.paths import TABLE_DTYPES
from generator.runs.batches import split_batches
from generator.runs.decoders import decoders_for
from generator.runs.folder import load_run
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import RankingMetrics
from semid.split import leave_one_out

RESULTS = Path(__file__).parent / "results"
DECODERS = ("beam", "dense", "exact")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="a checkpoint file instead of the run's best")
    p.add_argument("--users", default="5000", help="test users: a seeded sample of this many, or 'all'")
    p.add_argument("--decoders", default=",".join(DECODERS))
    p.add_argument("--out", default="serve_tables16")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run, args.checkpoint)
    split = leave_one_out(load_dataset(run.data_dir))
    rows = sample_users(split.num_users, None if args.users == "all" else int(args.users), 0)
    batches = split_batches(run, split, "test", rows, 256)
    names = args.decoders.split(",")
    results: dict = {}
    for dtype in TABLE_DTYPES:  # loop over three dtypes
        decs = decoders_for(run, names, num_beams=20, table_dtype=dtype)
        for name in names:  # loop over decoders
            metrics, items, start = RankingMetrics((10,)), [], time.process_time()
            for b in batches:  # loop over batches of users
                top = decs[name](b.histories, 10).items
                metrics.update(top, b.targets)
                items.append(top)
            results[(name, dtype)] = {**metrics.compute(), "items": torch.cat(items), "cpu_s": time.process_time() - start}
            print(f"{name} {dtype}: {results[(name, dtype)]['recall@10']:.4f}", file=sys.stderr, flush=True)
    L = ["# 16-bit serving tables on Beauty: test R@10 / N@10 with float32, float16 and bfloat16 tables", "",
         f"Run: `{shlex.join(['python', '-m', 'experiments.serve_tables16', *sys.argv[1:]])}` (one thread; "
         f"{platform.machine()}, 2 shared cores). Model: `{run.path}`, checkpoint `{run.checkpoint.name}` "
         f"({run.ids.num_items:,} items). **Users: {'all' if len(rows) == split.num_users else 'a seeded sample of'} "
         f"{len(rows):,} of {split.num_users:,} test users.** Only the serving tables change (edge tables and dense "
         "item vectors rounded when stored, products in float32); the model is the same.", "",
         "| decoder | tables | R@10 | N@10 | ΔR@10 vs float32 | ΔN@10 vs float32 | users whose top 10 differs | "
         "mean top-10 overlap with float32 | CPU s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        ref = results[(name, "float32")]
        for dtype in TABLE_DTYPES:
            r = results[(name, dtype)]
            same = (r["items"] == ref["items"]).all(1)
            overlap = (r["items"].unsqueeze(2) == ref["items"].unsqueeze(1)).any(2).float().sum(1).mean() / 10
            r.update(changed=float(1 - same.float().mean()), overlap=float(overlap))
            L.append(f"| {name} | {dtype} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@10'] - ref['recall@10']:+.4f} | {r['ndcg@10'] - ref['ndcg@10']:+.4f} | "
                     f"{100 * r['changed']:.1f}% | {r['overlap']:.4f} | {r['cpu_s']:.1f} |")
    text = "\n".join(L) + "\n"
    print(text)
    with atomic_open(RESULTS / f"{args.out}.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / f"{args.out}.json", {f"{n}.{d}": {k: v for k, v in r.items() if k != "items"}
                                              for (n, d), r in results.items()} | {"users": int(len(rows))})


if __name__ == "__main__":
    main()
