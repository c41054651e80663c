"""`semid fit-codebooks --embeddings E.npy --out DIR`: item embeddings -> semantic IDs.

The fitting is done by :func:`rqvae.fit_codebooks`; this module turns its codes into :class:`semid.SemanticIDs`
and writes the folder through ``semid.codebooks`` (the folder's format: every file atomically, the set at once)::

    DIR/semantic_ids.npz   the semantic IDs (base codes + the extra level that separates collisions)
    DIR/quantizer.pt       the fitted quantizer (weights + config; torch.load(..., weights_only=True))
    DIR/stats.json         per-level codes used and perplexity, collisions, reconstruction error, seconds
    DIR/code_usage.png     items per code at every level, most used first
    DIR/manifest.json      format, version, and the size and sha256 of each file above (written last)

The files are written as a set (``semid.codebooks.write_codebooks_folder``); ``semid train --ids DIR`` checks the
manifest (``semid.codebooks.check_codebooks``).

DIR must be new, empty, or a folder this command wrote before; any other non-empty folder (a run, a dataset) is
refused unless ``--overwrite`` is given. A DIR that is a symbolic link to a folder is written through: the set goes
into the folder it points at (the link stays a link).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rqvae import FitResult, RQKMeansConfig, RQVAEConfig, fit_codebooks, method_name
from semid.codebooks import (
    IDS_FILE,
    MANIFEST_FILE,
    PLOT_FILE,
    QUANTIZER_FILE,
    STATS_FILE,
    check_out,
    write_codebooks_folder,
)
from semid.collaborative import with_collaborative
from semid.data import check_embedding_values, read_npy
from semid.ids import MAX_CODEBOOK, SemanticIDs
from semid.io import atomic_path, file_sha256, write_json
from semid_cli.args import add_progress, nonnegative_int
from semid_cli.console import progress_default

# chosen from experiments/results/codebooks.md: both methods meet the targets with the balanced last level;
# residual k-means fits in a fraction of the time and reconstructs the embeddings better
DEFAULT_METHOD = "rqkmeans"
DEFAULT_BALANCED = True


DESCRIPTION = (
    "Fit L codebooks of K codes on item embeddings (RQ-VAE or residual k-means), give every item "
    f"a unique semantic ID, and write DIR/{IDS_FILE}, DIR/{QUANTIZER_FILE}, DIR/{STATS_FILE} and "
    f"DIR/{PLOT_FILE}."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embeddings", required=True, type=Path, help="float (N, D) .npy file; row i is item i + 1"
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder to write: new, empty, or one fit-codebooks wrote before (its files are replaced)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into --out even when it holds other files (they are left as they are; ours are replaced)",
    )
    p.add_argument(
        "--method", choices=("rqvae", "rqkmeans"), default=DEFAULT_METHOD, help=f"(default {DEFAULT_METHOD})"
    )
    p.add_argument("--levels", type=int, default=3, help="L, code levels before the extra level (default 3)")
    p.add_argument("--codebook-size", type=int, default=256, help="K, codes per level (default 256)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="(default 0)")
    p.add_argument(
        "--balanced",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_BALANCED,
        help="give the fitted items last-level codes that never collide within a prefix; new items encoded later "
        f"take their nearest code (default {'on' if DEFAULT_BALANCED else 'off'})",
    )
    p.add_argument(
        "--extra-level-size",
        type=int,
        default=256,
        help="values of the extra level that separates collisions (default 256)",
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        help=f"rqvae only: training epochs at most (default {RQVAEConfig.max_epochs})",
    )
    p.add_argument(
        "--fit-sample",
        type=int,
        help="rqkmeans only: fit the centres on a seeded sample of this many items (then assign every item); "
        "for catalogues of millions (default: all items)",
    )
    p.add_argument(
        "--minibatch",
        action="store_true",
        help="rqkmeans only: mini-batch k-means instead of Lloyd's (large catalogues)",
    )
    p.add_argument(
        "--collaborative",
        type=Path,
        metavar="RUN",
        help="also fit on what users consume together: the dense item vectors of RUN's best checkpoint (a causal run "
        "with a dense head, trained on the same items) beside the embeddings, each half unit norm; the IDs of the "
        "study's best recipe (items added later get zeros there and their codes from the embeddings alone)",
    )
    p.add_argument(
        "--collaborative-weight", type=float, help="weight of the collaborative half, with --collaborative (default 1)"
    )
    add_progress(p)


def build_config(args: argparse.Namespace) -> RQVAEConfig | RQKMeansConfig:
    common = {
        "levels": args.levels,
        "codebook_size": args.codebook_size,
        "seed": args.seed,
        "balanced": args.balanced,
    }
    if args.method == "rqvae":
        if args.fit_sample is not None or args.minibatch:
            raise ValueError("--fit-sample and --minibatch apply to --method rqkmeans only")
        extra = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
        return RQVAEConfig(**common, **extra)
    if args.max_epochs is not None:
        raise ValueError("--max-epochs applies to --method rqvae only")
    return RQKMeansConfig(**common, fit_sample=args.fit_sample, minibatch=args.minibatch)


def run(args: argparse.Namespace) -> int:
    if args.collaborative_weight is not None and args.collaborative is None:  # (it was accepted, and changed nothing)
        raise ValueError("--collaborative-weight weighs the vectors of --collaborative RUN: give that run too, or drop it")
    config = build_config(args)
    if args.extra_level_size < 1:  # (checked after the fit before)
        raise ValueError(f"--extra-level-size must be a positive int (the values that separate colliding items), got {args.extra_level_size}")
    if args.codebook_size > 0 and args.levels > 0 and args.codebook_size**args.levels * args.extra_level_size >= 2**62:
        raise ValueError(f"--levels {args.levels} of --codebook-size {args.codebook_size} (and --extra-level-size "
                         f"{args.extra_level_size}) make more ID prefixes than an int64 key holds: use fewer levels or smaller codebooks")
    check_out(args.out, overwrite=args.overwrite)  # before the fitting, so a wrong --out fails fast
    embeddings = check_embedding_values(read_npy(args.embeddings), args.embeddings)  # errors name the file
    if embeddings.shape[0] < 2:
        raise ValueError(f"{args.embeddings}: {embeddings.shape[0]} rows (items): codebooks need two items or more")
    if embeddings.shape[0] < args.codebook_size:
        raise ValueError(f"{args.embeddings}: {embeddings.shape[0]} rows (items), fewer than --codebook-size "
                         f"{args.codebook_size}: every code of a level needs an item; pass --codebook-size {embeddings.shape[0]} or less")
    if args.extra_level_size > max(MAX_CODEBOOK, embeddings.shape[0]):  # (refused after the whole fit, by another name)
        raise ValueError(f"--extra-level-size {args.extra_level_size:,} is more than max({MAX_CODEBOOK:,}, the "
                         f"{embeddings.shape[0]:,} items): the model would hold a row for each of its values; it needs "
                         "only the largest group of items that share a code tuple")
    collaborative = None
    if args.collaborative is not None:
        weight = 1.0 if args.collaborative_weight is None else args.collaborative_weight
        embeddings, collaborative = _with_run_vectors(embeddings, args.collaborative, weight)
    result = fit_codebooks(embeddings, config, progress=progress_default(args.progress))
    stats = write_codebooks(
        args.out, result, config, embeddings_path=args.embeddings, extra_level_size=args.extra_level_size,
        collaborative=collaborative,
    )
    print(format_summary(stats, args.out))
    return 0


def _with_run_vectors(embeddings: np.ndarray, run_dir: Path, weight: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The embeddings with RUN's dense item vectors beside them (``semid.collaborative``), and what stats.json records."""
    import torch

    from generator.runs.folder import load_run  # the command line is above generator

    run = load_run(run_dir)
    if run.design != "causal" or not getattr(run.model_config, "dense_dim", 0):
        raise ValueError(f"--collaborative {run_dir}: a {run.design} run without the causal design's dense head; give a "
                         "run of `semid train`'s default design")
    trained, N = run.model.trained_items, run.ids.num_items
    if embeddings.shape[0] != N:  # (another catalogue's rows were glued to the run's vectors, the rest zeros)
        added = f", {N - trained} of them added by `semid add-items`" if N > trained else ""
        raise ValueError(f"--collaborative {run_dir}: the run's catalogue holds {N} items{added}, but --embeddings has "
                         f"{embeddings.shape[0]} rows: give the embeddings of the run's catalogue (items added to the "
                         "dataset since: add them to the run first with `semid add-items`)")
    with torch.no_grad():
        vectors = run.model.item_vectors()[:trained].float().numpy()
    try:  # (the first `trained` rows are the trained items; added items have no vector: zeros)
        combined = with_collaborative(embeddings, vectors, np.asarray(run.ids.item_ids[:trained], dtype=np.int64), weight)
    except ValueError as e:
        raise ValueError(f"--collaborative {run_dir}: {e}") from None
    record = {"run": str(run_dir), "checkpoint": run.checkpoint.name, "width": int(vectors.shape[1]), "weight": weight,
              "items": int(vectors.shape[0])}
    return combined, record


