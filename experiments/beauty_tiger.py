"""Full Amazon Beauty run of the TIGER generator: semantic IDs -> train (``tiger`` preset) -> test metrics, all users.

    python -m experiments.beauty_tiger --measure-steps 20            # seconds per step and an epoch estimate only
    python -m experiments.beauty_tiger --max-time 00:03:00 --eval-users 300 --tag smoke    # does it all work?
    python -m experiments.beauty_tiger --max-time 06:00:00           # the benchmark

Writes ``experiments/results/beauty_tiger[_TAG].{md,json}``: the metrics table next to the published numbers of
../shared/data/README.md, the training budget (wall time, epochs, steps, seconds per step), the machine, and the
exact command. The run folder goes to ``experiments/runs/`` (git-ignored).

Semantic IDs: ``--ids`` if given; else ``semid fit-codebooks`` on ``item_emb_minilm.npy`` where that command
exists; else a stopgap residual k-means (3 x 256 codes, scikit-learn) fitted here, recorded as such in the results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from generator.runs.evaluate import evaluate_run
from generator.runs.folder import read_config
from generator.runs.options import TrainOptions
from generator.runs.train import train_run
from semid.ids import SemanticIDs
from semid.io import atomic_open, write_json

log = logging.getLogger("experiments.beauty_tiger")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "experiments" / "runs"
PUBLISHED = [  # Recall@5, NDCG@5, Recall@10, NDCG@10 on this split (../shared/data/README.md)
    ("SASRec (TIGER paper)", 0.0387, 0.0249, 0.0605, 0.0318),
    ("TIGER (Rajput et al. 2023)", 0.0454, 0.0321, 0.0648, 0.0384),
    ("SASRec, 12 CPU-minutes on this machine", 0.0466, 0.0294, 0.0700, 0.0369),
]
TARGET = {"recall@10": 0.070, "ndcg@10": 0.040}


# ---- semantic IDs ------------------------------------------------------------------------------------------------
def stopgap_residual_kmeans(emb: np.ndarray, levels: int = 3, k: int = 256, seed: int = 0) -> tuple[SemanticIDs, dict]:
    """Residual k-means codes (a stand-in until `semid fit-codebooks` is available); extra level sized to fit."""
    from sklearn.cluster import KMeans

    residual = emb.astype(np.float64)
    codes = np.zeros((emb.shape[0], levels), dtype=np.int64)
    for level in range(levels):
        km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed + level).fit(residual)
        codes[:, level] = km.labels_
        residual = residual - km.cluster_centers_[km.labels_]
    _, counts = np.unique(codes, axis=0, return_counts=True)
    ids = SemanticIDs.from_codes(codes, [k] * levels, extra_level_size=int(counts.max()))
    return ids, {"method": f"stopgap residual k-means ({levels} x {k}, scikit-learn, in this script)", **ids.collision_stats()._asdict()}


def semantic_ids(args: argparse.Namespace) -> tuple[Path, dict]:
    """The IDs file to train with, and how it was made."""
    if args.ids is not None:
        path = args.ids / "semantic_ids.npz" if args.ids.is_dir() else args.ids
        return path, {"method": f"given: {path}"}
    have_fit = importlib.util.find_spec("semid_cli.codebooks") is not None
    out = RUNS / ("beauty_ids" if have_fit else "beauty_ids_stopgap")
    path = out / "semantic_ids.npz"
    info_file = out / "how.json"
    if path.is_file() and info_file.is_file():
        return path, json.loads(info_file.read_text())
    emb = args.data / "item_emb_minilm.npy"
    if have_fit:
        cli = "import sys; from semid_cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", cli, "fit-codebooks", "--embeddings", str(emb), "--out", str(out)]
        log.info("fitting codebooks: semid %s", shlex.join(cmd[3:]))
        subprocess.run(cmd, check=True)
        info = {"method": f"semid fit-codebooks --embeddings {emb} --out {out} (defaults)"}
    else:
        log.warning("`semid fit-codebooks` is not available yet: fitting a stopgap residual k-means here")
        ids, info = stopgap_residual_kmeans(np.load(emb))
        ids.save(path)
    write_json(info_file, info)
    return path, info


# ---- step time ---------------------------------------------------------------------------------------------------
def measure_steps(args: argparse.Namespace, ids_path: Path, options: TrainOptions, steps: int) -> dict:
    """Seconds per training step of the real pipeline (bucketed batches, the preset, AdamW), no Lightning loop."""
    from generator.models.checkpoint import ids_digest
    from generator.t5.datamodule import GeneratorDataModule
    from generator.t5.model import preset
    from generator.t5.system import GeneratorSystem
    from semid.data import load_dataset
    from semid.split import leave_one_out
    from semid.tree import PrefixTree

    ids = SemanticIDs.load(ids_path)
    layout = ids.layout(options.user_tokens)
    split = leave_one_out(load_dataset(args.data))
    dm = GeneratorDataModule(split, ids, layout, batch_size=options.batch_size, max_history=options.max_history, val_users=200)
    dm.setup("fit")
    torch.manual_seed(0)
    system = GeneratorSystem(preset(options.preset), layout, ids_digest(ids), PrefixTree.from_semantic_ids(ids, layout), optim=options.optim())
    opt = system.configure_optimizers()["optimizer"]
    system.train()
    loader = iter(dm.train_dataloader())
    times, cpu_times, tokens = [], [], []
    for _ in range(steps + 2):
        batch = next(loader)
        tokens.append(batch.input_ids.numel())
        t, c = time.perf_counter(), time.process_time()
        loss = _loss(system, batch)  # training_step without its self.log, which needs a Trainer
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    per_step = float(np.mean(times[2:]))  # mean, not median: long batches cost more and count in an epoch
    cpu_per_step = float(np.mean(cpu_times[2:]))
    # the least-contended step's time per encoder token, times the epoch's mean tokens per step: an estimate of
    # the step time with the CPU to ourselves (the mean above includes whatever else the machine was doing)
    mean_tokens = float(np.mean(dm.train_examples.input_lengths)) * options.batch_size / (1 - dm.padding_stats().padded_share)
    best_per_step = float(min(t / n for t, n in zip(times[2:], tokens[2:], strict=True))) * mean_tokens
    steps_per_epoch = len(dm.train_sampler())
    return {
        "seconds_per_step": round(per_step, 3),
        "steps_per_epoch": steps_per_epoch,
        "minutes_per_epoch": round(per_step * steps_per_epoch / 60, 1),
        # CPU seconds (all threads): with the cores to itself, wall time is about this / threads
        "cpu_seconds_per_step": round(cpu_per_step, 3),
        "seconds_per_step_uncontended": round(best_per_step, 3),
        "minutes_per_epoch_uncontended": round(best_per_step * steps_per_epoch / 60, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "train_examples": len(dm.train_examples),
        "padded_share": round(dm.padding_stats().padded_share, 4),
        "steps_timed": steps,
        "torch_threads": torch.get_num_threads(),
    }


def _loss(system, batch) -> torch.Tensor:
    from generator.t5.model import seq2seq_loss

    return seq2seq_loss(system.model, batch.input_ids, batch.attention_mask, batch.labels, label_smoothing=system.optim.label_smoothing)


# ---- report ------------------------------------------------------------------------------------------------------
def write_report(name: str, record: dict) -> Path:
    m, t = record["test"], record["training"]
    rows = [("semid TIGER (this run)", m["recall@5"], m["ndcg@5"], m["recall@10"], m["ndcg@10"]), *PUBLISHED]
    lines = [
        f"# Amazon Beauty, TIGER generator ({record['options']['preset']} preset), test split",
        "",
        f"Command: `{record['command']}`",
        "",
        "| model | Recall@5 | NDCG@5 | Recall@10 | NDCG@10 |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} |" for r in rows),
        "",
        f"- users evaluated: {m['users_evaluated']} (test), invalid items returned: {m['invalid_items']}, "
        f"duplicates: {m['duplicate_items']}; decoding {m['seconds']:.0f} s with {m['num_beams']} beams ({m['decoder']})",
        f"- training budget: {t['train_seconds'] / 60:.1f} min wall clock (limit {record['options']['max_time']}), "
        f"{t['epochs']} epochs, {t['steps']} steps of {record['options']['batch_size']} examples"
        + (f", {t['train_seconds'] / max(t['steps'], 1):.2f} s/step overall" if t["steps"] else ""),
        f"- best checkpoint chosen on val/ndcg@10 over {record['options']['val_users']} validation users: "
        f"{t['best_score']}; all validation users: R@10 {record['valid'].get('recall@10', float('nan')):.4f}, "
        f"N@10 {record['valid'].get('ndcg@10', float('nan')):.4f}",
        f"- target R@10 >= {TARGET['recall@10']}, N@10 >= {TARGET['ndcg@10']}: "
        + ("met" if m["recall@10"] >= TARGET["recall@10"] and m["ndcg@10"] >= TARGET["ndcg@10"] else "not met"),
        f"- semantic IDs: {record['ids']['method']}",
        f"- machine: {record['machine']}",
        f"- options: `{json.dumps(record['options'])}`",
        "",
    ]
    path = RESULTS / f"{name}.md"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    write_json(RESULTS / f"{name}.json", record)
    return path


def main(argv: list[str] | None = None) -> int:
    d = TrainOptions(preset="tiger")  # (TrainOptions() is the causal design now: its defaults were taken as TIGER's)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "../shared/data/beauty")
    p.add_argument("--ids", type=Path, help="semantic IDs (folder or file); default: fit them (see above)")
    p.add_argument("--out", type=Path, help="run folder (default experiments/runs/beauty_tiger[_TAG])")
    p.add_argument("--tag", default="", help="suffix of the run folder and result files")
    p.add_argument("--resume", action="store_true", help="continue the run folder (--max-time is the new total)")
    p.add_argument("--measure-steps", type=int, default=0, help="only time this many training steps and estimate an epoch")
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--max-time", default="06:00:00", help="training wall-clock limit HH:MM:SS")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--user-tokens", type=int, default=d.user_tokens)
    p.add_argument("--val-users", type=int, default=d.val_users, help="validation users sampled during training")
    p.add_argument("--val-every", type=float, default=1.0, help="epochs between validations (fractions allowed)")
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--final-val-users", type=int, default=None, help="validation users for the final check (default all)")
    p.add_argument("--eval-users", type=int, default=None, help="test users (default all)")
    p.add_argument("--num-beams", type=int, default=d.num_beams)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = "beauty_tiger" + (f"_{args.tag}" if args.tag else "")
    every = int(args.val_every) if args.val_every >= 1 and float(args.val_every).is_integer() else args.val_every
    options = TrainOptions(
        preset=args.preset, max_epochs=args.max_epochs, max_time=args.max_time, seed=args.seed, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=args.warmup_steps, label_smoothing=args.label_smoothing, weight_decay=args.weight_decay,
        user_tokens=args.user_tokens, val_users=args.val_users, val_every=every, patience=args.patience,
        final_val_users=args.final_val_users, num_beams=args.num_beams, progress=sys.stderr.isatty(),
    )
    command = shlex.join(["python", "-m", "experiments.beauty_tiger", *(sys.argv[1:] if argv is None else argv)])
    ids_path, ids_info = semantic_ids(args)
    if args.measure_steps:
        est = {"command": command, "preset": args.preset, "batch_size": args.batch_size,
               **measure_steps(args, ids_path, options, args.measure_steps)}
        write_json(RESULTS / f"{name}_steptime.json", est)
        print(json.dumps(est, indent=2))
        return 0
    out = args.out or RUNS / name
    start = time.perf_counter()
    result = train_run(args.data, ids_path, out, options, resume=args.resume)
    test = evaluate_run(out, "test", num_beams=args.num_beams, max_users=args.eval_users, seed=args.seed, progress=options.progress)
    config = read_config(out)
    record = {
        "command": command,
        "test": test,
        "valid": result.metrics_valid or {},
        "training": {
            "train_seconds": config.get("train_seconds"), "epochs": result.epochs, "steps": result.steps,
            "best_score": result.best_score, "padded_share": round(result.padded_share, 4),
        },
        "total_seconds": round(time.perf_counter() - start, 1),
        "ids": ids_info,
        "options": asdict(options),
        "run_dir": str(out),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
    }
    path = write_report(name, record)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
