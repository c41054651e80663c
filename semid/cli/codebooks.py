"""`semid fit-codebooks --embeddings E.npy --out DIR`: item embeddings -> semantic IDs.

The fitting is done by :func:`rqvae.fit_codebooks`; this module turns its codes into :class:`semid.SemanticIDs`
and writes the folder (every file atomically)::

    DIR/semantic_ids.npz   the semantic IDs (base codes + the extra level that separates collisions)
    DIR/quantizer.pt       the fitted quantizer (weights + config; torch.load(..., weights_only=True))
    DIR/stats.json         per-level codes used and perplexity, collisions, reconstruction error, seconds
    DIR/code_usage.png     items per code at every level, most used first
    DIR/manifest.json      format, version, and the size and sha256 of each file above (written last)

The files are written as a set: into a temporary folder beside DIR, which then takes DIR's place in one atomic
exchange (``renameat2(RENAME_EXCHANGE)``; two renames where the system lacks it), so a ``kill -9`` at any point
leaves the old set or the new one, never a mixture. With ``--overwrite`` into a folder holding other files, the
files are moved in one by one after the manifest is marked incomplete, and the complete manifest comes last.
:func:`check_codebooks` (run by ``semid train --ids DIR``) checks the manifest: a changed, missing or half-written
file is an error naming it.

DIR must be new, empty, or a folder this command wrote before; any other non-empty folder (a run, a dataset) is
refused unless ``--overwrite`` is given. A DIR that is a symbolic link to a folder is written through: the set goes
into the folder it points at (the link stays a link).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rqvae import FitResult, RQKMeansConfig, RQVAEConfig, fit_codebooks, method_name
from semid.data import read_npy
from semid.ids import SemanticIDs
from semid.io import atomic_path, make_temp_dir, write_json

IDS_FILE = "semantic_ids.npz"
QUANTIZER_FILE = "quantizer.pt"
STATS_FILE = "stats.json"
PLOT_FILE = "code_usage.png"
MANIFEST_FILE = "manifest.json"
CODEBOOK_FILES = (IDS_FILE, QUANTIZER_FILE, STATS_FILE, PLOT_FILE)
MANIFEST_FORMAT, MANIFEST_VERSION = "semid.codebooks", 1

# chosen from experiments/results/codebooks.md: both methods meet the targets with the balanced last level;
# residual k-means fits in a fraction of the time and reconstructs the embeddings better
DEFAULT_METHOD = "rqkmeans"
DEFAULT_BALANCED = True


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit-codebooks",
        help="fit codebooks on item embeddings and write semantic IDs",
        description="Fit L codebooks of K codes on item embeddings (RQ-VAE or residual k-means), give every item "
        f"a unique semantic ID, and write DIR/{IDS_FILE}, DIR/{QUANTIZER_FILE}, DIR/{STATS_FILE} and "
        f"DIR/{PLOT_FILE}.",
    )
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
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
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
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar"
    )
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> RQVAEConfig | RQKMeansConfig:
    common = {
        "levels": args.levels,
        "codebook_size": args.codebook_size,
        "seed": args.seed,
        "balanced": args.balanced,
    }
    if args.method == "rqvae":
        extra = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
        return RQVAEConfig(**common, **extra)
    if args.max_epochs is not None:
        raise ValueError("--max-epochs applies to --method rqvae only")
    return RQKMeansConfig(**common)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    check_out(args.out, overwrite=args.overwrite)  # before the fitting, so a wrong --out fails fast
    embeddings = read_npy(args.embeddings)
    result = fit_codebooks(embeddings, config, progress=args.progress)
    stats = write_codebooks(
        args.out, result, config, embeddings_path=args.embeddings, extra_level_size=args.extra_level_size
    )
    print(format_summary(stats, args.out))
    return 0


def write_codebooks(
    out: Path,
    result: FitResult,
    config: RQVAEConfig | RQKMeansConfig,
    *,
    embeddings_path: Path,
    extra_level_size: int,
) -> dict[str, Any]:
    """Write the four files of a codebooks folder and its manifest, as a set (see the module docstring); returns
    what went into stats.json."""
    given = Path(out)
    out = real_out(given)  # a link to a folder: the set is exchanged with that folder, the link stays
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    if given != out:
        _remove_abandoned(given)  # left by semids that replaced the link
    tmp = make_temp_dir(out.parent, f".{out.name}.writing-{os.getpid()}-")
    try:
        stats = _write_files(tmp, result, config, embeddings_path=embeddings_path, extra_level_size=extra_level_size)
        write_json(tmp / MANIFEST_FILE, _manifest(tmp))
        _publish(tmp, out)
    finally:
        _remove(tmp)
    return stats


def real_out(out: Path) -> Path:
    """``out``, or the folder it points at when it is a symbolic link (FileExistsError for a link to anything else)."""
    if not out.is_symlink():
        return out
    target = Path(os.path.realpath(out))
    if not target.is_dir():
        raise FileExistsError(f"{out}: a symbolic link to {target}, which is not a folder; give a folder to --out")
    return target


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove a temporary folder of ours; a symbolic link at its name (left by an older semid) goes as a link."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def _write_files(
    out: Path, result: FitResult, config: RQVAEConfig | RQKMeansConfig, *, embeddings_path: Path, extra_level_size: int
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
    }
    write_json(out / STATS_FILE, stats)
    fig = code_usage_figure(result.codes, K, title=f"{method}{' (balanced)' if config.balanced else ''}")
    with atomic_path(out / PLOT_FILE) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version string: same fit, same bytes
    return stats


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path, complete: bool = True) -> dict[str, Any]:
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in CODEBOOK_FILES} if complete else {}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": complete, "files": files}


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def _publish(tmp: Path, out: Path) -> None:
    """Put the complete set in ``tmp`` at ``out``."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if all(_ours(p) for p in out.iterdir()):  # a codebooks folder (or an empty one): replace it whole
        if _exchange(tmp, out):
            return  # `tmp` now holds the old set; the caller removes it
        old = make_temp_dir(out.parent, f".{out.name}.old-{os.getpid()}-")
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old)
        return
    # --overwrite into a folder with other files: they stay; ours move in under an incomplete manifest
    write_json(out / MANIFEST_FILE, _manifest(out, complete=False))
    for name in CODEBOOK_FILES:
        os.replace(tmp / name, out / name)
    os.replace(tmp / MANIFEST_FILE, out / MANIFEST_FILE)


