"""The default design's training step with the lean forward's own dropout and fused GELU (``gpt2_states.dropout``,
``gelu_new``) against F.dropout and transformers' five-operation GELU, interleaved step by step in one process.

    python -m experiments.step_ab --data DATA --ids IDS [--steps 20] [--out experiments/results/step_ab.md]

Each step's batch is trained once with each variant (alternating which goes first), AdamW on the ``causal`` preset
with its sampled dense head and log-Q correction, one torch thread; the first 3 steps are warm-up. A diagnostic of
speed only: the two variants draw different dropout masks, so their losses differ.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from semid.io import atomic_open

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    from transformers.activations import NewGELUActivation

    import generator.models.gpt2_states as lean
    from generator.models.dense_loss import log_popularity
    from generator.runs.options import preset
    from generator.training.causal_data import collate_windows
    from generator.training.causal_system import CausalSystem
    from generator.training.datamodules import CausalDataModule
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out
    from semid.tree import PrefixTree

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--ids", required=True, help="a semantic_ids.npz")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS / "step_ab.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    split = leave_one_out(load_dataset(args.data))
    ids = SemanticIDs.load(args.ids)
    torch.manual_seed(0)
    layout = ids.layout(0)
    dm = CausalDataModule(split, ids, max_history=50, batch_size=128, val_users=10)
    dm.setup()
    targets = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in split.train])
    system = CausalSystem(preset("causal"), layout, torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes))),
                          torch.from_numpy(ids.item_ids), "-", PrefixTree.from_semantic_ids(ids, layout), objective="joint",
                          log_q=log_popularity(torch.from_numpy(ids.rows_of(targets)), len(ids.item_ids)))
    system.log = lambda *a, **k: None
    opt = torch.optim.AdamW(system.parameters(), lr=1e-3)
    variants = {"before": (lambda x, p, t: F.dropout(x, p, t), NewGELUActivation()), "after": (lean.dropout, lean.gelu_new)}
    times: dict[str, list[float]] = {"before": [], "after": []}
    batches = list(dm.train_sampler().batches())
    positions = []
    for i in range(args.steps + 3):  # loop over timed steps
        b = collate_windows(dm.windows, batches[i % len(batches)])
        positions.append(int((b.targets >= 0).sum()))
        for name in (("before", "after") if i % 2 else ("after", "before")):
            lean.dropout, lean.gelu_new = variants[name]
            start = time.perf_counter()
            loss = system.training_step(b, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    lean.dropout, lean.gelu_new = variants["after"]
    before, after = (1000 * statistics.median(times[k]) for k in ("before", "after"))
    diff = 1000 * statistics.median(a - b for a, b in zip(times["before"], times["after"], strict=True))
    text = "\n".join([
        "# Training step: the lean forward's dropout and fused GELU against F.dropout and transformers' GELU", "",
        f"Data `{args.data}`, {len(ids.item_ids)} items, `causal` preset, 128 windows of <= 50 positions (median "
        f"{int(statistics.median(positions))} trained positions per step), one torch thread; {args.steps} steps, each "
        "batch trained by both variants in alternating order.", "",
        "| variant | median ms/step |", "| --- | ---: |", f"| before (F.dropout, NewGELUActivation) | {before:.0f} |",
        f"| after (uniform-draw mask, fused tanh GELU) | {after:.0f} |", "",
        f"Paired median difference: {diff:.0f} ms per step ({100 * diff / before:.1f}% of before).", "",
        f"    python -m experiments.step_ab {shlex.join(sys.argv[1:] if argv is None else argv)}", ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
