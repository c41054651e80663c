"""Cold start for runs of the causal design (``python -m experiments.coldstart`` hands them here).

The warm run (trained without the cold items) chooses its hybrid fusion on warm validation users, exactly as
``semid evaluate --decoder hybrid`` does. A copy of it, ``WORK/run_cold``, then gets the cold items for good with
``semid add-items`` from ``WORK/full`` (the whole catalogue, warm items first): codes from the fitted quantizer, a
new version of its semantic IDs, dense vectors from codes and content. Every decoder of that run ranks the whole
catalogue (warm + cold) for the users whose test target is cold; their histories keep the cold items they hold.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
from typing import Any

import numpy as np
import torch

from experiments.fusion import fusion_decoders, timed_pass
from generator.decoding.protocol import Histories
from generator.runs.batches import Labelled, split_batches
from generator.runs.decoders import decoders_for
from generator.runs.folder import load_run
from generator.runs.fusion_store import choose_fusion
from generator.training.causal_data import SeqBatch, eval_batches
from generator.training.sampling import sample_users
from semid.coldstart import ColdStartSplit, write_full_dataset
from semid.data import Dataset, load_dataset
from semid.metrics import ndcg_at_k, recall_at_k
from semid.split import leave_one_out
from semid_cli import main as semid

KS = (5, 10)


def _labelled(batches: list[SeqBatch]) -> list[Labelled]:
    """Evaluation batches of item rows + 1 (``causal_data.eval_batches``) as the decoders read them."""
    return [Labelled(Histories(b.histories, torch.arange(b.histories.shape[1])[None, :] < b.lengths[:, None]), b.targets)
            for b in batches]


def evaluate(args: argparse.Namespace, dataset: Dataset, split: ColdStartSplit) -> tuple[dict[str, Any], list[str]]:
    """(table, notes): per decoder Recall/NDCG@5/10, cold share of the top 10 and users/s on the cold test users."""
    warm_run = load_run(args.work / "run")
    warm_split = leave_one_out(load_dataset(args.work / "warm"))
    warm_dec = decoders_for(warm_run, ["beam"], num_beams=args.num_beams, num_candidates=args.num_candidates)["beam"].shared
    choice = choose_fusion(warm_run, functools.partial(warm_dec.history_parts, levels=True), warm_split, num_candidates=warm_dec.num_candidates,
                           max_users=args.alpha_users, batch_size=args.batch_size, seed=args.seed)
    print(f"fusion chosen on warm validation users: {choice.kind} {choice.params}", file=sys.stderr, flush=True)

    full, cold_run = args.work / "full", args.work / "run_cold"
    if not (full / "items.jsonl").is_file():
        write_full_dataset(dataset, split, full)
    if cold_run.exists():
        shutil.rmtree(cold_run)
    shutil.copytree(args.work / "run", cold_run)
    argv = ["add-items", "--run", str(cold_run), "--data", str(full), "--embeddings", args.embeddings]
    if (code := semid(argv)) != 0:
        raise RuntimeError(f"`semid {' '.join(argv)}` failed with exit status {code}")
    run = load_run(cold_run)
    torch.set_num_threads(args.threads)
    C = min(args.num_candidates, run.ids.num_items)  # the causal decoders' candidates per list
    # 'beam + cold prefix': the causal beam's top C, then TIGER's prefix matching of cold items (ColdStartBeam)
    decoders = decoders_for(run, ["beam", "exact", "dense", "cold-beam"], num_beams=args.num_beams,
                            num_candidates=args.num_candidates, cold_items=split.new_cold_ids,
                            cold_options={"epsilon": args.cold_epsilon, "num_candidates": C})
    decoders |= fusion_decoders(run, choice, num_beams=args.num_beams, num_candidates=args.num_candidates)
    prefix = decoders.pop("cold-beam")
    decoders[f"beam + cold prefix (ε={args.cold_epsilon:g})"] = prefix  # the last row

    rows = sample_users(len(split.test_targets), args.max_users, args.seed)
    batches = _labelled(eval_batches([split.test_histories[i] for i in rows], split.test_targets[rows], run.ids,
                                     run.max_history, args.batch_size))
    tgt = np.concatenate([b.targets.numpy() for b in batches])
    cold_from = split.num_warm + 1
    # what adding the cold items costs the users whose test target is warm (same world, same histories)
    world = leave_one_out(load_dataset(full))
    warm_rows = np.flatnonzero(world.test_targets < cold_from)
    warm_rows = warm_rows[sample_users(warm_rows.size, args.warm_users, args.seed)]
    warm_batches = split_batches(run, world, "test", warm_rows, args.batch_size)
    warm_tgt = np.concatenate([b.targets.numpy() for b in warm_batches])
    table: dict[str, Any] = {}
    for name, decoder in decoders.items():  # loop over decoders
        items, secs = timed_pass(decoder, batches, max(KS))
        table[name] = {f"{m}@{k}": float(fn(items, tgt, k).mean()) for k in KS for m, fn in (("recall", recall_at_k), ("ndcg", ndcg_at_k))}
        table[name] |= {"cold_share": float((items >= cold_from).mean()), "users_per_s": len(tgt) / secs, "users": len(tgt)}
        items, _ = timed_pass(decoder, warm_batches, max(KS))
        table[name] |= {"warm_recall@10": float(recall_at_k(items, warm_tgt, 10).mean()),
                        "warm_ndcg@10": float(ndcg_at_k(items, warm_tgt, 10).mean()),
                        "warm_cold_share": float((items >= cold_from).mean()), "warm_users": len(warm_tgt)}
        print(f"{name}: {table[name]}", file=sys.stderr, flush=True)
    stats = run.ids.collision_stats()
    notes = [
        f"hybrid fusion chosen on warm validation users: **{choice.kind}** (fitted on {args.alpha_users}, chosen on as many "
        f"others; select NDCG@10 per fusion: { {k: round(v['select_ndcg@10'], 4) for k, v in choice.table.items()} })",
        f"cold items added with `semid add-items` (a new version of the run's IDs): {stats.num_items} items, "
        f"{stats.items_colliding} sharing base codes; every decoder ranks warm and cold items together, exact and beam "
        "scoring a cold item against its trained siblings' normaliser (old items keep their scores)",
        f"warm-target columns: {len(warm_tgt)} users whose test target is warm (a seeded sample"
        f"{'' if len(warm_tgt) < args.warm_users else f' of {args.warm_users}'}), ranked over warm + cold items: what "
        "adding the cold items costs the others",
    ]
    return table, notes
