"""Identity check for issue 18's fusion / dense-head / add-items merge: every decoder's output on tiny seeded runs.

    python -m experiments.identity_hybrid build  ROOT          # train the tiny runs (with the code checked out now)
    python -m experiments.identity_hybrid decode ROOT NAME     # every decoder of every run -> ROOT/NAME.pt
    python -m experiments.identity_hybrid compare ROOT A B     # bit-identical? (items, scores, codes, fusion files)

Runs (tiny, random data, seed 0): a causal run with content and a dense head (``--dense both``), a plain causal run,
a copy of the first with items added (``semid add-items``), a T5 run with a dense head (``--preset cpu --dense
both``); the T5 run is also decoded with cold items added in process (``generator.runs.cold_items``). Each hybrid
is decoded with the ``hybrid.json`` its training wrote and with a hand-written file of each earlier schema.
The runs are built once, with the code *before* the change; decoding is repeated with the code after it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

SEQ = [[1, 2, 3], [10, 12, 14, 16], [5], [30, 31], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20, 22, 24]]
COMMON = ["--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0"]


def build(root: Path) -> None:
    from semid_cli import main
    from tests.test_generator_helpers import write_random_dataset

    root.mkdir(parents=True, exist_ok=True)
    old = write_random_dataset(root / "old", num_items=34)
    emb = np.random.default_rng(7).normal(size=(40, 16)).astype(np.float32)
    np.save(old / "item_emb_minilm.npy", emb[:34])
    new = write_random_dataset(root / "new", num_items=40, seed=1)
    np.save(new / "item_emb_minilm.npy", emb)
    ids = root / "ids"
    assert main(["fit-codebooks", "--embeddings", str(old / "item_emb_minilm.npy"), "--out", str(ids), "--levels", "2",
                 "--codebook-size", "4", "--no-progress"]) == 0
    train = ["train", "--data", str(old), "--ids", str(ids)]
    assert main([*train, "--out", str(root / "causal"), "--max-epochs", "2", *COMMON, "--dense", "both"]) == 0
    assert main([*train, "--out", str(root / "causal_plain"), "--max-epochs", "2", *COMMON]) == 0
    shutil.copytree(root / "causal", root / "causal_added")
    assert main(["add-items", "--run", str(root / "causal_added"), "--data", str(new)]) == 0
    assert main(["choose-fusion", "--run", str(root / "causal_added")]) == 0
    assert main([*train, "--out", str(root / "t5"), "--preset", "cpu", "--max-epochs", "1", *COMMON, "--user-tokens", "32",
                 "--warmup-steps", "4", "--lr", "3e-3", "--dense", "both", "--dense-embeddings", "minilm"]) == 0


def _ranking(r) -> dict[str, torch.Tensor]:
    return {"items": r.items.cpu(), "scores": r.scores.cpu(), "codes": r.codes.cpu(), "score": r.score, "leaves": r.leaves}


def _decode_run(run, names: list[str], **kw) -> dict[str, dict]:
    from generator.runs.batches import history_batches
    from generator.runs.decoders import decoders_for

    hist = [np.array([i for i in h if i <= run.ids.num_items]) for h in SEQ]
    batch = history_batches(run, hist, None, 64)[0]
    out = {}
    for name in names:  # a handful of decoders
        dec = decoders_for(run, [name], **kw)[name]
        with torch.inference_mode():
            out[name] = _ranking(dec(batch, 5))
    return out


def decode(root: Path, name: str) -> None:
    from generator.runs.folder import HYBRID_FILE, load_run
    from generator.runs.fusion_store import choice_key

    torch.manual_seed(0)
    result: dict[str, object] = {}
    for folder, names in (("causal", ["beam", "exact", "dense", "hybrid"]), ("causal_plain", ["beam", "exact", "dense"]),
                          ("causal_added", ["beam", "exact", "dense", "hybrid", "cold-beam"]),
                          ("t5", ["beam", "dense", "hybrid"])):
        run = load_run(root / folder)
        stored = (root / folder / HYBRID_FILE)
        result[f"{folder}/hybrid.json"] = json.loads(stored.read_text()) if stored.is_file() else None
        result[folder] = _decode_run(run, names)
        if "hybrid" in names:  # the two earlier schemas, written by hand
            keep = stored.read_bytes()
            key = {**choice_key(run), "num_candidates": min(50, run.ids.num_items)}
            try:
                stored.write_text(json.dumps({"alpha": 0.3, "metric": "ndcg@10", **key}))
                if run.design == "t5":
                    result[f"{folder}/old-alpha"] = _decode_run(run, ["hybrid"])
                for kind, params in (("blend", {"alpha": 0.3}), ("rrf", {"k0": 5.0}), ("liger", {})):
                    stored.write_text(json.dumps({"fusion": kind, "params": params, "metric": "ndcg@10", **key}))
                    if run.design == "causal":  # (a T5 run's old schema is the alpha alone)
                        result[f"{folder}/old-{kind}"] = _decode_run(run, ["hybrid"])
                result[f"{folder}/alpha=0.7"] = _decode_run(run, ["hybrid"], alpha=0.7)
            finally:
                stored.write_bytes(keep)
        if folder == "t5":  # cold items added in process (semid.coldstart's path): T5 dense over the grown head
            from generator.runs.cold_items import add_cold_items
            from generator.t5.design import dense_head as load_run_head
            from rqvae import load_quantizer
            from semid.data import load_dataset

            new = load_dataset(root / "new")
            emb = np.asarray(new.embeddings("minilm"), dtype=np.float32)
            q = load_quantizer(root / "ids" / "quantizer.pt")
            head = load_run_head(run)
            cat = add_cold_items(run.ids, run.layout, emb[34:], np.arange(35, 41), encode=q.encode, head=head)
            from generator.t5.dense import T5Dense

            run.ids, run.tree = cat.ids, cat.tree
            batch_hist = [np.array(h) for h in SEQ]
            from generator.runs.batches import history_batches

            b = history_batches(run, batch_hist, None, 64)[0]
            with torch.inference_mode():
                result["t5_cold/dense"] = _ranking(T5Dense(run.model, cat.head, cat.ids)(b, 5))
                result["t5_cold/vectors"] = cat.head.item_vectors().detach()
    torch.save(result, root / f"{name}.pt")
    print(f"wrote {root / (name + '.pt')} ({len(result)} entries)")


def _same(a: object, b: object, where: str, bad: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            bad.append(f"{where}: keys {sorted(set(a) ^ set(b))}")
        for k in set(a) & set(b):
            _same(a[k], b[k], f"{where}/{k}", bad)
    elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.nan_to_num(), b.nan_to_num()):
            bad.append(f"{where}: tensors differ")
    elif a != b:
        bad.append(f"{where}: {a!r} != {b!r}")


def compare(root: Path, a: str, b: str) -> int:
    x, y = torch.load(root / f"{a}.pt", weights_only=True), torch.load(root / f"{b}.pt", weights_only=True)  # no unpickling
    bad: list[str] = []
    _same(x, y, "", bad)
    rows = sorted(k for k in x if not k.endswith(".json"))
    for k in rows:
        v = x[k]
        names = [n for n in v if isinstance(v[n], dict)] if isinstance(v, dict) and "items" not in v else ["-"]
        status = "identical" if not any(e.startswith(f"/{k}") for e in bad) else "DIFFERENT"
        print(f"| {k} | {', '.join(names)} | {status} |")
    print("ALL IDENTICAL" if not bad else "\n".join(bad))
    return 0 if not bad else 1


if __name__ == "__main__":
    cmd, root = sys.argv[1], Path(sys.argv[2])
    if cmd == "build":
        build(root)
    elif cmd == "decode":
        decode(root, sys.argv[3])
    else:
        sys.exit(compare(root, sys.argv[3], sys.argv[4]))
