"""The same semantic IDs with their code levels in another order (ActionPiece's permuted orders, issue 19's study).

    python -m experiments.permuted_ids --ids experiments/runs/beauty_ids --order 2,1,0 --out experiments/runs/perm/reversed

Reads ``IDS/semantic_ids.npz`` and writes ``OUT/semantic_ids.npz`` (what ``semid train --ids OUT`` and the study's
``--ids`` read) with the base levels' columns in ``--order`` and the extra (collision) level, if any, still last:
the tuples are the same set permuted, so they stay unique. Every item keeps its row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semid.codebooks import IDS_FILE
from semid.ids import SemanticIDs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ids", type=Path, required=True, help="a `semid fit-codebooks` folder")
    p.add_argument("--order", required=True, help="the base levels' new order, e.g. 2,1,0")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    ids = SemanticIDs.load(args.ids / IDS_FILE)
    base = ids.num_base_levels
    order = [int(x) for x in args.order.split(",")]
    if sorted(order) != list(range(base)):
        raise SystemExit(f"--order must permute the {base} base levels 0..{base - 1}, got {args.order}")
    cols = order + list(range(base, ids.num_levels))  # the extra level stays last
    sizes = [ids.codebook_sizes[c] for c in cols]
    out = SemanticIDs(ids.codes[:, cols], ids.item_ids, sizes)
    if out.collision_stats().items_colliding != ids.collision_stats().items_colliding:
        raise SystemExit("the permuted tuples collide differently: not a permutation of unique IDs")
    args.out.mkdir(parents=True, exist_ok=True)
    out.save(args.out / IDS_FILE, levels_order=",".join(map(str, cols)), permuted_from=str(args.ids))
    print(f"wrote {args.out / IDS_FILE}: levels in the order {cols} of {args.ids / IDS_FILE}")


if __name__ == "__main__":
    main()
