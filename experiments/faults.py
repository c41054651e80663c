"""Fault injection (issue 11): kill `semid train`, `semid fit-codebooks` and `semid add-items` at random points,
recover as a user would, and count what survived.

    OMP_NUM_THREADS=1 python -m experiments.faults --trials 4 [--users 300] [--seed 0]

A tiny dataset is built from the real Beauty data (``../shared/data/beauty``: its first ``--users`` users and the
items they touch, renumbered, with their MiniLM embeddings) in a temporary folder; nothing is written to the
repository except the results. Then, for each kind and each signal (``kill -9``, SIGTERM, SIGINT), ``--trials``
times: start the command, send the signal at a uniformly random moment of its uninterrupted duration (start-up
included), and recover:

- ``train``: ``semid train ... --resume`` when the folder holds a resume point, else the same command again (what
  `semid` says to do); the run must end identical (best and last weights, best score, steps, epochs,
  metrics_valid.json) to an uninterrupted run with the same seed.
- ``train --resume`` of a finished run (4 epochs from a finished 2-epoch run): right after the kill the old run must
  still be servable (``load_run`` + ``recommend`` + ``semid evaluate --split test``); resumed again, it must end identical to an
  uninterrupted 4-epoch resume.
- ``fit-codebooks`` over an older set (another seed): right after the kill the folder must hold the old set or the
  new one, whole (checked against its manifest and against both sets); run again, it must equal an uninterrupted
  fit (same IDs, byte-identical quantizer.pt and code_usage.png).

- ``add-items`` (the items of 50 more users, into a finished run): right after the kill the run must hold the old IDs
  version or the new one, whole, and serve; run again, it must equal an uninterrupted add (IDs, lineage, content).

A folder is *unusable* when recovery fails or the checks above fail. After every trial, crafted files are planted
in a copy of the folder (a checkpoint, a resume point or a quantizer holding an object whose unpickling runs
``touch MARKER``; a config.yaml with a ``!!python/object/apply`` tag) and the command that reads them is run; the
*code executed* column counts markers that appeared. Writes the table and the command to
``experiments/results/faults.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semid.io import atomic_open

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "experiments" / "results"
BEAUTY = (ROOT / "../shared/data/beauty").resolve()
SIGNALS = {"kill -9": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
FIT_FLAGS = ["--method", "rqkmeans", "--levels", "2", "--codebook-size", "16", "--no-progress"]
TRAIN_FLAGS = ["--max-epochs", "2", "--batch-size", "32", "--val-every", "0.5", "--val-users", "all", "--num-beams", "10",
               "--final-val-users", "all", "--resume-every-steps", "3", "--no-progress", "--seed", "0"]


# ---- setup -------------------------------------------------------------------------------------------------------
def tiny_beauty(out: Path, users: int) -> Path:
    """Beauty's first ``users`` users and the items they touch (renumbered by first appearance), with embeddings."""
    from semid.data import Catalogue, load_dataset
    from semid.prepare import write_dataset

    data = load_dataset(BEAUTY)
    seqs = data.sequences[:users]
    old = np.unique(np.concatenate(seqs), return_index=True)
    order = old[0][np.argsort(old[1])]  # item ids in order of first appearance
    new_id = np.zeros(data.num_items + 1, dtype=np.int64)
    new_id[order] = np.arange(1, order.size + 1)
    cat = data.catalogue
    sub = Catalogue(np.arange(1, order.size + 1), [cat.original_ids[i - 1] for i in order],
                    [cat.titles[i - 1] for i in order], [cat.attributes[i - 1] for i in order])
    write_dataset(out, sub, [new_id[s] for s in seqs])
    np.save(out / "item_emb_minilm.npy", data.embeddings("minilm")[order - 1])
    return out


