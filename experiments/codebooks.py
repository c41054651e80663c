"""Codebooks on Beauty: RQ-VAE vs residual k-means, each with nearest-code and balanced last level.

    python -m experiments.codebooks [--data ../shared/data/beauty] [--levels 3] [--codebook-size 256] [--seed 0]

Fits every variant with the library defaults (those of ``semid fit-codebooks``) on ``item_emb_minilm.npy``
(12,101 x 384) and prints, for each: wall-clock and CPU seconds to fit, codes used per level, the share of items
whose L-code tuple collides before the extra level, the largest collision group (= values the extra level needs),
and the reconstruction error (sum of squared errors / total variance). A uniform random assignment is the
reference for collisions. The machine's load average is printed with each fit: the CPU is shared, and wall-clock
seconds grow with the load of other processes, CPU seconds much less.

Writes the printed table and the command to ``experiments/results/codebooks.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rqvae import RQKMeansConfig, RQVAEConfig, code_stats, fit_codebooks, method_name
from semid.io import atomic_open, write_json

RESULTS = Path(__file__).parent / "results"
TARGETS = {"seconds": 120.0, "fraction_colliding": 0.01, "largest_group": 5}


def uniform_random_row(n: int, levels: int, k: int, seed: int) -> dict:
    """Collisions of codes drawn uniformly at random (the reference the issue quotes)."""
    codes = np.random.default_rng(seed).integers(0, k, (n, levels))
    s = code_stats(codes, k)
    return {
        "variant": "uniform random codes",
        "fraction_colliding": s.fraction_colliding,
        "largest_group": s.largest_group,
    }


def run_variant(x: np.ndarray, config: RQVAEConfig | RQKMeansConfig) -> dict:
    load = os.getloadavg()[0]
    cpu0 = time.process_time()
    result = fit_codebooks(x, config, progress=False)
    cpu = time.process_time() - cpu0
    s = result.stats
    return {
        "variant": f"{method_name(config)}{' + balanced' if config.balanced else ''}",
        "method": method_name(config),
        "balanced": config.balanced,
        "seconds": result.seconds,
        "cpu_seconds": cpu,
        "load_before": load,
        "codes_used": [lvl.codes_used for lvl in s.levels],
        "perplexity": [lvl.perplexity for lvl in s.levels],
        "items_colliding": s.items_colliding,
        "fraction_colliding": s.fraction_colliding,
        "largest_group": s.largest_group,
        "reconstruction_rel": s.reconstruction_rel,
        "reconstruction_mse": s.reconstruction_mse,
        "config": config.to_dict(),
    }


def table(rows: list[dict], k: int) -> list[str]:
    head = "| variant | fit s (wall) | CPU s | load | codes used per level | perplexity per level | colliding | largest group | recon error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "method" not in r:
            lines.append(
                f"| {r['variant']} | | | | | | {r['fraction_colliding']:.2%} | {r['largest_group']} | |"
            )
            continue
        used = ", ".join(f"{u}/{k}" for u in r["codes_used"])
        ppl = ", ".join(f"{p:.0f}" for p in r["perplexity"])
        lines.append(
            f"| {r['variant']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['load_before']:.1f} | {used} | {ppl} | "
            f"{r['fraction_colliding']:.2%} ({r['items_colliding']}) | {r['largest_group']} | {r['reconstruction_rel']:.3f} |"
        )
    return lines


def verdicts(rows: list[dict], k: int) -> list[str]:
    out = []
    for r in rows:
        if "method" not in r:
            continue
        checks = {
            f"fit <= {TARGETS['seconds']:.0f} s": r["seconds"] <= TARGETS["seconds"],
            "100% codes used": all(u == k for u in r["codes_used"]),
            f"colliding <= {TARGETS['fraction_colliding']:.0%}": r["fraction_colliding"]
            <= TARGETS["fraction_colliding"],
            f"extra level <= {TARGETS['largest_group']} values": r["largest_group"]
            <= TARGETS["largest_group"],
        }
        out.append(
            f"{r['variant']}: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in checks.items())
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.codebooks", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", type=Path, default=Path("../shared/data/beauty"), help="folder with item_emb_minilm.npy"
    )
    p.add_argument("--embeddings", default="item_emb_minilm.npy", help="file name inside --data")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="rqkmeans,rqvae", help="comma-separated: rqkmeans, rqvae")
    p.add_argument(
        "--num-threads",
        type=int,
        help="CPU threads while fitting (default: the library's, 1; results then go to codebooks_threads<N>.{md,json})",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where codebooks.md / codebooks.json go")
    args = p.parse_args(argv)
    stem = "codebooks" if args.num_threads is None else f"codebooks_threads{args.num_threads}"
    command = "python -m experiments.codebooks " + shlex.join(sys.argv[1:] if argv is None else argv)
    x = np.load(args.data / args.embeddings, allow_pickle=False)
    n, k, levels = x.shape[0], args.codebook_size, args.levels
    threads = args.num_threads or RQVAEConfig.num_threads
    env = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, fits with {threads} thread(s)"
    print(f"# Codebooks on {args.data / args.embeddings}: {n} x {x.shape[1]}, {levels} levels x {k} codes\n")
    print(f"command: `{command}`  \nmachine: {env}\n", flush=True)
    rows = [uniform_random_row(n, levels, k, args.seed)]
    common = {"levels": levels, "codebook_size": k, "seed": args.seed}
    if args.num_threads is not None:
        common["num_threads"] = args.num_threads
    makers = {"rqkmeans": RQKMeansConfig, "rqvae": RQVAEConfig}
    for method in args.methods.split(","):
        for balanced in (False, True):
            row = run_variant(x, makers[method.strip()](**common, balanced=balanced))
            rows.append(row)
            print(table([row], k)[-1], flush=True)
    lines = [
        f"# Codebooks on `{args.data / args.embeddings}` ({n} x {x.shape[1]}), {levels} levels x {k} codes",
        "",
        f"command: `{command}`  ",
        f"machine: {env}; `load` = 1-minute load average when the fit started (2 cores: above 2, other processes compete)",
        "",
        *table(rows, k),
        "",
        "colliding: items sharing their full L-code tuple with another item, before the extra level; largest group: the",
        "most items sharing one tuple (values the extra level needs); recon error: sum ||x - x_hat||^2 / sum ||x - mean||^2.",
        "",
        "Targets:",
        *[f"- {v}" for v in verdicts(rows, k)],
    ]
    print("\n" + "\n".join(lines[5:]))
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out / f"{stem}.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    write_json(
        args.out / f"{stem}.json",
        {
            "command": command,
            "machine": env,
            "num_items": n,
            "dim": int(x.shape[1]),
            "rows": json.loads(json.dumps(rows)),
        },
    )
    print(f"\nwrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
