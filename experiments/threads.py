"""Training throughput of the default design with 1 or 2 torch threads, alone and beside a competing process.

    python -m experiments.threads [--steps 40]

The competing process is what a shared 2-core machine sees all the time (another job, a test run, an IDE): one
thread of float matrix products. Each cell trains ``--steps`` steps on Beauty's real batches (after 5 warm-up
steps) and reports steps/s. Writes ``experiments/results/threads.md``; its ratios decide the ``--threads`` default.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semid.io import atomic_open

RESULTS = Path(__file__).parent / "results"


def _burn(stop: mp.Event) -> None:  # the competing job: one thread of matmuls until told to stop
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = (a @ a).tanh()


def _steps_per_s(threads: int, steps: int, data: str, ids_path: str) -> float:
    from generator.models.causal import CausalConfig
    from generator.training.causal_data import collate_windows
    from generator.training.causal_system import CausalSystem
    from generator.training.datamodules import CausalDataModule
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out
    from semid.tree import PrefixTree

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    split = leave_one_out(load_dataset(data))
    ids = SemanticIDs.load(ids_path)
    layout = ids.layout(0)
    dm = CausalDataModule(split, ids, max_history=50, batch_size=128, val_users=10)
    dm.setup()
    tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes)))
    system = CausalSystem(CausalConfig(), layout, tokens, torch.from_numpy(ids.item_ids), "-", PrefixTree.from_semantic_ids(ids, layout))
    system.log = lambda *a, **k: None  # no trainer here
    opt = torch.optim.AdamW(system.parameters(), lr=1e-3)
    batches = dm.train_sampler().batches()[: steps + 5]
    for i, b in enumerate(batches):
        if i == 5:
            start = time.perf_counter()
        loss = system.training_step(collate_windows(dm.windows, b), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--data", default="../shared/data/beauty")
    p.add_argument("--ids", default="experiments/runs/beauty_ids/semantic_ids.npz")
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile (written into the table)")
    args = p.parse_args(argv)
    rows = []
    for busy in (False, True):
        for threads in (1, 2):
            stop = mp.Event()
            burner = mp.Process(target=_burn, args=(stop,)) if busy else None
            if burner:
                burner.start()
            try:
                rate = _steps_per_s(threads, args.steps, args.data, args.ids)
            finally:
                if burner:
                    stop.set()
                    burner.join()
            rows.append((threads, busy, rate))
            print(f"threads {threads}, competing process {'yes' if busy else 'no'}: {rate:.2f} steps/s", flush=True)
    lines = ["# Training throughput against torch threads (default design, Beauty batches of 128 windows)", "",
             f"{args.steps} steps per cell after 5 warm-up steps; the competing process is one thread of matmuls.",
             *([f"Also running meanwhile: {args.note}."] if args.note else []), "",
             "| torch threads | competing process | steps/s | vs 1 thread, same load |", "| ---: | --- | ---: | ---: |"]
    for threads, busy, rate in rows:
        base = next(r for t, b, r in rows if t == 1 and b == busy)
        lines.append(f"| {threads} | {'yes' if busy else 'no'} | {rate:.2f} | {rate / base:.2f}x |")
    lines += ["", f"    python -m experiments.threads {shlex.join(sys.argv[1:])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with atomic_open(RESULTS / "threads.md", "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