def semid(*args: str) -> list[str]:
    return [sys.executable, "-m", "semid_cli", *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _wait_for(proc: subprocess.Popen, ready: Any) -> float:
    """Seconds until ``ready()`` holds (or the process ended)."""
    start = time.perf_counter()
    while ready is not None and not ready() and proc.poll() is None:
        time.sleep(0.02)
    return time.perf_counter() - start


def timed(cmd: list[str], ready: Any = None) -> tuple[float, float]:
    """(seconds the command took, seconds until ``ready()`` held: its start-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    startup = _wait_for(proc, ready)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {err[-2000:]}")
    return time.perf_counter() - start, startup


def interrupted(cmd: list[str], sig: int, seconds: tuple[float, float], ready: Any, rng: random.Random) -> tuple[int, bool]:
    """Run ``cmd`` and send ``sig`` at a random moment: one trial in three anywhere in its uninterrupted duration
    ``seconds[0]`` (start-up included), the others after its start-up (once ``ready()`` holds), anywhere in the
    rest. Returns (exit status, whether it was still running when signalled)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    total, startup = seconds
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rng.random() < 1 / 3:
        after = rng.uniform(0, total)
    else:
        _wait_for(proc, ready)
        after = rng.uniform(0, max(total - startup, 0.1))
    try:
        proc.wait(timeout=after)
        return proc.returncode, False
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    return proc.wait(timeout=300), True


# ---- what "identical" means -------------------------------------------------------------------------------------
def run_outcome(path: Path) -> dict[str, Any]:
    import yaml

    from generator.models.checkpoint import safe_load

    config = yaml.safe_load((path / "config.yaml").read_text())
    metrics = json.loads((path / "metrics_valid.json").read_text())
    return {
        "best": safe_load(path / "checkpoints" / "best.ckpt")["state_dict"],
        "last": safe_load(path / "checkpoints" / "last.ckpt")["state_dict"],
        "fields": [config["best_score"], config["steps"], config["epochs"],
                   {k: v for k, v in metrics.items() if k not in ("seconds", "users_per_s", "checkpoint_sha256")}],
    }


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    tensors = all(a[w].keys() == b[w].keys() and all(torch.equal(a[w][k], b[w][k]) for k in a[w]) for w in ("best", "last"))
    return tensors and a["fields"] == b["fields"]


def codebooks_outcome(path: Path) -> dict[str, Any]:
    from semid.ids import SemanticIDs

    stats = json.loads((path / "stats.json").read_text())
    ids = SemanticIDs.load(path / "semantic_ids.npz")
    return {"codes": ids.codes.tobytes(), "items": ids.item_ids.tobytes(), "quantizer": (path / "quantizer.pt").read_bytes(),
            "plot": (path / "code_usage.png").read_bytes(), "stats": {k: v for k, v in stats.items() if k != "seconds"}}


def servable(path: Path) -> bool:
    from generator.runs.folder import load_run
    from generator.runs.recommend import recommend

    try:
        recs = recommend(load_run(path), [[1, 2, 3]], k=5)
    except (ValueError, FileNotFoundError):
        return False
    return len(recs[0].items) == 5 and cli("evaluate", "--run", str(path), "--split", "test", "--max-users", "20", "--no-progress") == 0


def cli(*args: str) -> int:
    """`semid ARGS` in this process (start-up paid once); its messages are kept out of the report."""
    import contextlib
    import io

    from semid_cli import main as semid_main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return semid_main(list(args))


# ---- crafted files ------------------------------------------------------------------------------------------------
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def crafted_runs_code(kind: str, folder: Path, work: Path, data: Path, ids: Path) -> int:
    """Plant crafted files in a copy of ``folder`` and run what reads them; 1 if any ran code, else 0."""
    copy = work / "crafted"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    marker = work / "code_ran"
    marker.unlink(missing_ok=True)
    if kind == "fit-codebooks":
        torch.save({"format": "rqvae.quantizer", "version": 1, "method": "rqkmeans", "x": _Exploit(marker)}, copy / "quantizer.pt")
        from rqvae import load_quantizer

        try:
            load_quantizer(copy / "quantizer.pt")
        except ValueError:
            pass
    else:
        from generator.models.checkpoint import safe_load

        ckpt = safe_load(copy / "checkpoints" / "best.ckpt")
        ckpt["extra"] = _Exploit(marker)
        torch.save(ckpt, copy / "checkpoints" / "best.ckpt")
        cli("recommend", "--run", str(copy), "--history", "1,2")
        shutil.copyfile(copy / "checkpoints" / "best.ckpt", copy / "checkpoints" / "resume.ckpt")
        cli("train", "--data", str(data), "--ids", str(ids), "--out", str(copy), "--resume", "--no-progress")
        text = (copy / "config.yaml").read_text().replace("\nmonitor:", f"\nmonitor: !!python/object/apply:os.system ['touch {marker}']\nx:")
        (copy / "config.yaml").write_text(text)
        cli("evaluate", "--run", str(copy), "--no-progress")
    ran = int(marker.exists())
    shutil.rmtree(copy, ignore_errors=True)
    return ran


# ---- trials -------------------------------------------------------------------------------------------------------
def trial_train(sig: int, work: Path, data: Path, ids: Path, ref: dict[str, Any], seconds: tuple[float, float],
                rng: random.Random) -> dict[str, Any]:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = semid("train", "--data", str(data), "--ids", str(ids), "--out", str(out), *TRAIN_FLAGS)
    rc, mid = interrupted(cmd, sig, seconds, lambda: (out / "train.lock").exists(), rng)
    points = [out / "checkpoints" / n for n in ("resume.ckpt", "last.ckpt")]
    usable = True
    if rc != 0:
        again = cmd + ["--resume"] if any(p.is_file() for p in points) else cmd
        usable = run(again).returncode == 0
    usable = usable and servable(out)
    identical = usable and same_run(run_outcome(out), ref)
    return {"rc": rc, "mid": mid, "usable": usable, "identical": identical, "folder": out}


def trial_resume(sig: int, work: Path, data: Path, ids: Path, finished: Path, ref: dict[str, Any],
                 seconds: tuple[float, float], rng: random.Random) -> dict[str, Any]:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(finished, out)
    cmd = semid("train", "--data", str(data), "--ids", str(ids), "--out", str(out), "--resume", "--max-epochs", "4", "--no-progress")
    rc, mid = interrupted(cmd, sig, seconds, lambda: (out / "train.lock").exists(), rng)
    usable = servable(out)  # the finished run still serves, right after the kill
    if rc != 0:
        usable = usable and run(cmd).returncode == 0
    identical = usable and same_run(run_outcome(out), ref)
    return {"rc": rc, "mid": mid, "usable": usable, "identical": identical, "folder": out}


def trial_codebooks(sig: int, work: Path, emb: Path, old: Path, ref: dict[str, Any], seconds: tuple[float, float],
                    rng: random.Random) -> dict[str, Any]:
    from semid.codebooks import check_codebooks

    out = work / "ids"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(old, out)
    cmd = semid("fit-codebooks", "--embeddings", str(emb), "--out", str(out), *FIT_FLAGS, "--seed", "0")
    rc, mid = interrupted(cmd, sig, seconds, lambda: any(work.glob(".ids.writing-*")), rng)
    try:
        check_codebooks(out)
        now = codebooks_outcome(out)
        usable = now == ref or now == codebooks_outcome(old)  # one whole set, old or new
    except (ValueError, FileNotFoundError, OSError):
        usable = False
    if usable and now != ref:
        usable = run(cmd).returncode == 0
    identical = usable and codebooks_outcome(out) == ref
    return {"rc": rc, "mid": mid, "usable": usable, "identical": identical, "folder": out}


def added_outcome(path: Path) -> dict[str, Any]:
    from semid.ids import SemanticIDs

    ids_path = path / "semantic_ids.npz"
    ids = SemanticIDs.load(ids_path)
    meta = SemanticIDs.load_metadata(ids_path)
    return {"codes": ids.codes.tobytes(), "items": ids.item_ids.tobytes(), "lineage": meta.get("lineage"),
            "arrays": {k: v.tobytes() for k, v in SemanticIDs.load_arrays(ids_path).items()}}


def trial_add_items(sig: int, work: Path, more: Path, finished: Path, ref: dict[str, Any], seconds: tuple[float, float],
                    rng: random.Random) -> dict[str, Any]:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(finished, out)
    before = added_outcome(out)
    cmd = semid("add-items", "--run", str(out), "--data", str(more))
    rc, mid = interrupted(cmd, sig, seconds, lambda: (out / "train.lock").exists(), rng)
    now = added_outcome(out)
    usable = (now == before or now == ref) and servable(out)  # the old version or the new one, whole, and it serves
    if usable and now != ref:
        usable = run(cmd).returncode == 0
    identical = usable and added_outcome(out) == ref and servable(out)
    return {"rc": rc, "mid": mid, "usable": usable, "identical": identical, "folder": out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4, help="trials per kind and signal (default 4)")
    p.add_argument("--users", type=int, default=300, help="Beauty users in the tiny dataset (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where faults.md goes")
    p.add_argument("--kinds", nargs="+", choices=("train", "fit-codebooks", "add-items"),
                   help="only these commands (default all; 'train' includes the resume of a finished run)")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error(f"--trials must be >= 1, got {args.trials}")
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="semid-faults-") as tmp:
        tmp = Path(tmp)
        data = tiny_beauty(tmp / "data", args.users)
        emb = data / "item_emb_minilm.npy"
        t_fit = timed(semid("fit-codebooks", "--embeddings", str(emb), "--out", str(tmp / "ids_ref"), *FIT_FLAGS, "--seed", "0"),
                      lambda: any(tmp.glob(".ids_ref.writing-*")))
        timed(semid("fit-codebooks", "--embeddings", str(emb), "--out", str(tmp / "ids_old"), *FIT_FLAGS, "--seed", "1"))
        ids = tmp / "ids_ref"
        t_train = timed(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(tmp / "ref"), *TRAIN_FLAGS),
                        lambda: (tmp / "ref" / "train.lock").exists())
        shutil.copytree(tmp / "ref", tmp / "ref6")
        t_resume = timed(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(tmp / "ref6"), "--resume",
                               "--max-epochs", "4", "--no-progress"), lambda: (tmp / "ref6" / "train.lock").exists())
        more = tiny_beauty(tmp / "more", args.users + 50)  # the same first items, then those of 50 more users
        shutil.copytree(tmp / "ref", tmp / "ref_added")
        t_add = timed(semid("add-items", "--run", str(tmp / "ref_added"), "--data", str(more)),
                      lambda: (tmp / "ref_added" / "train.lock").exists())
        refs = {"train": run_outcome(tmp / "ref"), "resume": run_outcome(tmp / "ref6"), "fit": codebooks_outcome(tmp / "ids_ref"),
                "add": added_outcome(tmp / "ref_added")}
        n_items = sum(1 for _ in open(data / "items.jsonl"))
        notes.append(f"tiny Beauty: {args.users} users, {n_items} items; uninterrupted (start-up of which in brackets): "
                     f"fit-codebooks {t_fit[0]:.1f} s ({t_fit[1]:.1f} s), train {t_train[0]:.1f} s ({t_train[1]:.1f} s), "
                     f"resume of the finished run to 4 epochs {t_resume[0]:.1f} s ({t_resume[1]:.1f} s), add-items "
                     f"(the items of 50 more users) {t_add[0]:.1f} s ({t_add[1]:.1f} s)")
        kinds = [
            ("train", lambda sig, w: trial_train(sig, w, data, ids, refs["train"], t_train, rng)),
            ("train --resume of a finished run", lambda sig, w: trial_resume(sig, w, data, ids, tmp / "ref", refs["resume"], t_resume, rng)),
            ("fit-codebooks", lambda sig, w: trial_codebooks(sig, w, emb, tmp / "ids_old", refs["fit"], t_fit, rng)),
            ("add-items", lambda sig, w: trial_add_items(sig, w, more, tmp / "ref", refs["add"], t_add, rng)),
        ]
        kinds = [(k, t) for k, t in kinds if args.kinds is None or k.split(" ")[0] in args.kinds]
        for kind, trial in kinds:
            for name, sig in SIGNALS.items():
                counts = {"trials": 0, "mid": 0, "nonzero": 0, "identical": 0, "unusable": 0, "ran": 0}
                for i in range(args.trials):
                    work = tmp / f"w_{len(rows)}_{i}"
                    work.mkdir()
                    r = trial(sig, work)
                    counts["trials"] += 1
                    counts["mid"] += r["mid"]
                    counts["nonzero"] += r["mid"] and r["rc"] != 0
                    counts["identical"] += r["identical"]
                    counts["unusable"] += not r["usable"]
                    if r["usable"]:
                        counts["ran"] += crafted_runs_code(kind, r["folder"], work, data, ids)
                    shutil.rmtree(work, ignore_errors=True)
                    print(f"{kind:34s} {name:8s} trial {i + 1}: exit {r['rc']:4d}, {'signalled mid-run' if r['mid'] else 'had ended'}, "
                          f"{'identical' if r['identical'] else 'DIFFERENT'}, {'usable' if r['usable'] else 'UNUSABLE'}", flush=True)
                rows.append((kind, name, counts))
    header = ["kind", "signal", "trials", "signalled mid-run", "exited non-zero", "ended identical to uninterrupted",
              "folders left unusable", "code executed by crafted files"]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * 6) + " |"]
    for kind, name, c in rows:
        lines.append(f"| {kind} | {name} | {c['trials']} | {c['mid']} | {c['nonzero']} | {c['identical']} | {c['unusable']} | {c['ran']} |")
    table = "\n".join(lines)
    elapsed = time.perf_counter() - start
    print(table)
    print(f"{notes[0]}; {elapsed:.0f} s in all")
    command = "OMP_NUM_THREADS=1 python -m experiments.faults " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out / "faults.md", "w", encoding="utf-8") as f:
        f.write(f"# Fault injection (issue 11)\n\n`{command.strip()}` ({elapsed:.0f} s, 2-core CPU shared with other jobs)\n\n")
        f.write(f"{table}\n\n{notes[0]}. Each trial sends the signal at a uniformly random moment of the uninterrupted "
                "duration (start-up included) in one trial of three, else at a random moment after the start-up "
                "(imports, data; until `train.lock` or the temporary codebooks folder appears); *signalled mid-run* counts "
                "the trials the command was still running. A signal during the start-up meets Python's default handlers "
                "(exit -15 / -2), later ones semid's (130 / 143). "
                "Recovery is what `semid` says to do: `--resume` when the folder holds a resume point, else the same "
                "command again. Crafted files (a checkpoint, a resume point or a quantizer whose unpickling would run "
                "`touch`, a config.yaml with a `!!python/object/apply` tag) are planted in a copy of every usable folder "
                "and read by `semid recommend`, `semid train --resume`, `semid evaluate` and `load_quantizer`.\n")


if __name__ == "__main__":
    main()
