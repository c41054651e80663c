"""Same rankings before and after a speed change: every causal decoder's top 20 on a loaded run, compared.

    python -m experiments.rank_identity dump --run RUN --out A.npz [--users 3000]    # with the code before
    python -m experiments.rank_identity dump --run RUN --out B.npz                   # with the code after
    python -m experiments.rank_identity compare A.npz B.npz
    python -m experiments.rank_identity dump --run RUN --out C.npz --lean            # served as a large catalogue is

``dump`` loads RUN as a service does (``Recommender.from_run``) and ranks a seeded sample of test users (the same
users whatever the code) with beam, exact, dense and hybrid: one user per call (a tenth of the sample) and in
batches of 64 (all of it), top 20 each. ``compare`` prints, per decoder and batch size, the share of users whose 20
items are the same in the same order, the top-10 overlap, and the largest score difference (float rounding), and
exits 1 if any ranking differs. Run "before" from a copy of the old code (``git archive REV | tar -x -C DIR``, then
``PYTHONPATH=DIR``). One torch thread.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

DECODERS = ("beam", "exact", "dense", "hybrid")
TOP = 20


def dump(run: str, out: str, users: int, lean: bool = False, table_dtype: str = "float32") -> None:
    from generator.runs.batches import split_batches
    from generator.runs.recommender import Recommender
    from generator.training.sampling import sample_users
    from semid.data import load_dataset
    from semid.split import leave_one_out

    torch.set_num_threads(1)
    if lean:  # serve as a catalogue over 2^17 items is served: input read from the item vectors, beam on the index
        import generator.decoding.causal as causal

        causal.LEAN_SERVING_ITEMS = 0
    rec = Recommender.from_run(run, **({} if table_dtype == "float32" else {"table_dtype": table_dtype}))
    if lean:
        assert rec.run.tree is None and all(m._input_vectors is not None for m in getattr(rec.run.model, "members", [rec.run.model]))
    split = leave_one_out(load_dataset(rec.run.data_dir))
    res = {}
    for batch_size, n in ((1, users // 10), (64, users)):
        batches = split_batches(rec.run, split, "test", sample_users(split.num_users, n, 0), batch_size)
        for name in DECODERS:
            ranked = [rec._decoders[name](b.histories, TOP) for b in batches]  # loop over batches of users
            res[f"{name}_{batch_size}_items"] = torch.cat([r.items for r in ranked]).numpy()
            res[f"{name}_{batch_size}_scores"] = torch.cat([r.scores for r in ranked]).float().numpy()
    np.savez(out, **res)
    print(f"wrote {out}")


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    differ = 0
    for key in sorted(k for k in a.files if k.endswith("_items")):
        ia, ib = a[key], b[key]
        sa, sb = a[key.replace("_items", "_scores")], b[key.replace("_items", "_scores")]
        same = float((ia == ib).all(1).mean())
        top10 = float(np.mean([len(set(x[:10]) & set(y[:10])) / 10 for x, y in zip(ia, ib, strict=True)]))
        d = np.abs(sa - sb)[np.isfinite(sa) & np.isfinite(sb)]
        differ += same < 1.0
        print(f"| {key[:-6]} | {len(ia)} | {same:.4f} | {top10:.4f} | {d.max() if d.size else 0.0:.1e} |")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--run", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--users", type=int, default=3000)
    d.add_argument("--lean", action="store_true", help="serve the run lean whatever its size (LEAN_SERVING_ITEMS 0): "
                   "the input read from the item vectors, the beam on the prefix index, the tree dropped")
    d.add_argument("--table-dtype", default="float32", help="the serving tables' storage (Recommender(table_dtype=))")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "dump":
        dump(args.run, args.out, args.users, args.lean, args.table_dtype)
    else:
        print("| decoder_batch | users | same 20 items, same order | top-10 overlap | max abs score difference |")
        print("| --- | ---: | ---: | ---: | ---: |")
        sys.exit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
