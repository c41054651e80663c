"""Scale: what semid costs from Beauty's 12k items to synthetic catalogues of 100k and 1M items, on one CPU thread.

    OMP_NUM_THREADS=1 python -m experiments.scale [--sizes beauty,100000,1000000] [--steps 6] [--users 128]
    python -m experiments.scale --phases codebooks,train-sampled,train-sparse --out scale_sparse   # training only
    python -m experiments.scale --sizes beauty,1000000 --phases decode --ids /tmp/ids --decoders beam,exact,dense \
        --out scale_decode   # decoding only, on the IDs an earlier run with --ids /tmp/ids --phases codebooks kept

Catalogues. ``beauty``: Amazon Beauty, real (MiniLM embeddings, the users' real sequences). Every other size is
SYNTHETIC: 64-d item embeddings drawn around N/50 Gaussian cluster centres; power-law (Zipf) item popularity within
a cluster; 20k users, each following one cluster (sequences of 5 to 50 items, 90% from the user's cluster by
popularity, 10% uniform). Synthetic catalogues measure cost, never quality.

Each (size, phase) runs in its own process, so its peak memory (``ru_maxrss``) is that phase's alone:

- ``codebooks``: ``fit_codebooks`` (residual k-means, 3 x 256, balanced last level; from 100k items on, centres on
  a 65,536-item sample, ``--fit-sample``), seconds, collisions, codes used; semantic IDs and the prefix tree (bytes
  per item).
- ``train-full`` / ``train-sampled`` / ``train-sparse``: the causal preset's joint training step (batches of 128
  windows of <= 50 positions, AdamW), dense head with the full softmax or the sampled one (1,024 uniform negatives +
  in-batch, log-Q correction), and the sampled one with sparse tables (``sparse_tables``: sparse gradients for the item
  table and node vectors, the run's own lazy AdamW): ms per step, split into forward + backward and the optimiser
  step, and peak memory.
- ``decode``: decoders built once (item paths, edge tables, item vectors), then users per CPU second (one thread;
  per wall-clock second too, in the JSON) for ``beam`` (20 beams), ``exact`` (chunked under a 256 MiB budget),
  ``dense`` exact (torch, chunked), and with ``faiss`` in ``--decoders`` faiss ``IndexFlatIP`` and the approximate
  IVF (sqrt(N) lists, 32 probed and 128), whose recall@10 against exact is reported. Memory: the model's tensors,
  the decoders' (paths, edge tables, item vectors), the process's peak after the model, after the build and at
  the end (serving), what the model keeps after the build (its N-row tables released as a served run's are;
  ``--keep-model-tables`` keeps them, and passes the old code nothing new) and the process's RSS at the end
  (serving RSS). ``--table-dtype`` stores the serving tables in 16 bits. The phase builds the model from the IDs
  alone (no catalogue, no training windows).

Writes ``experiments/results/scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
BEAUTY = Path("/work/shared/data/beauty")
DIM, USERS, SEED = 64, 20_000, 0
PHASES = ("codebooks", "train-full", "train-sampled", "train-sparse", "checkpoint", "decode")
DECODE_PARTS = ("beam", "exact", "dense", "faiss")
CHUNK = 1 << 20  # rows of a synthetic catalogue drawn at a time
FULL_SOFTMAX_MAX_BYTES = 4 * 2**30  # the full softmax's (positions x items) logits, its gradient and softmax: skip above


# ---- catalogues ------------------------------------------------------------------------------------------------------
def catalogue(size: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(embeddings (N, D) float32, user sequences of item ids in [1, N])."""
    if size == "beauty":
        from semid.data import load_dataset
        from semid.split import leave_one_out

        dataset = load_dataset(BEAUTY)
        return np.load(BEAUTY / "item_emb_minilm.npy").astype(np.float32), leave_one_out(dataset).train
    N = int(size)
    rng = np.random.default_rng(SEED)
    C = max(1, N // 50)
    cluster = np.arange(N) % C  # item i is the (i // C)-th most popular of cluster i % C
    centres = rng.standard_normal((C, DIM)).astype(np.float32) * 2
    emb = np.empty((N, DIM), dtype=np.float32)
    for a in range(0, N, CHUNK):  # in chunks, the same draws as one: no (N, D) float64 array at 10M items
        emb[a : a + CHUNK] = centres[cluster[a : a + CHUNK]] + rng.standard_normal((min(CHUNK, N - a), DIM)).astype(np.float32)
    lengths = rng.integers(5, 51, USERS)
    user_cluster = np.repeat(rng.integers(0, C, USERS), lengths)
    size_of = np.bincount(cluster, minlength=C)
    rank = np.minimum(rng.zipf(1.3, lengths.sum()) - 1, size_of[user_cluster] - 1)
    items = user_cluster + C * rank
    stray = rng.random(lengths.sum()) < 0.1
    items[stray] = rng.integers(0, N, int(stray.sum()))
    return emb, np.split(items + 1, np.cumsum(lengths)[:-1])


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- phases (each in its own process) --------------------------------------------------------------------------------
def phase_codebooks(size: str, work: Path) -> dict:
    from rqvae import RQKMeansConfig, fit_codebooks
    from semid.ids import SemanticIDs
    from semid.tree import PrefixTree

    emb, _ = catalogue(size)
    N = emb.shape[0]
    sample = 65_536 if N > 65_536 else None
    fit = fit_codebooks(emb, RQKMeansConfig(levels=3, codebook_size=256, balanced=True, fit_sample=sample), progress=False)
    extra = max(256, fit.stats.largest_group)
    ids = SemanticIDs.from_codes(fit.codes, [256] * 3, extra_level_size=extra)
    ids.save(work / f"ids_{size}.npz")
    start = time.perf_counter()
    tree = PrefixTree.from_semantic_ids(ids, ids.layout(0))
    tree_s = time.perf_counter() - start
    return {"items": N, "dim": int(emb.shape[1]), "fit_sample": sample, "fit_s": fit.seconds,
            "colliding": fit.stats.fraction_colliding, "largest_group": fit.stats.largest_group,
            "codes_used": [lv.codes_used for lv in fit.stats.levels], "rel_error": fit.stats.reconstruction_rel,
            "tree_s": tree_s, "tree_bytes": tree.nbytes, "tree_bytes_per_item": tree.nbytes / N, "peak_mb": peak_mb()}


def _model(size: str, work: Path, dense_loss: str, sparse: bool = False, with_windows: bool = True):  # noqa: ANN202
    from generator.models.dense_loss import log_popularity
    from generator.runs.options import preset
    from generator.training.causal_data import training_windows
    from generator.training.causal_system import CausalSystem
    from semid.ids import SemanticIDs
    from semid.tree import PrefixTree

    ids = SemanticIDs.load(work / f"ids_{size}.npz")
    layout = ids.layout(0)
    config = replace(preset("causal"), dense_loss=dense_loss, sparse_tables=sparse)
    windows = training_windows(catalogue(size)[1], ids, config.max_history) if with_windows else None
    log_q = None
    if dense_loss == "sampled":
        log_q = log_popularity(windows.targets[windows.targets >= 0], len(ids.item_ids))
    tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes)))
    tree = PrefixTree.from_semantic_ids(ids, layout)
    torch.manual_seed(SEED)
    system = CausalSystem(config, layout, tokens, torch.from_numpy(ids.item_ids), "-", tree, log_q=log_q)
    system.log = lambda *a, **k: None
    return system, windows, ids, tree


