"""Item embeddings for the study's "codes aligned with collaborative signal" lever, from a run's checkpoint (any
snapshot, e.g. ``best_15min.ckpt``); ``semid fit-codebooks --collaborative RUN`` does the same from a run's best
checkpoint. The first run's training time counts in the budget of a run trained on these IDs.

    python -m experiments.cf_codes --checkpoint RUN/checkpoints/best_15min.ckpt --ids RUN/semantic_ids.npz \\
        --embeddings ../shared/data/beauty/item_emb_minilm.npy --out experiments/runs/cf_emb.npy
    semid fit-codebooks --embeddings experiments/runs/cf_emb.npy --out experiments/runs/beauty_ids_cf
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from generator.designs.registry import load_checkpoint
from semid.collaborative import with_collaborative
from semid.ids import SemanticIDs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a causal run's checkpoint with a dense head")
    p.add_argument("--ids", required=True, help="the run's semantic_ids.npz (maps the model's rows to item ids)")
    p.add_argument("--embeddings", required=True, help="the items' text embeddings, row i is item i + 1")
    p.add_argument("--weight", type=float, default=1.0, help="weight of the collaborative half (default 1)")
    p.add_argument("--out", required=True, help=".npy file to write")
    args = p.parse_args(argv)
    ids = SemanticIDs.load(args.ids)
    loaded = load_checkpoint(args.checkpoint, ids)
    with torch.no_grad():
        vectors = loaded.model.item_vectors()[: loaded.model.trained_items].float().numpy()
    emb = with_collaborative(np.load(args.embeddings), vectors, np.asarray(ids.item_ids, dtype=np.int64), args.weight)
    np.save(args.out, emb)
    print(f"wrote {args.out}: {emb.shape[0]} items x {emb.shape[1]} (collaborative {vectors.shape[1]} x {args.weight})")


if __name__ == "__main__":
    main()
