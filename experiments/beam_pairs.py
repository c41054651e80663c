"""The beam's gathered (beam, child) pairs in three forms, A/B in one process on the same decoders and users:
each pair's own (1, D) x (D, 1) product (the first form); ``paths.pair_dots`` in chunks (one product per chunk whose
pairs belong to a few histories); and the fused kernel (``paths.fused_pairs``, compiled: one pass, no temporaries;
the step then also chooses gathers over the level's whole product sooner, ``FUSED_STEP_FACTOR``).

    python -m experiments.beam_pairs --run RUN                              # a real run (Recommender.from_run)
    python -m experiments.beam_pairs --ids /tmp/scale_ids --size 10000000   # the synthetic catalogue experiments.scale
                                                                            # kept (--ids), served from its checkpoint

One torch thread; beam search (20 beams, k = 10) of 128 random level queries, then of one; each form timed three
times, alternating, per CPU second of the process (the median). Prints a row per batch size; ``--out`` appends
them to a file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

import generator.decoding.causal as causal
from generator.decoding.paths import pair_dots, warm_fused


def one_row_products(hq: torch.Tensor, table: torch.Tensor, rows: torch.Tensor, hist: torch.Tensor, *, chunk: int,
                     bias: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """The form before ``pair_dots`` (its reference): each pair's own (1, D) x (D, 1) product, chunk by chunk; a row
    of -1 (no child) gives -inf, of A (an only child, no table row) 0, as ``pair_dots``."""
    C, (A, D), lead = rows.numel(), table.shape[-2:], hq.shape[:-2]
    slot, rows = rows, rows.clamp(0, A - 1)
    out = hq.new_empty(*lead, C)
    for a in range(0, C, chunk):  # loop over chunks of pairs
        q = hq.index_select(-2, hist[a : a + chunk]).reshape(-1, D, 1)
        v = table.index_select(-2, rows[a : a + chunk]).to(hq.dtype).reshape(-1, 1, D)
        out[..., a : a + chunk] = torch.bmm(v, q).view(*lead, -1)
    out = out if bias is None else out + bias.index_select(-1, rows)
    return torch.where(slot < 0, float("-inf"), torch.where(slot >= A, 0.0, out))


def decoders(args: argparse.Namespace) -> causal.CausalDecoders:
    if args.run:
        from generator.runs.recommender import Recommender

        return Recommender.from_run(args.run, decoders=["beam"])._decoders["beam"].shared
    from generator.designs.registry import load_checkpoint
    from semid.ids import SemanticIDs
    from semid.tree import PrefixTree

    ids = SemanticIDs.load(args.ids / f"ids_{args.size}.npz")
    model = load_checkpoint(args.ids / f"model_{args.size}.ckpt", ids, mmap=True).model
    tree = None if causal.drops_tree(model, True) else PrefixTree.from_semantic_ids(ids, ids.layout(0))
    return causal.CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=20, dense_index="exact",
                                 table_dtype=getattr(args, "table_dtype", "bfloat16")).refresh(release=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a run folder")
    p.add_argument("--ids", type=Path, help="experiments.scale's --ids folder (ids_<size>.npz, model_<size>.ckpt)")
    p.add_argument("--size", default="10000000")
    p.add_argument("--out", type=Path, help="append the rows to this markdown file")
    args = p.parse_args(argv)
    if (args.run is None) == (args.ids is None):
        p.error("give --run or --ids")
    torch.set_num_threads(1)
    dec = decoders(args)
    label = str(args.run) if args.run else f"{int(args.size):,} items (synthetic), bfloat16 tables"
    g = torch.Generator().manual_seed(0)
    rows = []
    fused = dec.fused_pairs or warm_fused(dec.tables.vectors[1], dec.tables.biases[1])  # (Beauty's: compiled here)
    forms = {"one-row products": (one_row_products, False), "pair_dots": (pair_dots, False)}
    if fused:
        forms["fused"] = (pair_dots, True)
    for B in (128, 1):
        width = dec.model.config.d_model * len(getattr(dec.model, "members", [None]))  # an ensemble's side by side
        h = torch.randn(B, width, generator=g)
        ms: dict[str, list[float]] = {}
        got = {}
        for _ in range(3):  # loop over rounds, the forms alternating
            for name, (form, on) in forms.items():
                causal.pair_dots, dec.fused_pairs = form, on
                got[name] = dec.decode("beam", h, k=10)  # (warm-up)
                reps = 1 if B > 1 else 200
                t = time.process_time()
                for _ in range(reps):  # loop over calls
                    dec.decode("beam", h, k=10)
                ms.setdefault(name, []).append((time.process_time() - t) / reps * 1e3)
        causal.pair_dots = pair_dots
        t = {name: sorted(v)[1] for name, v in ms.items()}
        ref = got["one-row products"]
        cells = " | ".join(f"{t[n]:.1f} ({B / t[n] * 1e3:.0f})" for n in forms)
        same = all(torch.equal(r.items, ref.items) for r in got.values())
        diff = max(float((r.scores - ref.scores).abs().max()) for r in got.values())
        gains = " / ".join(f"{t['one-row products'] / t[n]:.2f}x" for n in forms if n != "one-row products")
        rows.append(f"| {label} | {B} | {cells} | {gains} | {'yes' if same else 'NO'} | {diff:.1e} |")
        print(rows[-1], flush=True)
    if args.out:
        command = shlex.join(["python", "-m", "experiments.beam_pairs", *(sys.argv[1:] if argv is None else argv)])
        with open(args.out, "a") as f:
            f.write("\n".join([f"<!-- {command} -->", *rows, ""]))


if __name__ == "__main__":
    main()
