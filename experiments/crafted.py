"""Crafted and careless inputs (issue 22: remote code, the run lock, demo, train/fit-codebooks --out, leftovers),
each run through the `semid` command line on a tiny Beauty; prints the table of experiments/results/faults.md.

    OMP_NUM_THREADS=1 python -m experiments.crafted [--users 200] [--data ../shared/data/beauty]

Each case checks the outcome it expects: a clear one-line error (exit 2, no traceback), the crafted code never ran
(its marker file is absent), no file outside the run touched (byte-for-byte), a folder kept (every file unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from experiments import faults
from experiments.faults import FIT_FLAGS, ROOT, semid, tiny_beauty

SECRET = b"precious bytes \x00\xff\n"
EVIL = ("import pathlib\npathlib.Path({marker!r}).write_text('code ran')\n"
        "from transformers import PreTrainedTokenizerFast, PretrainedConfig, PreTrainedModel\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n")


def call(cmd: list[str], stdin: str = "closed") -> tuple[int, str]:
    """Run ``cmd`` with stdin closed, "y" piped in, or "y" typed on a pty; (exit code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(Path(tempfile.gettempdir()) / "crafted_hf_modules")}
    kw = {"cwd": ROOT, "env": env, "capture_output": True, "text": True, "timeout": 600}
    if stdin == "tty":
        master, slave = pty.openpty()
        os.write(master, b"y\n")
        try:
            proc = subprocess.run(cmd, stdin=slave, **kw)
        finally:
            os.close(slave)
            os.close(master)
    elif stdin == "pipe":
        proc = subprocess.run(cmd, input="y\n", **kw)
    else:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, **kw)
    return proc.returncode, proc.stderr


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def seen(rc: int, err: str, root: Path, *checks: tuple[str, bool]) -> str:
    """The outcome as seen: exit code, the error's first line (paths shortened), and each check."""
    lines = [x for x in err.strip().splitlines() if x.startswith("semid ")] or err.strip().splitlines()[-1:] or [""]
    msg = lines[-1].replace(str(root) + "/", "").replace("  (--debug shows the traceback)", "")
    msg = msg.replace("`", "'")
    msg = msg if len(msg) <= 170 else msg[:167] + "..."
    clear = rc == 2 and "Traceback" not in err
    marks = "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks)
    return f"exit {rc}{' (clear error)' if clear else ''}: `{msg.replace('|', '/')}`; {marks}"


def plant(folder: Path, file: str, auto_map: dict, marker: Path) -> None:
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    path = folder / file
    doc = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**doc, "auto_map": auto_map}))


