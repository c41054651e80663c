"""`semid embed --data DATA --model MODEL_DIR`: item text -> DATA/item_emb_<name>.npy.

The work is done by :func:`semid.embed.embed_dataset`; this module parses arguments and prints what it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semid.embed import FIELDS, embed_dataset
from semid_cli.args import add_dataset, add_progress, check_device
from semid_cli.console import progress_default

DESCRIPTION = (
    "Embed every item's text (mean-pooled, L2-normalised token states of a local transformers model "
    "folder; nothing is downloaded) and write DATA/item_emb_<name>.npy, row i for item i + 1."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset(p)
    p.add_argument(
        "--model", required=True, type=Path, help="local model folder (config.json, weights, tokenizer)"
    )
    p.add_argument(
        "--fields",
        default=",".join(FIELDS),
        help=f"item fields that make the text, in order (default {','.join(FIELDS)})",
    )
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at most (default 256)")
    p.add_argument("--name", help="the file's <name> (default: from the model folder's name)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing item_emb_<name>.npy")
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    result = embed_dataset(
        args.data,
        args.model,
        fields=[f.strip() for f in args.fields.split(",") if f.strip()],
        name=args.name,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        progress=progress_default(args.progress),
        overwrite=args.overwrite,
    )
    print(f"wrote {result.path}  ({result.num_items} items x {result.dim} dims, {result.seconds:.1f} s)")
    return 0