def phase_train(size: str, work: Path, head: str, steps: int) -> dict:
    from generator.training.causal_data import collate_windows

    dense_loss = "full" if head == "full" else "sampled"
    system, windows, ids, _ = _model(size, work, dense_loss, sparse=head == "sparse")
    N = len(ids.item_ids)
    rng = np.random.default_rng(SEED)
    batches = [rng.choice(len(windows.start), 128, replace=False) for _ in range(steps + 2)]
    counts = [int((collate_windows(windows, b).targets >= 0).sum()) for b in batches]
    positions = max(counts)
    if dense_loss == "full" and 3 * positions * N * 4 > FULL_SOFTMAX_MAX_BYTES:
        return {"skipped": f"full softmax logits, their softmax and gradient would take {3 * positions * N * 4 / 2**30:.0f} GiB "
                f"({positions} positions x {N} items)", "peak_mb": peak_mb()}
    # the run's own optimiser with sparse tables (lazy AdamW over its parameter groups), torch's AdamW otherwise
    opt = system.configure_optimizers()["optimizer"] if head == "sparse" else torch.optim.AdamW(system.parameters(), lr=1e-3)
    fwd_bwd = opt_s = 0.0
    for i, index in enumerate(batches):  # 2 warm-up steps, then `steps` timed ones
        b = collate_windows(windows, index)
        t0 = time.perf_counter()
        loss = system.training_step(b, 0)
        opt.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= 2:
            fwd_bwd, opt_s = fwd_bwd + t1 - t0, opt_s + t2 - t1
    params = sum(p.numel() for p in system.parameters())
    return {"positions": float(np.mean(counts[2:])), "ms_step": 1000 * (fwd_bwd + opt_s) / steps, "ms_fwd_bwd": 1000 * fwd_bwd / steps, "ms_opt": 1000 * opt_s / steps,
            "params_m": params / 1e6, "peak_mb": peak_mb()}