def local_tokenizer(folder: Path, num_items: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([str(i) for i in range(num_items)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--data", type=Path, default=faults.BEAUTY, help=f"the Beauty folder (default {faults.BEAUTY})")
    args = p.parse_args()
    faults.BEAUTY = args.data  # tiny_beauty reads it
    root = Path(tempfile.mkdtemp(prefix="crafted-"))
    data = tiny_beauty(root / "data", args.users)
    emb = data / "item_emb_minilm.npy"
    ids, run = root / "ids", root / "run"
    train = ["--max-steps", "4", "--batch-size", "32", "--num-beams", "10", "--final-val-users", "0", "--no-progress"]
    for cmd in (semid("fit-codebooks", "--embeddings", str(emb), "--out", str(ids), *FIT_FLAGS),
                semid("train", "--data", str(data), "--ids", str(ids), "--out", str(run), *train)):
        rc, err = call(cmd)
        assert rc == 0, err
    rows: list[tuple[str, str, str]] = []

    def case(name: str, expected: str, fn: Callable[[Path], str]) -> None:
        work = root / f"case{len(rows)}"
        work.mkdir()
        rows.append((name, expected, fn(work)))
        print(f"| {name} | {expected} | {rows[-1][2]} |", flush=True)

    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst, symlinks=True)
        return dst

    # 1. remote code
    def crafted_tokenizer(work: Path, stdin: str) -> str:
        tok, marker = local_tokenizer(work / "tok", 10), work / "MARKER"
        plant(tok, "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}, marker)
        rc, err = call(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(work / "run"), "--target", "title",
                             "--tokenizer", str(tok), *train), stdin)
        return seen(rc, err, work, ("no code run", not marker.exists()), ("nothing asked", "custom code" not in err))

    case("`train --target title --tokenizer DIR`, DIR/tokenizer_config.json with `auto_map` to a .py, stdin closed",
         "clear error, no code run", lambda w: crafted_tokenizer(w, "closed"))
    case("the same, \"y\" typed on a terminal (pty)", "clear error, no code run, nothing asked", lambda w: crafted_tokenizer(w, "tty"))

    def crafted_model(work: Path) -> str:
        from transformers import BertConfig, BertModel

        model, marker = work / "model", work / "MARKER"
        BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(model)
        plant(model, "config.json", {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}, marker)
        rc, err = call(semid("embed", "--data", str(copy(data, work / "data")), "--model", str(model), "--no-progress"), "pipe")
        return seen(rc, err, work, ("no code run", not marker.exists()))

    case("`embed --model DIR`, DIR/config.json with `auto_map`, \"y\" piped in", "clear error, no code run", crafted_model)

    def title_run_tokenizer(work: Path) -> str:
        tok = local_tokenizer(work / "tok", 10)
        title_run = work / "title_run"
        rc, err = call(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(title_run), "--target", "title",
                             "--tokenizer", str(tok), "--model-option", "d_model=16", "--model-option", "num_heads=2", *train))
        assert rc == 0, err
        marker = work / "MARKER"
        plant(title_run / "tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}, marker)
        rc, err = call(semid("recommend", "--run", str(title_run), "--history", "1,2,3"), "tty")
        return seen(rc, err, work, ("no code run", not marker.exists()))

    case("`recommend --run RUN` on a title run whose RUN/tokenizer/ was given an `auto_map`, \"y\" on a terminal",
         "clear error, no code run", title_run_tokenizer)

    # 2. the lock
    def symlinked_lock(work: Path, command: str) -> str:
        r = copy(run, work / "run")
        victim = work / "important.txt"
        victim.write_bytes(SECRET)
        (r / "train.lock").symlink_to(victim)
        if command == "add-items":
            cmd = semid("add-items", "--run", str(r), "--data", str(data))
        else:
            cmd = semid("train", "--data", str(data), "--ids", str(ids), "--out", str(r), *train, *(["--resume"] if "resume" in command else []))
        rc, err = call(cmd)
        return seen(rc, err, work, ("file outside the run unchanged", victim.read_bytes() == SECRET),
                    ("its bytes not shown", "precious" not in err))

    for command in ("train", "train --resume", "add-items"):
        case(f"`{command}` with RUN/train.lock a symlink to a file outside the run", "refused, no file outside the run touched",
             lambda w, c=command: symlinked_lock(w, c))

    def hard_linked_lock(work: Path) -> str:
        r = copy(run, work / "run")
        victim = work / "important.txt"
        victim.write_bytes(SECRET)
        os.link(victim, r / "train.lock")
        rc, err = call(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(r), *train, "--resume"))
        return seen(rc, err, work, ("file outside the run unchanged", victim.read_bytes() == SECRET))

    case("`train --resume` with RUN/train.lock a hard link to a file outside the run", "refused, no file outside the run touched", hard_linked_lock)

    # 3. the demo
    def demo(work: Path, how: str) -> str:
        out = work / "demo"
        out.mkdir()
        copy(ids, out / "ids")
        copy(run, out / "run")
        (out / "data_summary.json").write_text("{}\n")
        if how == "foreign":
            (out / "run" / "thesis.tex").write_text("years of work\n")
        cmd = semid("demo", "--data", str(data), "--out", str(out), "--max-time", "abc" if how == "max-time" else "00:00:05", "--no-progress")
        before = files(out)
        if how == "locked":  # a training holds the lock: a process that takes it and waits
            holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom semid.io import folder_lock\n"
                                       "with folder_lock(sys.argv[1], 'train.lock', what='a training'):\n    print(1, flush=True)\n    time.sleep(600)\n",
                                       str(out / "run")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            holder.stdout.readline()
            before = files(out)
            rc, err = call(cmd)
            kept = files(out) == before
            holder.kill()
            holder.wait()
        else:
            rc, err = call(cmd)
            kept = files(out) == before
        return seen(rc, err, work, ("folder kept (every file unchanged)", kept))

    case("`demo --out DIR`, DIR/run holding a file semid does not write", "refused, folder kept", lambda w: demo(w, "foreign"))
    case("`demo --out DIR`, DIR/run held by a training (its lock)", "refused, folder kept", lambda w: demo(w, "locked"))
    case("`demo --out DIR --max-time abc`, DIR an earlier demo's folder", "clear error, folder kept", lambda w: demo(w, "max-time"))

    # 7. train --out
    def train_out(work: Path, what: str) -> str:
        if what == "codebooks":
            out = copy(ids, work / "cb")
        elif what == "foreign":
            out = work / "mine"
            out.mkdir()
            (out / "notes.txt").write_text("mine\n")
        else:
            out = work / "a-file"
            out.write_bytes(SECRET)
        before = files(out) if out.is_dir() else out.read_bytes()
        rc, err = call(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(out), *train))
        return seen(rc, err, work, ("kept", (files(out) if out.is_dir() else out.read_bytes()) == before))

    case("`train --out` a codebooks folder", "refused, folder kept", lambda w: train_out(w, "codebooks"))
    case("`train --out` a non-empty foreign folder", "refused, folder kept", lambda w: train_out(w, "foreign"))
    case("`train --out` a file", "clear error (not `[Errno 17]`), file kept", lambda w: train_out(w, "file"))

    # 8. fit-codebooks --out LINK
    def codebooks_link(work: Path) -> str:
        target = copy(ids, work / "real" / "cb")
        link = work / "cb_link"
        link.symlink_to(target)
        rc, err = call(semid("fit-codebooks", "--embeddings", str(emb), "--out", str(link), *FIT_FLAGS, "--seed", "1"))
        left = [p.name for p in [*work.iterdir(), *target.parent.iterdir()] if ".writing-" in p.name or ".old-" in p.name]
        rc2, err2 = call(semid("train", "--data", str(data), "--ids", str(link), "--out", str(work / "run2"), *train))
        return (f"exit {rc}: written through the link; " + "; ".join(f"{n}: {'yes' if ok else 'NO'}" for n, ok in [
            ("link still a link to the folder", link.is_symlink() and Path(os.readlink(link)) == target),
            ("no .cb_link.writing-* left", not left), ("train --ids LINK reads the new set", rc2 == 0)]))

    case("`fit-codebooks --out LINK`, LINK a symlink to a codebooks folder", "written through, no temporary folder left", codebooks_link)

    # 11. leftovers
    def killed_checkpoint(work: Path) -> str:
        r = copy(run, work / "run")
        code = ("import os, signal, sys\nfrom semid.io import atomic_path\nwith atomic_path(sys.argv[1]) as tmp:\n"
                "    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
        subprocess.run([sys.executable, "-c", code, str(r / "checkpoints" / "resume.ckpt")], cwd=ROOT)
        left = sorted(p.name for p in (r / "checkpoints").glob(".resume.ckpt.*"))
        rc, err = call(semid("train", "--data", str(data), "--ids", str(ids), "--out", str(r), *train[:-1], "--max-steps", "6", "--resume", "--no-progress"))
        gone = not list((r / "checkpoints").glob(".resume.ckpt.*"))
        return f"exit {rc}: {left[0] if left else 'none'} left by the kill; removed by --resume: {'yes' if gone else 'NO'}"

    case("kill -9 while a checkpoint is written, then `train --resume`", "the temporary file removed", killed_checkpoint)

    def manifest_outside(work: Path) -> str:
        import hashlib

        cb = copy(ids, work / "ids")
        copy(data, work / "data")
        outside = work / "data" / "items.jsonl"
        manifest = json.loads((cb / "manifest.json").read_text())
        manifest["files"]["../data/items.jsonl"] = {"bytes": outside.stat().st_size, "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
        (cb / "manifest.json").write_text(json.dumps(manifest))
        rc, err = call(semid("train", "--data", str(data), "--ids", str(cb), "--out", str(work / "run"), *train))
        return seen(rc, err, work, ("refused by name", "'../data/items.jsonl'" in err))

    case("`train --ids DIR`, DIR/manifest.json listing `../data/items.jsonl` (right size and sha256)", "refused by name", manifest_outside)

    print(f"\n{len(rows)} cases; tiny Beauty: {args.users} users; work folder {root} (removed)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
