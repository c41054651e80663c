"""`semid demo`: the main job end to end on a real dataset (``make demo`` runs it on ../shared/data/beauty).

1. load the dataset folder and print its summary and the leave-one-out split;
2. fit codebooks (``semid fit-codebooks``: balanced residual k-means, 3 x 256 codes + the extra level);
3. train the default generator (``semid train``'s defaults: the causal design) for 8 minutes, choosing the
   checkpoint on validation users;
4. evaluate on the test users (all of them; ``--eval-users N`` for a seeded sample) by constrained beam search
   (invalid items returned must be 0);
5. show the top-10 with titles for three users, and where every file went.

About 10 minutes on 2 CPU cores. Codebooks already in ``OUT/ids`` are reused; the run folder ``OUT/run`` is
the demo's own and is replaced on every run. Every argument and the folder are checked first: ``OUT`` must be new or
hold only what the demo writes, and ``OUT/run`` is deleted only when it is a run folder semid wrote, holding nothing
else, that no training holds (``OUT/run/train.lock``); otherwise the demo stops with an error and deletes nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from semid.codebooks import CODEBOOK_FILES
from semid.data import format_summary, load_dataset, summary
from semid.io import atomic_target_name, folder_lock, write_json
from semid.split import leave_one_out
from semid_cli.args import add_progress, nonnegative_int, positive_users
from semid_cli.console import epoch_lines, progress_default, quiet_lightning

EMBEDDINGS = "minilm"
DEMO_ENTRIES = ("data_summary.json", "ids", "run")  # all the demo writes into --out


DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the docstring's numbered steps keep their lines
    p.add_argument("--data", type=Path, default=Path("../shared/data/beauty"), help="dataset folder (default ../shared/data/beauty)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for everything the demo writes (default runs/demo)")
    p.add_argument("--embeddings", default=EMBEDDINGS, help=f"use DATA/item_emb_<NAME>.npy (default {EMBEDDINGS})")
    p.add_argument("--max-time", default="00:08:00", help="training wall-clock budget HH:MM:SS (default 00:08:00)")
    p.add_argument("--eval-users", type=positive_users, default=None,
                   help="test (and final validation) users evaluated: a number for a seeded sample, or all (default all, about 20 s)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="(default 0)")
    add_progress(p, "show progress bars (default: on a terminal, else one line per epoch)")


def run(args: argparse.Namespace) -> int:
    # heavy imports only when the command runs
    from generator.runs.demo import demo_options, train_evaluate_show
    from semid_cli import build_parser

    start = time.perf_counter()
    args.progress = progress_default(args.progress)  # bars on a terminal, else one line per epoch
    # 0. every argument, then the folder, before anything is written or deleted
    demo_options(max_time=args.max_time, eval_users=args.eval_users, seed=args.seed, progress=args.progress)
    if not (args.data / "items.jsonl").is_file():
        raise FileNotFoundError(
            f"{args.data}: no dataset here (expected items.jsonl and sequences.txt). Point --data at "
            "../shared/data/beauty, or make a dataset folder with `semid prepare`."
        )
    ids_dir, run_dir = args.out / "ids", args.out / "run"
    reuse_ids = all((ids_dir / f).is_file() for f in CODEBOOK_FILES)  # fit-codebooks writes its four files one by one
    emb = args.data / f"item_emb_{args.embeddings}.npy"
    if not reuse_ids and not emb.is_file():
        raise FileNotFoundError(f"{emb}: no item embeddings here; make them with `semid embed --data {args.data} --model MODEL_DIR`")
    check_demo_out(args.out)

    # 1. the data
    _step("1/4 data")
    dataset = load_dataset(args.data)
    stats = summary(dataset)
    print(format_summary(stats))
    split = leave_one_out(dataset)
    print(
        f"leave-one-out: {split.num_users:,} users ({split.num_skipped:,} with < 3 items left out); "
        f"{sum(len(t) for t in split.train):,} training items, {split.valid_targets.size:,} validation and "
        f"{split.test_targets.size:,} test targets"
    )
    write_json(args.out / "data_summary.json", stats)

    # 2. codebooks, through the same command a user runs
    _step("2/4 semantic IDs")
    if reuse_ids:
        print(f"reusing the codebooks in {ids_dir} (delete that folder to fit them again)")
    else:
        argv = ["fit-codebooks", "--embeddings", str(emb), "--out", str(ids_dir), "--seed", str(args.seed)]
        argv += ["--codebook-size", str(dataset.num_items)] if dataset.num_items < 256 else []  # (the default 256 failed)
        fit = build_parser("fit-codebooks").parse_args(argv + ([] if args.progress else ["--no-progress"]))
        fit.func(fit)

    # 3-4. train, evaluate on test users, show recommendations
    if run_dir.exists():
        print(f"replacing the previous demo run in {run_dir}")
        replace_demo_run(run_dir, delete=True)
    who = "all" if args.eval_users is None else f"{args.eval_users:,} sampled"
    _step(f"3/4 training the default design for {args.max_time}, then 4/4 evaluating {who} test users")
    quiet_lightning()  # Lightning is imported with the training code, after logging was set up: one handler
    report = train_evaluate_show(
        args.data, ids_dir / "semantic_ids.npz", run_dir, max_time=args.max_time, eval_users=args.eval_users,
        seed=args.seed, progress=args.progress, callbacks=[] if args.progress else [epoch_lines()],
    )
    print()
    print(report.text)
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min; everything is in {args.out}/:")
    print("  data_summary.json  dataset summary")
    print("  ids/               semantic_ids.npz, quantizer.pt, stats.json, code_usage.png")
    print(f"  run/               the trained run; try: semid recommend --run {run_dir} --history 12,45,99")
    return 0


def check_demo_out(out: Path) -> None:
    """Raise FileExistsError unless ``out`` is new, or a folder holding only what the demo writes, with a run folder
    the demo may replace (:func:`replace_demo_run`) and a codebooks folder fit-codebooks may write."""
    from semid.codebooks import check_out

    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; give --out a folder for the demo")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _demo_entry(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out}: not a demo folder (it holds {shown}, which `semid demo` does not write); choose a "
                              "new folder for --out, or one an earlier demo wrote")
    check_out(out / "ids", overwrite=False)
    replace_demo_run(out / "run", delete=False)


def replace_demo_run(run_dir: Path, *, delete: bool) -> None:
    """Check (and with ``delete``, remove) the demo's run folder: only a run folder semid wrote, holding nothing else,
    that no training or add-items holds (its lock is taken for the check and the removal); FileExistsError otherwise."""
    from generator.runs.folder import LOCK_FILE
    from generator.runs.out_folder import replace_refusal

    refusal = replace_refusal(run_dir)
    if refusal is None and run_dir.is_dir():
        with folder_lock(run_dir, LOCK_FILE, what="a training or add-items"):
            refusal = replace_refusal(run_dir)  # again, under the lock
            if refusal is None and delete:
                shutil.rmtree(run_dir)
    if refusal is not None:
        raise FileExistsError(f"{run_dir}: {refusal}; the demo replaces only a run folder semid wrote: move it away, "
                              "or choose another --out")


def _demo_entry(name: str) -> bool:
    """Whether ``name`` in the demo's folder is one the demo writes (or a temporary name of such a write)."""
    if name in DEMO_ENTRIES:
        return True
    if name.startswith((".ids.writing-", ".ids.old-")):  # fit-codebooks' temporary folders
        return True
    return atomic_target_name(name) in DEMO_ENTRIES


def _step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)
