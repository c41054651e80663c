"""Training throughput in next-item targets per second: the flat T5 against the causal design, same process.

    python -m experiments.throughput [--steps 30] [--threads 1]

Both at width 64 (the T5 ``cpu`` preset and the ``causal`` preset), on Beauty's real batches in their default batch
sizes (256 T5 examples, 128 causal windows), each with and without its dense head (full softmax over the
catalogue): AdamW steps after 5 warm-up steps. A T5 example is one target; a causal window trains every real
position. Writes ``experiments/results/throughput.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semid.io import atomic_open

RESULTS = Path(__file__).parent / "results"


def _time(step, batches, steps: int) -> tuple[float, int]:  # noqa: ANN001
    targets, start = 0, 0.0
    for i, b in enumerate(batches[: steps + 5]):
        if i == 5:
            start, targets = time.perf_counter(), 0
        targets += step(b)
    return time.perf_counter() - start, targets


def main(argv: list[str] | None = None) -> None:
    from generator.runs.options import preset
    from generator.t5.datamodule import GeneratorDataModule
    from generator.t5.system import GeneratorSystem, dense_setup
    from generator.training.causal_data import collate_windows
    from generator.training.causal_system import CausalSystem
    from generator.training.datamodules import CausalDataModule
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out
    from semid.tree import PrefixTree

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="../shared/data/beauty")
    p.add_argument("--ids", default="experiments/runs/beauty_ids/semantic_ids.npz")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data)
    split = leave_one_out(dataset)
    ids = SemanticIDs.load(args.ids)
    rows = []
    for dense in (False, True):
        # the flat T5 (cpu preset), as `semid train --preset cpu [--dense both]` trains it
        torch.manual_seed(0)
        layout = ids.layout(2000)
        tree = PrefixTree.from_semantic_ids(ids, layout)
        dm = GeneratorDataModule(split, ids, layout, batch_size=256, max_history=20, val_users=10)
        dm.setup()
        cfg = preset("cpu")
        ds = dense_setup("both" if dense else None, "joint" if dense else "generative", dataset, split, ids, cfg.d_model)
        t5 = GeneratorSystem(cfg, layout, "-", tree, dense_head=ds.head, objective=ds.objective)
        t5.log = t5.log_dict = lambda *a, **k: None
        opt = torch.optim.AdamW(t5.parameters(), lr=1e-3)
        from generator.t5.data import collate

        def t5_step(index, t5=t5, opt=opt, dm=dm, layout=layout) -> int:  # noqa: ANN001
            b = collate(dm.train_examples, index, layout.pad_token_id)
            loss = t5.training_step(b, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return int(b.target.numel())

        secs, n = _time(t5_step, [torch.as_tensor(b) for b in dm.train_sampler().batches()], args.steps)
        rows.append(("flat T5 (cpu preset, d 64)", dense, n / secs, secs / args.steps))
        # the causal design (causal preset), as `semid train [--dense none]` trains it
        torch.manual_seed(0)
        layout = ids.layout(0)
        tree = PrefixTree.from_semantic_ids(ids, layout)
        cdm = CausalDataModule(split, ids, max_history=50, batch_size=128, val_users=10)
        cdm.setup()
        from dataclasses import replace

        ccfg = replace(preset("causal-64"), **({} if dense else {"dense_dim": 0, "id_input": False}))  # the width-64 full-softmax design measured here
        tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes)))
        causal = CausalSystem(ccfg, layout, tokens, torch.from_numpy(ids.item_ids), "-", tree,
                              objective="joint" if dense else "generative")
        causal.log = lambda *a, **k: None
        copt = torch.optim.AdamW(causal.parameters(), lr=1e-3)

        def causal_step(index, causal=causal, copt=copt, cdm=cdm) -> int:  # noqa: ANN001
            b = collate_windows(cdm.windows, index)
            loss = causal.training_step(b, 0)
            copt.zero_grad()
            loss.backward()
            copt.step()
            return int((b.targets >= 0).sum())

        secs, n = _time(causal_step, cdm.train_sampler().batches(), args.steps)
        rows.append(("causal (causal preset, d 64)", dense, n / secs, secs / args.steps))
        for r in rows[-2:]:
            print(f"{r[0]}, dense head {'yes' if r[1] else 'no'}: {r[2]:.0f} targets/s ({1000 * r[3]:.0f} ms/step)", flush=True)
    lines = ["# Training throughput: next-item targets per second (Beauty batches, one process)", "",
             f"{args.steps} AdamW steps per row after 5 warm-up steps, {args.threads} torch thread(s).", "",
             "| design | dense head | targets/s | ms/step | vs flat T5, same head |", "| --- | --- | ---: | ---: | ---: |"]
    for name, dense, rate, step in rows:
        base = next(r[2] for r in rows if r[0].startswith("flat") and r[1] == dense)
        lines.append(f"| {name} | {'yes (full softmax)' if dense else 'no'} | {rate:.0f} | {1000 * step:.0f} | {rate / base:.1f}x |")
    lines += ["", f"    python -m experiments.throughput {shlex.join(sys.argv[1:])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with atomic_open(RESULTS / "throughput.md", "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
