"""Single-user latency of a loaded run: ``Recommender.recommend`` per decoder, against the one-off path.

    python -m experiments.latency --run RUN [--calls 300] [--old-calls 10] [--threads 1] [-k 10] [--exclude-history]

RUN is a causal run folder with a dense head and a stored fusion (``semid train`` chooses one; ``semid choose-fusion``
for an older run). A Beauty run for it, quality aside (about 4 minutes on one thread):

    python -m semid_cli fit-codebooks --embeddings ../shared/data/beauty/item_emb_minilm.npy --out /tmp/rec_ids
    python -m semid_cli train --data ../shared/data/beauty --ids /tmp/rec_ids --out /tmp/rec_run --max-time 00:03:00 --threads 1

One call = one test user's history (a seeded sample of the run's dataset's test users), top-k. Columns, in ms per call
(median and 90th percentile):

- ``serve``: ``Recommender.recommend([history], k)`` on a Recommender loaded once (what a service does per request);
  wall clock and the thread's CPU time (what the call costs with a core to itself);
- ``decode``: the decoder alone on the user's prepared ``Histories`` (the floor ``serve`` can reach);
- ``one-off``: ``generator.runs.recommend.recommend(run, [history], k)``, which builds a Recommender for the call
  (decoders, item paths, edge tables, item vectors, the checkpoint's hash, the fusion read): what every call cost
  before runs were loaded for serving.
- ``--unfrozen``: also ``serve`` with the served model's frozen input table set aside for the call (each history
  item's input summed from its code embeddings and ID row per call, as before ``decoding.inputs.freeze_inputs``),
  taking turns with the other calls: what the table saves, in one process.

Writes ``experiments/results/latency.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semid.io import atomic_open

RESULTS = Path(__file__).parent / "results"
DECODERS = ("beam", "exact", "dense", "hybrid")
TARGETS_MS = {"beam": 5.0, "exact": 5.0, "dense": 2.0, "hybrid": 8.0}  # issue 18's single-user targets


def _ms(fns, calls: int, warmup: int) -> list[tuple[float, float, float]]:  # noqa: ANN001
    """(median, p90, median CPU) milliseconds of each ``fn(i)`` over ``calls`` calls after ``warmup``; the functions
    take turns call by call, so a load that comes and goes on the machine falls on all of them alike. CPU is this
    thread's CPU time (``time.thread_time``; torch runs on this one thread): what a call costs with a core to itself."""
    for i in range(warmup):
        for fn in fns:
            fn(i)
    wall, cpu = np.empty((len(fns), calls)), np.empty((len(fns), calls))
    for i in range(calls):  # loop over timed calls
        for j, fn in enumerate(fns):
            c0, t0 = time.thread_time(), time.perf_counter()
            fn(i)
            wall[j, i], cpu[j, i] = (time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000
    return [(float(np.median(w)), float(np.percentile(w, 90)), float(np.median(c))) for w, c in zip(wall, cpu, strict=True)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a causal run folder with a dense head and a stored fusion")
    p.add_argument("--calls", type=int, default=300, help="timed single-user calls per decoder (serve, decode)")
    p.add_argument("--old-calls", type=int, default=10, help="timed one-off calls per decoder")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-history", action="store_true",
                   help="serve calls leave the history out (what `semid serve` does by default)")
    p.add_argument("--unfrozen", action="store_true", help="also time serve calls without the frozen input table")
    p.add_argument("--out", type=Path, default=RESULTS / "latency.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from generator.runs.batches import history_batches
    from generator.runs.folder import load_run
    from generator.runs.recommend import recommend
    from generator.runs.recommender import Recommender
    from semid.data import load_dataset
    from semid.split import leave_one_out

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rec = Recommender.from_run(args.run)
    load_s = time.perf_counter() - t0
    run = rec.run  # released for serving (its N-row tables freed): the one-off calls take a run loaded whole
    whole = load_run(args.run)
    split = leave_one_out(load_dataset(run.data_dir))
    users = np.random.default_rng(args.seed).choice(split.num_users, size=max(args.calls, args.old_calls) + args.warmup, replace=False)
    hists = [split.test_history(int(u)).tolist() for u in users]
    batches = [history_batches(run, [np.asarray(h)], None, 1)[0] for h in hists]
    rows = []
    # (--unfrozen: a second Recommender keeping the model's tables: the served one released the item table that
    # inputs computed per call read)
    whole_rec = Recommender.from_run(args.run, release_tables=False) if args.unfrozen else None
    missing = [name for name in DECODERS if name not in rec._decoders]  # hybrid: no fusion stored for this checkpoint
    if missing:
        print(f"not measured (the run serves no such decoder; hybrid needs `semid choose-fusion --run RUN`): {missing}")
    for name in (n for n in DECODERS if n not in missing):
        dec = rec._decoders[name]
        fns = [lambda i, n=name: rec.recommend([hists[i]], args.k, n, exclude_history=args.exclude_history),
               lambda i, d=dec: d(batches[i], args.k)]
        if args.unfrozen:
            fns.append(lambda i, n=name: unfrozen(whole_rec, lambda: whole_rec.recommend([hists[i]], args.k, n, exclude_history=args.exclude_history)))
        serve, decode, *plain = _ms(fns, args.calls, args.warmup)
        (old,) = _ms([lambda i, n=name: recommend(whole, [hists[i]], k=args.k, decoder=n, exclude_history=args.exclude_history)],
                     args.old_calls, 1)
        rows.append((name, serve, decode, old, plain))
        print(f"{name:>7}: serve {serve[0]:.2f} / {serve[1]:.2f} ms (CPU {serve[2]:.2f}), decode {decode[0]:.2f} / "
              f"{decode[1]:.2f} ms (CPU {decode[2]:.2f}), one-off {old[0]:.1f} / {old[1]:.1f} ms"
              + (f", unfrozen serve {plain[0][0]:.2f} / {plain[0][1]:.2f} ms" if plain else ""), flush=True)

    cmd = "python -m experiments.latency " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Single-user latency of a loaded run (issue 18)", "",
        f"Command: `{cmd}`", "",
        f"Run: `{args.run}` ({run.design}, {run.ids.num_items:,} items, fusion {run_fusion(rec)}), version "
        f"`{rec.version}`; loaded and built in {load_s:.2f} s. One call = one test user's history, top-{args.k}; "
        f"{args.calls} timed calls per decoder ({args.old_calls} for one-off) after {args.warmup} warm-up calls; "
        f"serve calls {'leave the history out' if args.exclude_history else 'rank every item'}; "
        f"torch threads: {torch.get_num_threads()}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; {os.cpu_count()} CPUs, load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (other jobs on the machine: the latencies carry their noise; serve and decode "
        "take turns call by call, so they carry it alike).", "",
        "| decoder | serve median ms | serve p90 ms | serve CPU median ms | target ms | decode median ms | decode CPU median ms | one-off median ms | one-off p90 ms | one-off / serve |"
        + (" unfrozen serve median ms | unfrozen CPU median ms |" if args.unfrozen else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.unfrozen else ""),
    ]
    for name, serve, decode, old, plain in rows:
        ok = "yes" if serve[0] <= TARGETS_MS[name] else "NO"
        cpu_ok = "yes" if serve[2] <= TARGETS_MS[name] else "NO"
        lines.append(f"| {name} | {serve[0]:.2f} | {serve[1]:.2f} | {serve[2]:.2f} | <= {TARGETS_MS[name]:g} (wall {ok}, "
                     f"CPU {cpu_ok}) | {decode[0]:.2f} | {decode[2]:.2f} | {old[0]:.1f} | {old[1]:.1f} | "
                     f"{old[0] / serve[0]:.0f}x |" + (f" {plain[0][0]:.2f} | {plain[0][2]:.2f} |" if plain else ""))
    lines += ["", "serve: `Recommender.recommend` on a run loaded once; decode: the decoder alone on prepared `Histories`; "
              "one-off: `recommend(run, ...)`, which builds everything per call (the path every call took before). "
              "Wall: `time.perf_counter`; CPU: the calling thread's CPU time (`time.thread_time`; torch runs on this one "
              "thread), what a call costs with a core to itself, which a shared machine's wall clock overstates."]
    with atomic_open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def unfrozen(rec, call):  # noqa: ANN001, ANN201
    """``call()`` with the served model's frozen input table set aside (its inputs computed per call), then restored."""
    models = [rec.run.model, *getattr(rec.run.model, "members", [])]
    held = [m._input_table for m in models]
    for m in models:
        m._input_table = None
    try:
        return call()
    finally:
        for m, t in zip(models, held, strict=True):
            m._input_table = t


def run_fusion(rec) -> str:  # noqa: ANN001
    shared = getattr(rec._decoders.get("hybrid"), "shared", None)
    return str(getattr(shared, "fusion", None))


if __name__ == "__main__":
    main()
