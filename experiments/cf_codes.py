"""Item embeddings for semantic IDs that carry collaborative signal as well as text (the study's "codes aligned
with collaborative signal" lever, LETTER's idea without its joint training).

A trained run's dense item vectors (learned from training sequences only: leave-one-out keeps every validation and
test target out of them) are L2-normalised and concatenated with the items' text embeddings (also L2-normalised),
the collaborative part weighted by ``--weight``. ``semid fit-codebooks`` then fits IDs on the result as on any
embeddings file. The first run's training time counts in the budget of a run trained on these IDs.

    python -m experiments.cf_codes --checkpoint RUN/checkpoints/best_15min.ckpt --ids RUN/semantic_ids.npz \\
        --embeddings ../shared/data/beauty/item_emb_minilm.npy --out experiments/runs/cf_emb.npy
    semid fit-codebooks --embeddings experiments/runs/cf_emb.npy --out experiments/runs/beauty_ids_cf
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from generator.models.checkpoint import load_checkpoint
from semid.ids import SemanticIDs


def cf_embeddings(item_vectors: np.ndarray, item_ids: np.ndarray, text: np.ndarray, weight: float) -> np.ndarray:
    """(N_all, D_text + D) rows in item-id order (row i is item i + 1): the normalised text embedding beside
    ``weight`` x the normalised item vector (row r of ``item_vectors`` is item ``item_ids[r]``; items without one
    get zeros there)."""
    if item_vectors.shape[0] != item_ids.shape[0]:
        raise ValueError(f"{item_vectors.shape[0]} item vectors for {item_ids.shape[0]} item ids")
    if item_ids.min() < 1 or item_ids.max() > text.shape[0]:
        raise ValueError(f"item ids span {item_ids.min()}..{item_ids.max()}, the text embeddings rows 1..{text.shape[0]}")
    t = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    v = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
    cf = np.zeros((text.shape[0], v.shape[1]), dtype=np.float32)
    cf[item_ids - 1] = v
    return np.concatenate([t.astype(np.float32), weight * cf], axis=1)


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
    emb = cf_embeddings(vectors, np.asarray(ids.item_ids, dtype=np.int64), np.load(args.embeddings), args.weight)
    np.save(args.out, emb)
    print(f"wrote {args.out}: {emb.shape[0]} items x {emb.shape[1]} (text {emb.shape[1] - vectors.shape[1]} + "
          f"collaborative {vectors.shape[1]} x {args.weight})")


if __name__ == "__main__":
    main()
