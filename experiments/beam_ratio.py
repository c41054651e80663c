"""The beam's rate at a large synthetic catalogue as a share of its rate at Beauty's, both served in one process
and timed alternately (issue 21's target: >= 50% at 10M items), so that this VM's drift moves both alike.

    python -m experiments.beam_ratio --ids /tmp/scale_ids --size 10000000 --out experiments/results/beam_ratio.md

Reads experiments.scale's kept folder (``--ids``: ids_beauty.npz, model_beauty.ckpt, ids_<size>.npz,
model_<size>.ckpt, written by its codebooks and checkpoint phases), builds both decoders as a server does (mapped
checkpoint, released tables, ``--table-dtype``), then times beam search (20 beams, k = 10) of the same 128 random
level queries per catalogue, ``--rounds`` rounds alternating, per CPU second of one torch thread; prints the medians.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from experiments.beam_pairs import decoders


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", type=Path, required=True, help="experiments.scale's --ids folder")
    p.add_argument("--size", default="10000000")
    p.add_argument("--table-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--users", type=int, default=128)
    p.add_argument("--out", type=Path, help="append the row to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    built = {}
    for size in ("beauty", args.size):  # loop over the two catalogues
        t = time.process_time()
        built[size] = decoders(argparse.Namespace(run=None, ids=args.ids, size=size, table_dtype=args.table_dtype))
        print(f"{size}: built in {time.process_time() - t:.0f} CPU s, fused kernel: {built[size].fused_pairs}", flush=True)
    g = torch.Generator().manual_seed(0)
    h = {size: torch.randn(args.users, dec.model.config.d_model, generator=g) for size, dec in built.items()}
    ms: dict[str, list[float]] = {size: [] for size in built}
    for size, dec in built.items():  # warm-up: each batch's temporaries allocated once, as in a running server
        dec.decode("beam", h[size], k=10)
    for _ in range(args.rounds):  # loop over rounds, the catalogues alternating
        for size, dec in built.items():
            t = time.process_time()
            dec.decode("beam", h[size], k=10)
            ms[size].append((time.process_time() - t) * 1e3)
    big = built[args.size]  # the same items without the full levels' tables (each step's pairs listed instead)?
    with_tables = big.decode("beam", h[args.size], k=10)
    kept, big.dense = big.dense, ([None] * len(big.dense[0]), [None] * len(big.dense[1]))
    without = big.decode("beam", h[args.size], k=10)
    big.dense = kept
    same = "yes" if torch.equal(with_tables.items, without.items) else "NO"
    full = sum(t is not None for t in kept[0])
    med = {size: statistics.median(v) for size, v in ms.items()}
    rate = {size: args.users / m * 1e3 for size, m in med.items()}
    spread = {size: f"{min(v):.1f}-{max(v):.1f}" for size, v in ms.items()}
    row = (f"| {int(args.size):,} (synthetic) | {args.table_dtype} | {args.users} | {args.rounds} | "
           f"{med['beauty']:.1f} ({spread['beauty']}) | {med[args.size]:.1f} ({spread[args.size]}) | "
           f"{rate['beauty']:.0f} | {rate[args.size]:.0f} | **{rate[args.size] / rate['beauty']:.0%}** | {full} | {same} |")
    print(row, flush=True)
    if args.out:
        command = shlex.join(["python", "-m", "experiments.beam_ratio", *(sys.argv[1:] if argv is None else argv)])
        with open(args.out, "a") as f:
            f.write(f"<!-- {command} -->\n{row}\n")


if __name__ == "__main__":
    main()