def rss_mb() -> float:
    """The process's resident memory now (``peak_mb`` is its peak so far)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensor_mb(*objs: object) -> float:
    """MB held by the tensors in ``objs`` (tensors, and lists / tuples / namedtuples / objects' attributes of them)."""
    seen: set[int] = set()

    def walk(x: object) -> int:
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return x.untyped_storage().nbytes()
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return sum(walk(v) for v in vars(x).values()) if hasattr(x, "__dict__") else 0

    return sum(walk(o) for o in objs) / 2**20


def rss_parts() -> tuple[float, float]:
    """(anonymous, file-backed) resident MB now: a mapped checkpoint's pages are file-backed (the kernel can drop
    them and read them again: page cache), what the process itself allocated is anonymous."""
    with open("/proc/self/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}
    return kb["RssAnon"] / 1024, kb["RssFile"] / 1024


class AnonPeak:
    """The largest anonymous RSS seen, sampled every 10 ms by a thread (ru_maxrss counts a mapped file's pages)."""

    def __init__(self) -> None:
        self.peak, self._stop = rss_parts()[0], threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_parts()[0])

    def read(self) -> float:
        return max(self.peak, rss_parts()[0])


def phase_checkpoint(size: str, work: Path) -> dict:
    """The size's model (the causal preset, one member, random weights) written as a semid checkpoint, what the
    decode phase serves from with ``--from-checkpoint``."""
    from generator.models.checkpoint import CHECKPOINT_KEY, STATE_PREFIX, ids_digest, with_integrity
    from generator.models.dense import deferred_tables
    from generator.models.ensemble import build_causal
    from generator.runs.options import preset
    from semid.ids import SemanticIDs
    from semid.io import atomic_open

    anon = AnonPeak()
    ids = SemanticIDs.load(work / f"ids_{size}.npz")
    layout, config = ids.layout(0), preset("causal")
    torch.manual_seed(SEED)
    with deferred_tables():  # the N-row tables made below, file-backed: 10M items' model whole is ~17 GB
        model = build_causal(config, layout, torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes))))
    state = model.state_dict()
    start = time.perf_counter()
    g = torch.Generator().manual_seed(SEED)
    for name, t in state.items():  # as the model initialises them: node vectors 0, the item table N(0, 1/d)
        if t.is_meta:
            file = work / f"table_{size}.{name}"
            with open(file, "wb") as f:
                f.truncate(t.numel() * 4)  # a sparse file of zeros
            state[name] = torch.from_file(str(file), shared=True, size=t.numel(), dtype=torch.float32).view(t.shape)
            file.unlink()  # (the mapping keeps it until the tensor goes)
            if name.endswith("item_table"):
                for part in state[name].split(CHUNK):  # loop over chunks of rows
                    part.copy_(torch.randn(part.shape, generator=g) * t.shape[1] ** -0.5)
    meta = {"config": config.to_dict(), "layout": layout.to_dict(), "ids_digest": ids_digest(ids)}
    ckpt = with_integrity({CHECKPOINT_KEY: meta, "state_dict": {STATE_PREFIX + k: v for k, v in state.items()}})
    path = work / f"model_{size}.ckpt"
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)
    return {"items": len(ids.item_ids), "model_mb": tensor_mb(list(state.values())),
            "file_mb": path.stat().st_size / 2**20, "save_s": time.perf_counter() - start, "peak_mb": peak_mb(),
            "anon_peak_mb": anon.read()}