def _remove_abandoned(out: Path) -> None:
    """Remove temporary folders of earlier writes to ``out`` whose process no longer runs (a ``kill -9``)."""
    for prefix in (f".{out.name}.writing-", f".{out.name}.old-"):
        for path in out.parent.glob(prefix + "*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_codebooks(folder: Path) -> None:
    """Raise ValueError naming the file unless ``folder``'s files match its manifest (a folder written before
    semid kept one has none, and is taken as it is)."""
    manifest_path = Path(folder) / MANIFEST_FILE
    if not manifest_path.is_file():
        return
    redo = f"re-run `semid fit-codebooks --out {folder}`"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path}: not a readable manifest ({e}); {redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path}: not a codebooks manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); {redo}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path}: manifest version {manifest.get('version')!r}; this semid reads version {MANIFEST_VERSION}")
    if manifest.get("complete") is not True or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{folder}: a fit-codebooks write into this folder was interrupted (its manifest is incomplete); {redo}")
    files = manifest["files"]
    for name in files:
        if name not in CODEBOOK_FILES:  # `../data/items.jsonl`, `/etc/passwd`: nothing outside the folder is read
            raise ValueError(f"{manifest_path}: lists {name!r}, which is not a file of a codebooks folder (those are "
                             f"{', '.join(CODEBOOK_FILES)}); refused; {redo}")
    missing = [name for name in CODEBOOK_FILES if name not in files]
    if missing:
        raise ValueError(f"{manifest_path}: does not list {', '.join(missing)}; {redo}")
    for name, entry in files.items():
        path = Path(folder) / name
        if path.is_symlink():
            raise ValueError(f"{path}: a symbolic link; a codebooks folder holds its own files; {redo}")
        if not path.is_file():
            raise ValueError(f"{path}: missing from the codebooks folder its manifest describes; {redo}")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            raise ValueError(f"{path}: does not match {MANIFEST_FILE} (changed or damaged after fit-codebooks wrote it); {redo}")


def check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder that is not a codebooks folder (unless ``overwrite``).

    A codebooks folder holds nothing but the files this command writes (all four, or some of them when a fit was
    interrupted, and the temporary files of an interrupted atomic write): re-fitting into it replaces them. Anything
    else -- a run folder, a dataset folder -- is someone's work that writing here would corrupt.
    """
    out = real_out(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; pass a folder to --out")
    if overwrite or not out.is_dir():
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _ours(p))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out}: not empty and not a codebooks folder (it holds {shown}, which fit-codebooks does not write); choose a new or empty folder, or pass "
            f"--overwrite to write {', '.join(CODEBOOK_FILES)} there anyway"
        )


def _ours(path: Path) -> bool:
    """Whether ``path`` is one of the files this command writes, or an interrupted atomic write of one."""
    if not path.is_file():
        return False
    name = path.name
    ours = (*CODEBOOK_FILES, MANIFEST_FILE)
    return name in ours or any(name.startswith(f".{f}.") and name.endswith(Path(f).suffix) for f in ours)


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
