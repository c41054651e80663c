"""Recall@10 of the dense decoder's approximate index (faiss IVF, ``generator.decoding.mips.dense_index``) against
exact inner-product search, on vectors with structure: a trained model's, and synthetic clustered ones up to 10M.

    OMP_NUM_THREADS=1 python -m experiments.ivf_recall --run RUN --sizes 1000000,10000000 [--queries 256]

``experiments.scale`` measures the index on an untrained model (random item vectors and states: no cluster for the
inverted lists to follow, a pessimistic case). Here:

- ``RUN`` (a causal run with a dense head; real): its best checkpoint's item vectors, queried by its dense queries of
  ``--queries`` seeded test users (the histories before their test items).
- N items, SYNTHETIC (labelled so; they measure the index, never a model's quality): 64-d item vectors drawn around
  N/50 Gaussian centres (``experiments.scale.catalogue``'s), queries a random centre plus noise of the same scale
  (a user whose taste is one cluster, as a trained query points at the items it ranks first).

For each: the IVF index semid builds beyond ``exact_max_items`` (sqrt(N) lists), searched visiting 32 lists (the
default ``nprobe``), 64 and 128; recall@10 = the share of the exact top 10 that the index returns; build seconds and
queries per second, one thread. Writes ``experiments/results/ivf_recall.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.scale import DIM, SEED
from semid.io import atomic_open, write_json

RESULTS = Path(__file__).parent / "results"
PROBES = (32, 64, 128)


def synthetic(n: int, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(item vectors (n, 64), queries (q, 64)): the scale study's clustered catalogue, queries around its centres."""
    rng = np.random.default_rng(SEED)
    C = max(1, n // 50)
    centres = rng.standard_normal((C, DIM)).astype(np.float32) * 2
    vecs = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 1_000_000):  # in chunks of 1M rows, to bound the temporaries
        rows = np.arange(start, min(n, start + 1_000_000))
        vecs[rows] = centres[rows % C] + rng.standard_normal((rows.size, DIM)).astype(np.float32)
    q = centres[rng.integers(0, C, queries)] + rng.standard_normal((queries, DIM)).astype(np.float32)
    return torch.from_numpy(vecs), torch.from_numpy(q)


def trained(run: Path, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's item vectors and the dense queries of ``queries`` seeded test users."""
    from generator.designs.registry import for_config
    from generator.runs.folder import load_run
    from semid.data import load_dataset
    from semid.split import leave_one_out

    loaded = load_run(run)
    model = loaded.model.eval()
    split = leave_one_out(load_dataset(loaded.data_dir))
    rows = np.random.default_rng(SEED).choice(split.num_users, size=min(queries, split.num_users), replace=False)
    design = for_config(loaded.config)
    (batch,) = design.history_batches(loaded, [split.test_history(int(i)) for i in rows], None, len(rows))
    with torch.inference_mode():
        q = model.dense_queries(model.last_hidden(batch.tokens, batch.lengths))
        return model.item_vectors().detach(), q


def measure(vecs: torch.Tensor, q: torch.Tensor) -> dict:
    from generator.decoding.mips import dense_index

    t0 = time.perf_counter()
    exact = torch.cat([(q[i:i + 64] @ vecs.T).topk(10, dim=1).indices for i in range(0, len(q), 64)])  # chunks of 64
    out = {"items": int(vecs.shape[0]), "queries": int(q.shape[0]), "exact_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    index = dense_index(vecs, "faiss-ivf")
    out["build_s"], out["nlist"] = time.perf_counter() - t0, int(index._backend.nlist)
    for nprobe in PROBES:
        index._backend.nprobe = min(nprobe, index._backend.nlist)
        t0 = time.perf_counter()
        rows = index.search(q, 10).item_ids
        out[f"qps_{nprobe}"] = len(q) / (time.perf_counter() - t0)
        hits = (rows.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().sum(1)
        out[f"recall_{nprobe}"] = float((hits / 10).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None, help="a causal run with a dense head (its vectors: real)")
    p.add_argument("--sizes", default="1000000,10000000", help="synthetic catalogue sizes")
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--others", default="nothing", help="what else ran on the machine")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    if args.run is not None:
        rows.append({"catalogue": f"{args.run.name} (real, trained)", **measure(*trained(args.run, args.queries))})
        print(rows[-1], file=sys.stderr, flush=True)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        vecs, q = synthetic(size, args.queries)
        rows.append({"catalogue": f"{size:,} (synthetic)", **measure(vecs, q)})
        del vecs
        print(rows[-1], file=sys.stderr, flush=True)
    command = shlex.join(["python", "-m", "experiments.ivf_recall", *sys.argv[1:]])
    lines = ["# The dense decoder's IVF index: recall@10 against exact search (issue 21)", "",
             f"Command: `{command}`. One thread ({platform.machine()}, torch {torch.__version__}); also running: "
             f"{args.others}. IVF with sqrt(N) lists (what `dense_index` builds beyond `exact_max_items`); "
             "recall@10 = share of the exact top 10 returned. Synthetic rows measure the index, never a model.", "",
             "| catalogue | items | lists | build s | " + " | ".join(f"recall@10 / q/s at {n} probed" for n in PROBES) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in PROBES) + " |"]
    for r in rows:
        lines.append(f"| {r['catalogue']} | {r['items']:,} | {r['nlist']} | {r['build_s']:.1f} | "
                     + " | ".join(f"{r[f'recall_{n}']:.3f} / {r[f'qps_{n}']:.0f}" for n in PROBES) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_open(RESULTS / "ivf_recall.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / "ivf_recall.json", {"rows": rows, "command": command, "others": args.others})


if __name__ == "__main__":
    main()
