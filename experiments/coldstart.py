"""Cold start on Beauty: hold out the newest items, train without them, add them after training, recommend them.

    python -m experiments.coldstart --work runs/coldstart [--fraction 0.05] [--max-users N] [semid train flags ...]

1. ``semid.coldstart.cold_start_split``: the newest ``--fraction`` of items (proxy: mean relative position in
   users' sequences, see that module) are held out; warm items are renumbered 1..N_w, cold ones N_w+1..N.
   ``WORK/warm`` is the warm world as a dataset folder: cold items and all their interactions removed.
2. ``semid fit-codebooks`` on the warm items' embeddings only -> ``WORK/ids`` (the quantizer never sees cold items).
3. ``semid train --dense both --objective joint`` on ``WORK/warm`` -> ``WORK/run``; extra flags go to ``semid train``
   (e.g. ``--preset cpu --max-time 01:00:00 --dense-option id_dropout=0.25``; they override the defaults above).
   Steps 1-3 are skipped when their folder exists.
4. Cold items join without retraining (``add_cold_items``): codes from the fitted quantizer's ``encode``, the
   SemanticIDs (``add_items``) and a rebuilt prefix tree, content-only dense vectors. The hybrid's alpha is chosen on
   warm validation users. Test users are those whose last item (the test target) is cold; their histories keep
   the cold items they contain. Recall/NDCG@K per decoder, the share of cold items among the top 10, users/second;
   plus beam search over the *warm* tree, which cannot return a cold item (the 0 that unconstrained or un-updated
   generation gets); and ``beam + cold prefix``: the beam's candidates plus the cold items whose semantic-ID
   prefix (all base codes but the last) matches one of theirs, at most ceil(``--cold-epsilon`` * k) of the top-k
   (TIGER's cold-start retrieval, ``generator.decoding.cold.ColdStartBeam``).

Writes the table and the command to ``experiments/results/coldstart[_TAG].{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from experiments.dense_hybrid import budget, score
from generator.decoding import registry
from generator.decoding.protocol import Histories
from generator.decoding.registry import Ingredients
from generator.runs.batches import Labelled
from generator.runs.cold_items import add_cold_items
from generator.runs.decoders import choose_run_fusion, stored_fusion
from generator.runs.folder import HYBRID_FILE, load_run
from generator.runs.recommender import on_device
from generator.t5.data import collate, eval_batches, history_examples
from generator.t5.decoders import T5
from generator.t5.design import dense_head as load_run_head
from generator.training.sampling import sample_users
from rqvae import load_quantizer
from semid.coldstart import cold_start_split, write_warm_dataset
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.split import leave_one_out
from semid_cli import main as semid

RESULTS = Path(__file__).parent / "results"


def prepare(args: argparse.Namespace, train_flags: list[str]) -> tuple[Any, Any]:
    """Steps 1-3 (each skipped when its folder exists); returns the full dataset and the cold-start split."""
    dataset = load_dataset(args.data)
    split = cold_start_split(dataset, args.fraction)
    warm, ids, run = args.work / "warm", args.work / "ids", args.work / "run"
    if not (warm / "items.jsonl").is_file():
        write_warm_dataset(dataset, split, warm)
    if not (ids / "semantic_ids.npz").is_file():
        emb = warm / f"item_emb_{args.embeddings}.npy"
        argv = ["fit-codebooks", "--embeddings", str(emb), "--out", str(ids), "--method", args.method, "--no-progress"]
        if (code := semid(argv)) != 0:
            raise RuntimeError(f"`semid {' '.join(argv)}` failed with exit status {code}")
    if not (run / "config.yaml").is_file():
        flags = ["--dense", "both", "--objective", "joint", "--dense-embeddings", args.embeddings, *train_flags]
        argv = ["train", "--data", str(warm), "--ids", str(ids), "--out", str(run), *flags]
        if (code := semid(argv)) != 0:
            raise RuntimeError(f"`semid {' '.join(argv)}` failed with exit status {code}")
    return dataset, split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--data", type=Path, default=Path("../shared/data/beauty"))
    p.add_argument("--work", type=Path, required=True, help="folder for the warm dataset, codebooks and run")
    p.add_argument("--fraction", type=float, default=0.05, help="share of items held out as cold (default 0.05)")
    p.add_argument("--embeddings", default="minilm", help="item_emb_<NAME>.npy for codebooks and content vectors")
    p.add_argument("--method", default="rqkmeans", choices=("rqkmeans", "rqvae"), help="codebook method (default rqkmeans)")
    p.add_argument("--max-users", type=int, help="a seeded sample of the cold test users (default: all)")
    p.add_argument("--alpha-users", type=int, default=2000, help="warm validation users for choosing alpha")
    # named apart from `semid train`'s --num-beams / --batch-size / --seed, which pass through to training
    p.add_argument("--decode-beams", dest="num_beams", type=int, default=20, help="beams of the beam decoder (default 20)")
    p.add_argument("--num-candidates", type=int, default=50, help="beam candidates the hybrid re-ranks (default 50)")
    p.add_argument("--decode-batch-size", dest="batch_size", type=int, default=64, help="users decoded together")
    p.add_argument("--sample-seed", dest="seed", type=int, default=0, help="seed of the user samples")
    p.add_argument("--cold-epsilon", type=float, default=0.1, help="largest share of the top-k that prefix-matched cold "
                   "items may take in the 'beam + cold prefix' row (TIGER's epsilon; default 0.1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=1, help="torch threads while decoding (default 1)")
    p.add_argument("--warm-users", type=int, default=5000, help="causal runs: a seeded sample of the users whose test "
                   "target is warm, scored after the cold items joined (what adding them costs; default 5000)")
    args, train_flags = p.parse_known_args(argv)
    dataset, split = prepare(args, train_flags)
    if yaml.safe_load((args.work / "run" / "config.yaml").read_text()).get("design") == "causal":
        from experiments import coldstart_causal

        table, notes = coldstart_causal.evaluate(args, dataset, split)
        write(args, argv, dataset, split, table, notes, {})
        return

    # 4a. the trained warm run and the blend weight, chosen on warm validation users
    run = on_device(load_run(args.work / "run"), args.device)
    warm_split = leave_one_out(load_dataset(args.work / "warm"))
    if stored_fusion(run, args.num_candidates, required=False) is None:  # chosen once, then read from RUN/hybrid.json
        choose_run_fusion(run, warm_split, num_candidates=args.num_candidates, num_beams=args.num_beams,
                          users=args.alpha_users, batch_size=args.batch_size, seed=args.seed)
    fusion = stored_fusion(run, args.num_candidates)  # (kind, params): the T5 hybrid's blend weight, as chosen
    alpha_info = json.loads((args.work / "run" / HYBRID_FILE).read_text())

    # 4b. cold items join: quantizer codes -> SemanticIDs + tree, content -> dense vectors
    new_ids = split.new_cold_ids
    content = dataset.embeddings(args.embeddings)[split.relabel.new_to_old[new_ids] - 1]
    quantizer = load_quantizer(args.work / "ids" / "quantizer.pt")
    head = load_run_head(run)
    cat = add_cold_items(run.ids, run.layout, content, new_ids, encode=quantizer.encode, head=head)
    stats = cat.ids.collision_stats()

    # 4c. cold test users: their histories (new ids, cold items included) -> examples -> batches
    rows = sample_users(len(split.test_targets), args.max_users, args.seed)
    warm_user = {int(u): i + 1 for i, u in enumerate(split.user_ids)}  # write_dataset numbered warm users 1..U'
    users = np.array([warm_user.get(int(u), len(warm_user) + 1 + i) for i, u in enumerate(split.test_user_ids[rows])])
    examples = history_examples(
        [split.test_histories[i] for i in rows], split.test_targets[rows], users if run.use_user_tokens else None,
        cat.ids, run.layout, max_history=run.max_history,
    )
    batches = []
    for index in eval_batches(examples.input_lengths, args.batch_size):  # loop over batches of users
        b = collate(examples, index, run.layout.pad_token_id)
        batches.append(Labelled(Histories(b.input_ids, b.attention_mask.bool()), b.target))

    # 4d. the decoders of the extended run (IDs, tree and head with the cold items), through the registry
    ing = Ingredients(
        T5, run.model, cat.tree.to(args.device), run.layout, cat.ids, num_beams=args.num_beams,
        num_candidates=args.num_candidates, dense_head=head, fusion=fusion, cold_items=new_ids,
        cold_options={"epsilon": args.cold_epsilon},
    )
    built = registry.build_many(ing, ["beam", "dense", "hybrid", "cold-beam"])
    decoders = {
        "beam, warm tree (no cold items)": registry.build(dataclasses.replace(ing, tree=run.tree.to(args.device)), "beam"),
        "beam": built["beam"],
        "dense": built["dense"],
        "hybrid": built["hybrid"],
        # TIGER's cold-start retrieval: cold items sharing a beam candidate's prefix, at most ceil(eps * k) of the top-k
        f"beam + cold prefix (ε={args.cold_epsilon:g})": built["cold-beam"],
    }
    table: dict[str, Any] = {}
    cold_lo = split.num_warm + 1
    for name, decoder in decoders.items():
        m = score(decoder, batches, cat.ids, device=args.device, cold_from=cold_lo)
        table[name] = m
        print(f"{name}: {m}", file=sys.stderr, flush=True)

    notes = [f"hybrid fusion {fusion} (chosen on {alpha_info['validation_users']} warm validation users by {alpha_info['metric']})",
             f"semantic IDs after adding: {stats.num_items} items, {stats.items_colliding} sharing base codes, extra level "
             f"uses {stats.extra_level_used} values"]
    write(args, argv, dataset, split, table, notes, alpha_info)


def write(args: argparse.Namespace, argv: list[str] | None, dataset: Any, split: Any, table: dict[str, Any],
          notes: list[str], alpha_info: dict[str, Any]) -> None:
    """Print the table and write it to experiments/results/coldstart[_TAG].{md,json}."""
    lines: list[str] = []
    say = lines.append
    n = table["beam"]["users"]
    say(f"# Cold start: newest {args.fraction:.0%} of Beauty items held out, added after training")
    say("")
    say(f"{split.cold_items.size} cold items of {dataset.num_items}; {len(split.test_targets)} users have a cold test target, "
        f"{n} evaluated" + (" (sample)" if args.max_users else " (all)") + "; ranked over all items (warm + cold)")
    say("")
    warm = "warm_recall@10" in table["beam"]  # the causal benchmark also scores users whose target is warm
    extra = " warm-target R@10 | warm-target N@10 | warm-target cold share |" if warm else ""
    say("| decoder | R@5 | N@5 | R@10 | N@10 | cold share of top 10 | users/s |" + extra)
    say("| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if warm else ""))
    for name, m in table.items():
        cells = (f" {m['warm_recall@10']:.4f} | {m['warm_ndcg@10']:.4f} | {m['warm_cold_share']:.3f} |" if warm else "")
        say(f"| {name} | {m['recall@5']:.4f} | {m['ndcg@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
            f"{m['cold_share']:.3f} | {m['users_per_s']:.1f} |" + cells)
    say("")
    for note in notes:
        say(note)
    say("'newest' proxy: mean relative position in users' sequences")
    say(f"training: {budget(args.work / 'run')}")
    say("")
    say(f"command: `python -m experiments.coldstart {shlex.join(sys.argv[1:] if argv is None else argv)}`")
    print("\n".join(lines))
    stem = "coldstart" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_open(RESULTS / f"{stem}.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    write_json(RESULTS / f"{stem}.json", {"rows": table, "alpha": alpha_info, "cold_items": int(split.cold_items.size),
                                          "cold_test_users": int(len(split.test_targets)), "argv": sys.argv[1:] if argv is None else argv})


if __name__ == "__main__":
    main()
