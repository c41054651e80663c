"""An ensemble's served states: the members' backbones run as one (stacked weights) against one by one, same process.

    python -m experiments.ensemble_states --run RUN [--calls 300] [--threads 1]

RUN is an ensemble run folder (``--model-option members=K``; the default trained for 30 CPU-minutes or more). One call
= one test user's history, top-10, through each served decoder of a Recommender loaded once; the two ways of
computing the states (``EnsembleGenerator.hidden``: stacked, and the loop over members it replaced) take turns call
by call, so a load that comes and goes on the machine falls on both alike. Also checks that both give the same
states on the calls' histories. Writes ``experiments/results/ensemble_states.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semid.io import atomic_open

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "ensemble_states.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from generator.models.ensemble import EnsembleGenerator
    from generator.runs.batches import history_batches
    from generator.runs.recommender import Recommender
    from semid.data import load_dataset
    from semid.split import leave_one_out

    rec = Recommender.from_run(args.run, release_tables=False)  # (the members' own passes read the item table)
    model = rec.run.model
    if not isinstance(model, EnsembleGenerator):
        raise SystemExit(f"{args.run}: not an ensemble run (one member): nothing to compare")
    split = leave_one_out(load_dataset(rec.run.data_dir))
    users = np.random.default_rng(args.seed).choice(split.num_users, size=args.calls + 10, replace=False)
    batches = [history_batches(rec.run, [split.test_history(int(u))], None, 1)[0] for u in users]
    stacked = EnsembleGenerator.hidden

    def loop(self: EnsembleGenerator, histories: torch.Tensor) -> torch.Tensor:  # what hidden did before
        return torch.cat([m.hidden(histories) for m in self.members], dim=-1)  # loop over members

    with torch.no_grad():
        diff = max(float((stacked(model, b.tokens) - loop(model, b.tokens)).abs().max()) for b in batches)
    load_before = os.getloadavg()[0]
    rows = []
    try:
        for name in (n for n in ("beam", "exact", "dense", "hybrid") if n in rec._decoders):
            dec = rec._decoders[name]
            times: dict[str, list[float]] = {"stacked": [], "loop": []}
            for i, b in enumerate(batches):  # loop over timed calls
                for kind, fn in (("stacked", stacked), ("loop", loop)):
                    EnsembleGenerator.hidden = fn
                    t = time.thread_time()
                    dec(b, 10)
                    if i >= 10:  # warm-up
                        times[kind].append((time.thread_time() - t) * 1000)
            s, lp = float(np.median(times["stacked"])), float(np.median(times["loop"]))
            rows.append((name, s, lp))
            print(f"{name:>7}: stacked {s:.2f} ms, loop {lp:.2f} ms ({lp / s:.2f}x)", flush=True)
    finally:
        EnsembleGenerator.hidden = stacked
    cmd = "python -m experiments.ensemble_states " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = ["# An ensemble's served states: the members' backbones as one against one by one", "",
             f"Command: `{cmd}`", "",
             f"Run: `{args.run}` ({len(model.members)} members, {model.num_items:,} items). One call = one test user's "
             f"history, top-10, {args.calls} timed calls per decoder after 10 warm-up calls, the two ways taking turns "
             f"call by call; CPU time of the calling thread (torch threads: {torch.get_num_threads()}), median ms; load "
             f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after. Largest difference between the two "
             f"ways' states on these histories: {diff:.3g}.", "",
             "| decoder | stacked ms | loop over members ms | loop / stacked |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {s:.2f} | {lp:.2f} | {lp / s:.2f}x |" for n, s, lp in rows]
    with atomic_open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