def write_codebooks(
    out: Path,
    result: FitResult,
    config: RQVAEConfig | RQKMeansConfig,
    *,
    embeddings_path: Path,
    extra_level_size: int,
    collaborative: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the four files of a codebooks folder and its manifest, as a set (``semid.codebooks``); returns what went
    into stats.json. ``collaborative``: the run whose item vectors were fitted on beside the embeddings."""
    return write_codebooks_folder(out, lambda folder: _write_files(
        folder, result, config, embeddings_path=embeddings_path, extra_level_size=extra_level_size,
        collaborative=collaborative))


def _write_files(
    out: Path, result: FitResult, config: RQVAEConfig | RQKMeansConfig, *, embeddings_path: Path, extra_level_size: int,
    collaborative: dict[str, Any] | None = None,
) -> dict[str, Any]:
    method = method_name(config)
    L, K = config.levels, config.codebook_size
    ids = SemanticIDs.from_codes(
        result.codes, [K] * L, extra_level_size=extra_level_size
    )  # raises if a group won't fit
    collisions = ids.collision_stats()
    ids.save(
        out / IDS_FILE,
        method=method,
        embeddings=str(embeddings_path),
        embeddings_sha256=file_sha256(embeddings_path),  # `semid train` checks a dataset's file of that name against it
        balanced=config.balanced,
        seed=config.seed,
    )
    result.quantizer.save(out / QUANTIZER_FILE)  # atomic (rqvae writes through a temporary file too)
    stats = {
        "method": method,
        "balanced": config.balanced,
        "embeddings": str(embeddings_path),
        "num_items": int(result.codes.shape[0]),
        "levels": L,
        "codebook_size": K,
        "extra_level_size": extra_level_size,
        "seconds": result.seconds,
        "per_level": [lvl._asdict() for lvl in result.stats.levels],
        "items_colliding": collisions.items_colliding,
        "fraction_colliding": collisions.fraction_colliding,
        "largest_group": collisions.largest_group,
        "extra_level_used": collisions.extra_level_used,
        "reconstruction_mse": result.stats.reconstruction_mse,
        "reconstruction_rel": result.stats.reconstruction_rel,
        "config": config.to_dict(),
        **({"collaborative": collaborative} if collaborative else {}),
    }
    write_json(out / STATS_FILE, stats)
    fig = code_usage_figure(result.codes, K, title=f"{method}{' (balanced)' if config.balanced else ''}")
    with atomic_path(out / PLOT_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version string: same fit, same bytes
    return stats


def code_usage_figure(codes: np.ndarray, codebook_size: int, title: str = "") -> Figure:
    """Items per code at each level, codes sorted from most to least used, against the uniform count N / K.

    Args:
        codes: LongArray (N, L) in [0, K).
    """
    n, levels = codes.shape
    fig = Figure(figsize=(4 * levels, 3), layout="constrained")  # no pyplot: no global backend state
    axes = fig.subplots(1, levels, squeeze=False)[0]
    for level, ax in enumerate(axes):
        counts = np.sort(np.bincount(codes[:, level], minlength=codebook_size))[::-1]
        ax.bar(np.arange(codebook_size), counts, width=1.0, color="tab:blue")
        ax.axhline(n / codebook_size, color="tab:red", linewidth=1, label="uniform")
        ax.set_title(f"level {level}: {(counts > 0).sum()}/{codebook_size} codes used")
        ax.set_xlabel("code rank")
        ax.set_ylabel("items")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return fig


def format_summary(stats: dict[str, Any], out: Path) -> str:
    used = ", ".join(f"{lvl['codes_used']}/{lvl['codebook_size']}" for lvl in stats["per_level"])
    ppl = ", ".join(f"{lvl['perplexity']:.0f}" for lvl in stats["per_level"])
    return "\n".join(
        [
            f"fitted {stats['method']}{' (balanced last level)' if stats['balanced'] else ''} on "
            f"{stats['num_items']} items in {stats['seconds']:.1f} s",
            f"codes used per level   {used}  (perplexity {ppl})",
            f"items colliding        {stats['items_colliding']} ({stats['fraction_colliding']:.2%}) before the extra "
            f"level; largest group {stats['largest_group']}; extra level uses {stats['extra_level_used']} of "
            f"{stats['extra_level_size']} values",
            f"reconstruction error   {stats['reconstruction_rel']:.3f} of the variance (MSE {stats['reconstruction_mse']:.4f})",
            f"wrote                  {out / IDS_FILE}, {QUANTIZER_FILE}, {STATS_FILE}, {PLOT_FILE}, {MANIFEST_FILE}",
        ]
    )