def phase_decode(size: str, work: Path, users: int, decoders: list[str], table_dtype: str = "float32",
                 keep_tables: bool = False, from_checkpoint: bool = False) -> dict:
    from generator.decoding.causal import CausalDecoders
    from generator.decoding.mips import dense_index
    try:
        from generator.decoding.paths import trim_heap
    except ImportError:  # code from before it (the harness measures older code too)
        def trim_heap() -> bool:
            return False

    anon = AnonPeak()
    start = time.perf_counter()
    if from_checkpoint:  # what a server does (Recommender.from_run): the checkpoint mapped, the model built around it
        from generator.designs.registry import load_checkpoint
        from semid.ids import SemanticIDs
        from semid.tree import PrefixTree

        ids = SemanticIDs.load(work / f"ids_{size}.npz")
        model = load_checkpoint(work / f"model_{size}.ckpt", ids, mmap=True).model
        try:  # a lean build reads no prefix tree, and from_run builds none for it (older code: always built)
            from generator.decoding.causal import drops_tree
            lean = drops_tree(model, not keep_tables)
        except ImportError:
            lean = False
        tree = None if lean else PrefixTree.from_semantic_ids(ids, ids.layout(0))
    else:
        system, _, ids, tree = _model(size, work, "full", with_windows=False)
        model = system.model.eval()
        del system  # the model is all the decoders read (the training system holds nothing else of size here)
    load_s = time.perf_counter() - start
    N = len(ids.item_ids)
    g = torch.Generator().manual_seed(SEED)
    h = torch.randn(users, model.config.d_model, generator=g)
    out: dict = {"users": users, "decoders": decoders, "tree_mb": 0.0 if tree is None else tree.nbytes / 2**20,
                 "model_mb": tensor_mb(list(model.parameters()), list(model.buffers())), "model_peak_mb": peak_mb()}
    rss = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    # the options only where they are not the defaults, so that this harness also measures code from before them
    options = {} if table_dtype == "float32" else {"table_dtype": table_dtype}
    dec = CausalDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=20, dense_index="exact", **options)
    dec = dec.refresh() if keep_tables else dec.refresh(release=True)
    out["build_s"], out["build_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    out["build_peak_mb"] = peak_mb()
    out["build_rss_added_mb"] = rss_mb() - rss  # what the decoders keep (paths, edge tables, item vectors), less what was freed
    out["model_after_mb"] = tensor_mb(list(model.parameters()), list(model.buffers()))  # what serving keeps of the model
    out["table_dtype"], out["kept_model_tables"] = table_dtype, keep_tables
    out["paths_mb"], out["tables_mb"] = tensor_mb(dec.paths, dec.edge_slots), tensor_mb(dec.tables, getattr(dec, "edge_rows", None))
    out["vectors_mb"] = tensor_mb(dec._vectors)
    # a served run drops its prefix tree where its beam walks the paths' index (CausalDecoders.tree None): so does this
    out["tree_kept_mb"] = out["tree_mb"] if getattr(dec, "tree", tree) is not None else 0.0
    out["input_from_vectors"] = getattr(model, "_input_vectors", None) is not None
    if not out["tree_kept_mb"]:
        del tree
    if from_checkpoint:  # the model's rest copied: the file is unmapped (Recommender.from_run)
        from generator.models.checkpoint import own_tensors

        own_tensors(model, buffers=False)
    trim_heap()  # (the build trims; the tree's pages too)
    out["build_rss_mb"] = rss_mb()  # what serving holds before its first request: model rest, IDs, decoders, Python, torch
    out["from_checkpoint"], out["load_s"] = from_checkpoint, load_s
    out["build_anon_mb"], out["build_file_mb"] = rss_parts()
    out["startup_anon_peak_mb"] = anon.read()  # load and build: the most anonymous memory start-up held

    def rate(name: str) -> tuple[float, float, torch.Tensor]:
        """Users per CPU and per wall second: the median of up to five timed calls (fewer when they pass 10 CPU s;
        one call of this VM's moves by up to 1.7x), after a warm-up call of the same batch (its temporaries allocated
        once, as in a running server)."""
        dec.decode(name, h, k=10)
        cpu, wall = [], []
        while len(cpu) < 5 and sum(cpu) < 10:  # loop over timed calls
            t0, c0 = time.perf_counter(), time.process_time()
            r = dec.decode(name, h, k=10)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
        return users / statistics.median(cpu), users / statistics.median(wall), r.items

    for name in ("beam", "exact", "dense"):  # users per CPU second (one thread), and per wall-clock second
        if name in decoders:
            key = "dense_exact" if name == "dense" else name
            out[f"{key}_users_s"], out[f"{key}_users_wall_s"], items = rate(name)
    if "faiss" in decoders:  # against the exact dense ranking
        exact_items = items if "dense" in decoders else dec.decode("dense", h, k=10).items
        q = model.dense_queries(h).detach()
        for key, kind, nprobe in (("flat", "faiss-flat", None), ("ivf", "faiss-ivf", 32), ("ivf128", "faiss-ivf", 128)):
            t0 = time.perf_counter()  # the dense decoder's faiss path: the index's search, rows -> items
            if nprobe != 128:
                index = dense_index(dec._vectors, kind)
                out[f"{key}_build_s"] = time.perf_counter() - t0
            else:  # the same IVF index, 128 of its lists visited
                index._backend.nprobe = min(128, index._backend.nlist)
            index.search(q[:4], 10)
            t0 = time.perf_counter()
            rows = index.search(q, 10).item_ids
            out[f"dense_{key}_users_s"] = users / (time.perf_counter() - t0)
            found = torch.where(rows >= 0, dec.item_ids[rows.clamp_min(0)], -1)
            hits = (found.unsqueeze(2) == exact_items.unsqueeze(1)).any(2).float().sum(1)  # (B,) of the exact top 10
            out[f"{key}_recall@10"] = float((hits / 10).mean())
    out["serve_peak_mb"] = peak_mb()
    out["serve_rss_mb"] = rss_mb()  # the serving process now: the model's rest, tree, IDs, decoders, Python and torch
    out["serve_anon_mb"], out["serve_file_mb"] = rss_parts()
    out["anon_peak_mb"] = anon.read()
    out["items"] = N
    return out


# ---- the driver ------------------------------------------------------------------------------------------------------
def run_phase(size: str, phase: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "experiments.scale", "--phase", phase, "--size", size, "--work", str(work),
           "--steps", str(args.steps), "--users", str(args.users), "--decoders", args.decoders,
           "--table-dtype", args.table_dtype, *(["--keep-model-tables"] if args.keep_model_tables else []),
           *(["--from-checkpoint"] if args.from_checkpoint else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    print(f"{size} {phase}: {out}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="beauty,100000,1000000")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per row (after 2 warm-up steps)")
    p.add_argument("--users", type=int, default=128, help="users decoded per decoder")
    p.add_argument("--others", default="two one-thread training jobs of the lead", help="what else ran on the machine")
    p.add_argument("--phases", default=",".join(PHASES), help="phases to run per size (the train phases need codebooks)")
    p.add_argument("--out", default="scale", help="report name under experiments/results/ (.md and .json)")
    p.add_argument("--decoders", default=",".join(DECODE_PARTS),
                   help="what the decode phase measures: beam, exact, dense (exact torch), faiss (flat and IVF indexes)")
    p.add_argument("--jobs", type=int, default=1, help="sizes measured side by side (each phase is still one "
                   "process on one thread; the decode phase's rates are per CPU second)")
    p.add_argument("--ids", type=Path, help="keep the codebooks phase's semantic IDs in this folder and read them from "
                   "there (a later run may then leave the codebooks phase out); default: a temporary folder")
    p.add_argument("--table-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="decode: the serving tables' storage (edge tables, item vectors)")
    p.add_argument("--keep-model-tables", action="store_true", help="decode: keep the model's N-row tables after the "
                   "build (the behaviour before they were released; default: released as a served run does)")
    p.add_argument("--from-checkpoint", action="store_true", help="decode: serve the model the checkpoint phase wrote, "
                   "memory-mapped as a server loads it (Recommender.from_run); default: a model built in the process")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    decoders = args.decoders.split(",")
    if not decoders or not set(decoders) <= set(DECODE_PARTS):
        p.error(f"--decoders must name some of {','.join(DECODE_PARTS)}, got {args.decoders!r}")
    if args.jobs < 1:
        p.error(f"--jobs must be a positive int, got {args.jobs}")
    torch.set_num_threads(1)
    if args.phase:
        if args.phase == "codebooks":
            out = phase_codebooks(args.size, args.work)
        elif args.phase == "checkpoint":
            out = phase_checkpoint(args.size, args.work)
        elif args.phase == "decode":
            out = phase_decode(args.size, args.work, args.users, decoders, args.table_dtype, args.keep_model_tables,
                               args.from_checkpoint)
        else:
            out = phase_train(args.size, args.work, args.phase.split("-")[1], args.steps)
        print(json.dumps(out))
        return
    results: dict = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) if args.ids is None else args.ids
        work.mkdir(parents=True, exist_ok=True)
        sizes = args.sizes.split(",")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # sizes side by side; a size's phases in order
            rows = pool.map(lambda size: {ph: run_phase(size, ph, work, args) for ph in args.phases.split(",")}, sizes)
            results = dict(zip(sizes, rows, strict=True))
    total = time.perf_counter() - start
    from experiments.scale_report import write_report

    write_report(results, args, total, RESULTS, shlex.join(["python", "-m", "experiments.scale", *sys.argv[1:]]), args.out)


if __name__ == "__main__":
    main()
