"""Crafted inputs of issue 22 (loading and validation) run through the `semid` command line on a tiny trained run:
each prints `case | exit status | the error line` (the rows of experiments/results/faults.md's issue-22 section).

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/crafted_inputs.py /tmp/crafted  # about 40 s
"""
# ruff: noqa: E401, E701, E702, E731, E741, E501, I001, F401
import io, json, shutil, sys, contextlib, gzip
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, ".")
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset
from tests.test_causal_run import FLAGS
from generator.models.checkpoint import INTEGRITY_KEY, with_integrity


def run_all() -> None:  # (a script: importing it runs nothing; it deletes and rewrites the folder its argument names)
    root = Path(sys.argv[1]); shutil.rmtree(root, ignore_errors=True); root.mkdir()
    data = write_random_dataset(root / "data"); (root / "ids").mkdir(); write_ids(root / "ids" / "semantic_ids.npz")
    base = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(base), "--final-val-users", "0", *FLAGS]) == 0
    def fresh(n):
        r = root / n; shutil.copytree(base, r); return r
    def run(name, argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try: rc = main(argv)
            except SystemExit as e: rc = e.code
            except BaseException as e: rc = f"traceback {type(e).__name__}: {str(e)[:120]}"
        line = [l for l in err.getvalue().splitlines() if "error" in l or "Error" in l][-1:] or [""]
        print(f"{name} | rc {rc} | {line[0].replace(str(root), '…')[:260]}")
    def resign(r, edit):
        p = r / "checkpoints/best.ckpt"; c = torch.load(p, weights_only=True); c.pop(INTEGRITY_KEY); edit(c); torch.save(with_integrity(c), p)
    rec = lambda r, *a: ["recommend", "--run", str(r), "--history", "1,2", *a]
    r = fresh("ci"); resign(r, lambda c: c["state_dict"]["model.child_index_1"].__setitem__((0, 0), 10**6)); run("child_index out of range", rec(r))
    r = fresh("neg"); resign(r, lambda c: c["state_dict"]["model.child_index_2"].__setitem__((1, 0), -5)); run("negative child_index", rec(r))
    r = fresh("dm"); resign(r, lambda c: c["semid"]["config"].update(d_model=10**6, num_heads=1)); run("d_model 1e6 in checkpoint meta", rec(r))
    r = fresh("pin"); pins = root / "pins"
    with contextlib.redirect_stdout(io.StringIO()) as o: main(["digest", "--run", str(r)])
    pins.write_text(o.getvalue())
    resign(r, lambda c: c["state_dict"]["model.code_bias"].__setitem__(5, c["state_dict"]["model.code_bias"][5] + 50))
    run("re-signed +50 bias, no pin", rec(r)); run("re-signed +50 bias, --expect-sha256 FILE", rec(r, "--expect-sha256", str(pins)))
    r = fresh("yaml"); (r / "config.yaml").write_text((r / "config.yaml").read_text() + "a: &a [x, x, x]\nb: &b [*a, *a, *a]\n"); run("config.yaml with anchors", rec(r))
    r = fresh("bomb"); meta = json.dumps({"format": "semid.semantic_ids", "version": 1, "codebook_sizes": [4, 4, 4, 8]})
    np.savez_compressed(r / "semantic_ids.npz", codes=np.zeros((10**7, 4), dtype=np.int64), item_ids=np.zeros(10**7, dtype=np.int64), meta=np.array(meta))
    run(f"zip bomb semantic_ids.npz ({(r / 'semantic_ids.npz').stat().st_size:,} B, 400 MB inflated)", rec(r))
    hdr = io.BytesIO(); np.lib.format.write_array_header_1_0(hdr, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 384)})
    (root / "item_emb_huge.npy").write_bytes(hdr.getvalue()); run("npy header claiming (1e12, 384)", ["fit-codebooks", "--embeddings", str(root / "item_emb_huge.npy"), "--out", str(root / "cb")])
    r = fresh("meta"); np.savez(r / "semantic_ids.npz", codes=np.zeros((2, 2), dtype=np.int64), item_ids=np.arange(1, 3), meta=np.array("[1]")); run("semantic_ids meta not a dict", rec(r))
    other = Path(shutil.copytree(data, root / "other")); s = (other / "sequences.txt").read_text().splitlines(); (other / "sequences.txt").write_text("\n".join(s[1:] + s[:1]) + "\n")
    run("evaluate --data OTHER (same items, other sequences)", ["evaluate", "--run", str(fresh("fp")), "--data", str(other), "--no-progress"])
    r = fresh("smp"); run("evaluate --max-users 5", ["evaluate", "--run", str(r), "--num-beams", "10", "--max-users", "5", "--no-progress"]); print("   files:", sorted(p.name for p in r.glob("metrics_*")))
    r = fresh("dir"); (r / "metrics_test.json").mkdir(); run("metrics_test.json is a folder", ["evaluate", "--run", str(r), "--no-progress"])
    (root / "x.json.gz").write_bytes(b"garbage"); run("prepare on a non-gzip .gz", ["prepare", "--format", "amazon2014", "--reviews", str(root / "x.json.gz"), "--meta", str(root / "x.json.gz"), "--out", str(root / "p")])
    (root / "t.json.gz").write_bytes(gzip.compress(b'{"asin": "A1"}\n' * 500)[:15]); run("prepare on a truncated .gz", ["prepare", "--format", "amazon2014", "--reviews", str(root / "t.json.gz"), "--meta", str(root / "t.json.gz"), "--out", str(root / "p")])
    d2 = Path(shutil.copytree(data, root / "big")); (d2 / "sequences.txt").write_text((d2 / "sequences.txt").read_text() + f"{2**64} 1 2 3\n")
    run("user id 2**64 in sequences.txt", ["evaluate", "--run", str(fresh("big64")), "--data", str(d2)])
    run("--model-option d_model=!!python/object/apply", ["train", "--data", "d", "--ids", "i", "--out", "o", "--model-option", 'd_model=!!python/object/apply:os.system ["true"]'])
    run("evaluate --max-users abc", ["evaluate", "--run", "r", "--max-users", "abc"])
    run("recommend --alpha 0.3 (beam)", rec(base, "--alpha", "0.3"))
    emb = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32); emb[7] = np.nan; np.save(root / "item_emb_nan.npy", emb)
    run("fit-codebooks, NaN row 7", ["fit-codebooks", "--embeddings", str(root / "item_emb_nan.npy"), "--out", str(root / "cb2"), "--method", "rqkmeans", "--levels", "2", "--codebook-size", "4"])


if __name__ == "__main__":
    run_all()
