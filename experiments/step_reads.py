"""Device reads and time of a causal training step on Beauty's real batches (issue 21: no host synchronisation
inside the step).

    python -m experiments.step_reads [--steps 20] [--members 1,4] [--threads 1] [--label after]

On a GPU, a step waits for the device whenever an op's output size depends on tensor values (a boolean-mask select,
``nonzero``, ``repeat_interleave`` without ``output_size``) or a value is read into Python (``.item()``, ``bool(t)``).
:class:`DeviceReads` counts those ops as the step dispatches them, on any device, forward and backward (over the 3
warm-up steps; the timed steps run without it). AdamW's step is timed but not probed: its reads are of the step
counts torch keeps on the host (not ``capturable``), never of the device. The default
preset (``causal``: width 128, the sampled dense head, sibling label smoothing 0.1) trains as ``semid train`` does:
the batch planned on the host before its transfer when the code has the plan
(``CausalSystem.on_before_batch_transfer``), then the step and AdamW. Run it in another checkout (``PYTHONPATH``) for
the code before; ``--label`` names the row, ``--out`` appends it to a JSON list.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output size depends on tensor values, or that read a value into Python
READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_consecutive", "aten::_unique",
         "aten::_unique2", "aten::unique_dim", "aten::is_nonzero", "aten::equal", "aten::masked_scatter_"}


class DeviceReads(TorchDispatchMode):
    """Counts the dispatched ops that would make a GPU wait for the device, by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name, kwargs = func._schema.name, kwargs or {}
        if name in READS:
            self.reads[name] += 1
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None:
            self.reads["repeat_interleave without output_size"] += 1
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") and any(
                i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self.reads[f"{name} with a boolean mask"] += 1
        return func(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    from dataclasses import replace

    from generator.designs.causal import PRESETS
    from generator.models.dense_loss import log_popularity
    from generator.training.causal_data import collate_windows
    from generator.training.causal_system import CausalSystem
    from generator.training.datamodules import CausalDataModule
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out
    from semid.tree import PrefixTree

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--members", default="1,4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="../shared/data/beauty")
    p.add_argument("--ids", default="experiments/runs/beauty_ids/semantic_ids.npz")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--out", default=None, help="a JSON list to append this run's rows to")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = leave_one_out(load_dataset(args.data))
    ids = SemanticIDs.load(args.ids)
    layout = ids.layout(0)
    tree = PrefixTree.from_semantic_ids(ids, layout)
    tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes)))
    dm = CausalDataModule(split, ids, max_history=50, batch_size=128, val_users=10)
    dm.setup()
    targets = dm.windows.targets[dm.windows.targets >= 0]
    log_q = log_popularity(targets, ids.num_items)
    rows: list[dict[str, Any]] = []
    for members in (int(m) for m in args.members.split(",")):
        torch.manual_seed(0)
        system = CausalSystem(replace(PRESETS["causal"], members=members), layout, tokens, torch.from_numpy(ids.item_ids),
                              "-", tree, objective="joint", log_q=log_q)
        system.log = lambda *a, **k: None
        system.optim = replace(system.optim, label_smoothing=0.1)
        system.train()
        opt = torch.optim.AdamW(system.parameters(), lr=1e-3)
        plan = getattr(system, "on_before_batch_transfer", lambda b, i: b)
        reads: collections.Counter[str] = collections.Counter()
        secs, done = 0.0, 0
        for i, index in enumerate(dm.train_sampler().batches()):
            if i == args.steps + 3:
                break
            batch = plan(collate_windows(dm.windows, index), 0)  # on the host, before a transfer
            probe = DeviceReads() if i < 3 else None  # the 3 warm-up steps counted (the probe slows an op down)
            start = time.perf_counter()
            with probe or contextlib.nullcontext():  # AdamW's reads are of its step counts, kept on the host
                loss = system.training_step(batch, 0)
                opt.zero_grad()
                loss.backward()
            opt.step()
            if probe is None:
                secs, done = secs + time.perf_counter() - start, done + 1
            else:
                reads.update(probe.reads)
        row = {"label": args.label, "members": members, "timed_steps": done, "ms_per_step": 1000 * secs / done,
               "reads_per_step": sum(reads.values()) / 3, "reads": {k: v / 3 for k, v in sorted(reads.items())},
               "threads": args.threads}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        out = Path(args.out)
        old = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps(old + rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
