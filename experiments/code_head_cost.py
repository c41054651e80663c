"""Where a training step's code-head loss spends its time: ``code_loss`` forward and backward on P target positions of
a run's model (one member), timed and broken down by torch operator, one CPU thread; and each pair level's padded
children table (``_children``: (P, W), W the level's widest parent) and the (position, child) pairs the loss scores
per position (its targets' parents' children: what the code head's cost follows).

    python -m experiments.code_head_cost --run RUN [--positions 1500] [--out experiments/results/code_head_cost.md]

Positions are a seeded sample of the run's items as targets (their codes teacher-forced), the level queries random:
the cost depends on the shapes and the tree, not on the values. A diagnostic for issue 21's training step.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from generator.models.causal_loss import code_loss, pair_levels
from generator.runs.folder import load_run


def _ms(fn, n: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(n):  # loop over timed calls
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a causal run folder")
    p.add_argument("--positions", type=int, default=1500, help="target positions P (about one training batch)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_run(args.run).model
    model = model.members[0] if hasattr(model, "members") else model
    model.train()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, model.item_tokens.shape[0], (args.positions,), generator=g)
    tokens = model.item_tokens[rows]
    L, D = model.layout.num_levels, model.config.d_model
    hq = torch.randn(args.positions, L, D, generator=g, requires_grad=True)

    def step() -> None:
        code_loss(model, hq, tokens, label_smoothing=args.label_smoothing).backward()

    total = _ms(step, args.calls)
    lines = [f"# The code head's loss, forward and backward: {args.positions} positions, one CPU thread", "",
             f"Run `{args.run}` (one member); `code_loss` with label smoothing {args.label_smoothing}: **{total:.1f} ms** "
             "(median of {0} calls).".format(args.calls), "",
             "| level | parents | widest parent W | mean children per parent | pairs per position (the targets' parents' "
             "children) | `_children` (P, W) ms |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for level in pair_levels(model):  # loop over levels (L <= 4)
        codes = getattr(model, f"child_codes_{level}")
        real = (codes >= 0).sum(1).float()
        prefix = tokens[:, :level]
        per = (model._children(level, prefix)[0] >= 0).sum(1).float().mean()  # what the loss computes per position
        lines.append(f"| {level} | {codes.shape[0]:,} | {codes.shape[1]} | {real.mean():.1f} | {per:.1f} | "
                     f"{_ms(lambda prefix=prefix, level=level: model._children(level, prefix), args.calls):.2f} |")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):  # a few calls
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    whole = sum(e.self_cpu_time_total for e in prof.key_averages())
    lines += ["", "Operators by self CPU time (5 calls, torch.profiler):", "", "| operator | calls | share |",
              "| --- | ---: | ---: |"]
    lines += [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / whole:.0%} |" for e in events]
    lines += ["", "Command:", "", "    python -m experiments.code_head_cost " + shlex.join(sys.argv[1:] if argv is None else argv), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
