"""Decoding speed: generate + dict trie vs generate + PrefixTreeLogitsProcessor vs beam_search; prefix-tree scale.

    python -m experiments.decoding_speed [--ids IDS/semantic_ids.npz] [--run RUN] [--data ../shared/data/beauty]

Part 1 (Beauty): users/second of three constrained top-k decoders on the same histories, timed chunk by chunk and
interleaved (so a load change on a shared machine hits all three alike), their ratios, the share of (b)'s time
spent inside the processor, and whether the three return identical items.
  (a) ``model.generate`` + ``prefix_allowed_tokens_fn`` over a Python dict trie (the common practice: GENRE, LETTER)
  (b) ``generator.t5.generate.generate_beam_search`` (``model.generate`` + ``PrefixTreeLogitsProcessor``)
  (c) ``generator.t5.beam.beam_search``
Part 2 (scale): ``PrefixTree`` build time, bytes and per-step masking time (``allowed_mask`` + ``next_nodes`` for
2,560 beams) on 10k .. 10M random 4-level tuples of 256 codes.

Writes the printed report and the command to ``experiments/results/decoding_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from transformers import T5ForConditionalGeneration

import generator.t5.generate as decode
from generator.t5.beam import beam_search
from semid.ids import SemanticIDs
from semid.io import atomic_open, write_json
from semid.layout import TokenLayout
from semid.processor import PrefixTreeLogitsProcessor
from semid.tree import PrefixTree

RESULTS = Path(__file__).parent / "results"
SCALE_SIZES = {"10k": 10_000, "100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}


class Report:
    """Collects printed lines (for the markdown file) and numbers (for the json file)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.numbers: dict[str, object] = {}

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# ---- semantic IDs, histories, model --------------------------------------------------------------------------------
def residual_kmeans_ids(embeddings: np.ndarray, levels: int = 3, codebook: int = 256, seed: int = 0) -> SemanticIDs:
    """3 x 256 residual k-means codes (scikit-learn KMeans level by level) + SemanticIDs' extra level."""
    from sklearn.cluster import KMeans

    residual = embeddings.astype(np.float64)
    codes = []
    for _ in range(levels):
        km = KMeans(n_clusters=codebook, n_init=1, random_state=seed).fit(residual)
        codes.append(km.labels_)
        residual = residual - km.cluster_centers_[km.labels_]
    codes = np.stack(codes, axis=1)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return SemanticIDs.from_codes(codes, (codebook,) * levels, extra_level_size=int(counts.max()))


def test_histories(data: Path, ids: SemanticIDs, layout: TokenLayout, num_users: int, seed: int, max_items: int = 20):
    """Encoder inputs of ``num_users`` random users: [user token] + code tokens of the <= 20 items before the last.

    Returns input_ids (B, S), attention_mask (B, S) right-padded with pad, and the users' ids.
    """
    users, histories = [], []
    for line in (data / "sequences.txt").read_text().splitlines():
        user, *items = (int(x) for x in line.split())
        if len(items) >= 2:
            users.append(user)
            histories.append(items[:-1][-max_items:])  # the last item is the test target
    pick = np.sort(np.random.default_rng(seed).choice(len(users), size=min(num_users, len(users)), replace=False))
    tokens = np.asarray(layout.codes_to_tokens(ids.codes))  # (N, L), row of item ids.item_ids[row]
    user_tok = layout.user_tokens(np.asarray([users[i] for i in pick], dtype=np.int64))
    rows = [np.concatenate([[user_tok[j]], tokens[ids.rows_of(np.asarray(histories[i]))].reshape(-1)]) for j, i in enumerate(pick)]
    S = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), S), layout.pad_token_id, dtype=torch.long)
    for j, r in enumerate(rows):  # input preparation, not timed
        input_ids[j, : len(r)] = torch.from_numpy(r)
    return input_ids, (input_ids != layout.pad_token_id).long(), [users[i] for i in pick]


def tiger_model(layout: TokenLayout, seed: int = 0) -> T5ForConditionalGeneration:
    """The ``tiger`` preset with random weights (decoding cost does not depend on the weights)."""
    from generator.t5.model import build_model, preset

    torch.manual_seed(seed)
    return build_model(preset("tiger"), layout).eval()


def trained_model(run: Path, ids: SemanticIDs) -> tuple[T5ForConditionalGeneration, TokenLayout]:
    """The newest checkpoint of a training run folder (checked against ``ids``) and its token layout."""
    from generator.designs.registry import load_checkpoint

    ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(f"{run / 'checkpoints'}: no *.ckpt here")
    loaded = load_checkpoint(ckpts[-1], ids)
    return loaded.model.eval(), loaded.layout


# ---- the three decoders --------------------------------------------------------------------------------------------
class DictTrie:
    """The common practice: nested Python dicts of token -> child, walked per beam in a callback."""

    def __init__(self, tokens: np.ndarray, item_ids: np.ndarray, layout: TokenLayout) -> None:
        self.root: dict = {}
        self.items: dict[tuple[int, ...], int] = {}
        self.eos, self.pad = layout.eos_token_id, layout.pad_token_id
        for seq, item in zip(tokens.tolist(), item_ids.tolist(), strict=True):
            node = self.root
            for tok in [*seq, self.eos]:
                node = node.setdefault(tok, {})
            self.items[tuple(seq)] = item

    def allowed(self, batch_id: int, sent: torch.Tensor) -> list[int]:
        node = self.root
        for tok in sent.tolist()[1:]:  # drop the decoder start token
            node = node.get(tok)
            if node is None:
                return [self.pad]  # off the tree: only reached by beams whose score is already -inf
        return list(node) or [self.pad]


def dict_trie_topk(model, input_ids, attention_mask, trie: DictTrie, layout: TokenLayout, *, k: int, num_beams: int):
    """(a): stock generate + prefix_allowed_tokens_fn, same search settings as generate_beam_search."""
    L, B = layout.num_levels, input_ids.shape[0]
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, num_return_sequences=k,
        max_new_tokens=L + 1, min_new_tokens=0, do_sample=False, early_stopping=True, length_penalty=0.0,
        renormalize_logits=True, prefix_allowed_tokens_fn=trie.allowed, decoder_start_token_id=layout.bos_token_id,
        pad_token_id=layout.pad_token_id, eos_token_id=layout.eos_token_id, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    items = torch.tensor([trie.items[tuple(s)] for s in out.sequences[:, 1 : L + 1].tolist()]).view(B, k)
    return items, out.sequences_scores.view(B, k).float()


class TimedProcessor(PrefixTreeLogitsProcessor):
    """PrefixTreeLogitsProcessor that adds the time spent in each call to ``seconds``."""

    seconds = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().__call__(input_ids, scores)
        _sync(out.device)
        TimedProcessor.seconds += time.perf_counter() - t0
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def decoding_benchmark(model, ids: SemanticIDs, layout: TokenLayout, input_ids, attention_mask, args, report: Report) -> None:
    """Part 1: the hook for any model (random tiger preset or a trained run)."""
    device = model.device
    tree = PrefixTree.from_semantic_ids(ids, layout).to(device)
    trie = DictTrie(np.asarray(layout.codes_to_tokens(ids.codes)), ids.item_ids, layout)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    B, chunk, k, M = input_ids.shape[0], args.gen_batch, args.k, args.beams
    decoders = {
        "a": lambda x, am: dict_trie_topk(model, x, am, trie, layout, k=k, num_beams=M),
        "b": lambda x, am: decode.generate_beam_search(model, x, am, tree, layout, k=k, num_beams=M)[:2],
        "c": lambda x, am: beam_search(model, x, am, tree, layout, k=k, num_beams=M, batch_size=args.beam_batch)[:2],
    }
    seconds = dict.fromkeys(decoders, 0.0)
    results: dict[str, list] = {name: [] for name in decoders}
    TimedProcessor.seconds = 0.0
    with mock.patch.object(decode, "PrefixTreeLogitsProcessor", TimedProcessor):
        for fn in decoders.values():  # warm-up (allocator, kernels), not timed
            fn(input_ids[:8], attention_mask[:8])
        TimedProcessor.seconds = 0.0
        for i in range(0, B, chunk):  # interleaved: each chunk through (a), (b), (c)
            x, am = input_ids[i : i + chunk], attention_mask[i : i + chunk]
            for name, fn in decoders.items():
                out, dt = _timed(lambda fn=fn, x=x, am=am: fn(x, am), device)
                seconds[name] += dt
                results[name].append([t.cpu() for t in out])
    items = {n: torch.cat([r[0] for r in rs]) for n, rs in results.items()}
    scores = {n: torch.cat([r[1] for r in rs]) for n, rs in results.items()}
    ups = {n: B / s for n, s in seconds.items()}
    share = TimedProcessor.seconds / seconds["b"]
    same_ab, same_bc = torch.equal(items["a"], items["b"]), torch.equal(items["b"], items["c"])
    dscore = float(max((scores["a"] - scores["c"]).abs().max(), (scores["b"] - scores["c"]).abs().max()))
    names = {
        "a": "(a) generate + prefix_allowed_tokens_fn (dict trie)",
        "b": "(b) generate + PrefixTreeLogitsProcessor",
        "c": "(c) beam_search",
    }
    report(f"{B} users, k = {k}, beams = {M}; (a), (b) in generate calls of {chunk} users; (c) batch_size={args.beam_batch}")
    report()
    report("| decoder | seconds | users/s |")
    report("| --- | ---: | ---: |")
    for n in decoders:
        report(f"| {names[n]} | {seconds[n]:.2f} | {ups[n]:.1f} |")
    report()
    report(f"- (c)/(a) = **{ups['c'] / ups['a']:.1f}x** (target >= 5x); (c)/(b) = **{ups['c'] / ups['b']:.1f}x**")
    report(f"- processor share of (b): **{100 * share:.2f}%** ({TimedProcessor.seconds:.3f} s of {seconds['b']:.2f} s; target <= 2%)")
    report(f"- identical items: (a) == (b): {same_ab}, (b) == (c): {same_bc}; max |score difference| vs (c): {dscore:.2e}")
    report.numbers["decoding"] = {
        "users": B, "k": k, "beams": M, "generate_batch": chunk, "seconds": seconds, "users_per_second": ups,
        "ratio_c_over_a": ups["c"] / ups["a"], "ratio_c_over_b": ups["c"] / ups["b"], "processor_share_b": share,
        "processor_seconds": TimedProcessor.seconds, "identical_a_b": same_ab, "identical_b_c": same_bc,
        "max_abs_score_diff": dscore,
    }  # fmt: skip


# ---- part 2: prefix-tree scale -------------------------------------------------------------------------------------
def random_tuples(n: int, levels: int, codebook: int, seed: int) -> np.ndarray:
    """n distinct random code tuples (n, levels) in [0, codebook), in random order."""
    rng = np.random.default_rng(seed)
    space = codebook**levels
    keys = np.unique(rng.integers(0, space, size=int(n * 1.02) + 16, dtype=np.int64))
    while keys.size < n:  # very unlikely: top up
        keys = np.unique(np.concatenate([keys, rng.integers(0, space, size=n, dtype=np.int64)]))
    keys = rng.permutation(keys)[:n]
    return np.stack([(keys // codebook ** (levels - 1 - lv)) % codebook for lv in range(levels)], axis=1)


def scale_benchmark(sizes: list[str], beams: int, repeats: int, seed: int, report: Report) -> None:
    layout = TokenLayout(codebook_sizes=(256,) * 4, num_user_tokens=0)
    L = layout.num_levels
    report(f"random {L}-level tuples of 256 codes; V = {layout.vocab_size}; masking = allowed_mask + next_nodes for "
           f"{beams} beams (random nodes of that depth), median of {repeats}")  # fmt: skip
    report()
    report("| items | nodes | build s | MiB | " + " | ".join(f"depth {d} ms" for d in range(L)) + " | max step ms |")
    report("| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in range(L)) + " | ---: |")
    rows = {}
    for name in sizes:
        n = SCALE_SIZES[name]
        tokens = np.asarray(layout.codes_to_tokens(random_tuples(n, L, 256, seed)))
        t0 = time.perf_counter()
        tree = PrefixTree.from_sequences(
            tokens, np.arange(1, n + 1), layout.vocab_size, end_token=layout.eos_token_id, pad_token=layout.pad_token_id
        )
        build = time.perf_counter() - t0
        del tokens
        gen = torch.Generator().manual_seed(seed)
        step_ms = []
        for depth in range(L):
            at_depth = (tree.node_depth == depth).nonzero().squeeze(1)
            nodes = at_depth[torch.randint(at_depth.numel(), (beams,), generator=gen)]
            tokens_next = tree.child_token[tree.row_ptr[nodes]]  # a valid next token per beam
            lo_hi = layout.level_range(depth)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                tree.allowed_mask(nodes, token_range=lo_hi)
                tree.next_nodes(nodes, tokens_next)
                times.append(time.perf_counter() - t0)
            step_ms.append(1e3 * float(np.median(times)))
        rows[name] = {"items": n, "build_seconds": build, "bytes": tree.nbytes, "step_ms": step_ms, "nodes": tree.num_nodes}
        report(f"| {name} | {tree.num_nodes:,} | {build:.2f} | {tree.nbytes / 2**20:.0f} | " + " | ".join(f"{t:.3f}" for t in step_ms) + f" | {max(step_ms):.3f} |")
        del tree
    first, last = rows[sizes[0]], rows[sizes[-1]]
    flat = max(last["step_ms"]) / max(first["step_ms"])
    per_depth = [b / a for a, b in zip(first["step_ms"], last["step_ms"], strict=True)]
    report()
    report(f"- slowest step, {sizes[-1]} / {sizes[0]}: {flat:.2f}x; per depth: "
           + ", ".join(f"{r:.2f}x" for r in per_depth) + " (target: within 2x)")  # fmt: skip
    report(f"- build of {sizes[-1]}: {last['build_seconds']:.1f} s (target for 10M < 60 s)")
    report.numbers["scale"] = {"beams": beams, "rows": rows, "step_ratio_last_over_first": flat, "step_ratio_per_depth": per_depth}


# ---- command line --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/beauty"))
    p.add_argument("--ids", type=Path, help="semantic_ids.npz; default: residual k-means built here")
    p.add_argument("--run", type=Path, help="a training run folder: decode with its newest checkpoint")
    p.add_argument("--users", type=int, default=1024)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--gen-batch", type=int, default=128, help="users per generate call for (a), (b) and the timing chunks")
    p.add_argument("--beam-batch", type=int, default=None, help="beam_search batch_size (default: automatic)")
    p.add_argument("--scale", default=",".join(SCALE_SIZES), help="comma-separated sizes of the scale part, '' to skip")
    p.add_argument("--scale-beams", type=int, default=2560)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-decoding", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the 2 cores here are shared)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report()
    command = "python -m experiments.decoding_speed " + shlex.join(sys.argv[1:] if argv is None else argv)
    report("# Decoding speed")
    report()
    report(f"`{command.strip()}`")
    report()
    report(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
           f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")  # fmt: skip
    report()
    if not args.skip_decoding:
        report("## Beauty: constrained top-k")
        report()
        if args.ids is None and args.run is not None:
            args.ids = args.run / "semantic_ids.npz"  # a run keeps the IDs it was trained with
        if args.ids is not None:
            ids = SemanticIDs.load(args.ids)
            report(f"semantic IDs: {args.ids} ({ids.num_items} items, codebooks {list(ids.codebook_sizes)})")
        else:
            t0 = time.perf_counter()
            ids = residual_kmeans_ids(np.load(args.data / "item_emb_minilm.npy"), seed=args.seed)
            report(f"semantic IDs: built here by residual k-means (sklearn KMeans, 3 x 256 on item_emb_minilm.npy) + "
                   f"extra level: {ids.num_items} items, codebooks {list(ids.codebook_sizes)} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        layout = ids.layout()
        if args.run is not None:
            (model, layout), what = trained_model(args.run, ids), f"trained: {args.run}"
        else:
            model, what = tiger_model(layout, args.seed), "tiger preset, randomly initialised weights (speed does not depend on them)"
        if torch.cuda.is_available():
            model = model.cuda()
        report(f"model: {what}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
        input_ids, attention_mask, _ = test_histories(args.data, ids, layout, args.users, args.seed)
        report(f"histories: [user token] + codes of the last <= 20 items before each user's test item; S = {input_ids.shape[1]}")
        report()
        decoding_benchmark(model, ids, layout, input_ids, attention_mask, args, report)
        report()
    sizes = [s for s in args.scale.split(",") if s]
    if sizes:
        report("## Prefix tree at scale")
        report()
        scale_benchmark(sizes, args.scale_beams, args.repeats, args.seed, report)
    report.numbers["command"] = command.strip()
    with atomic_open(args.out / "decoding_speed.md", encoding="utf-8") as f:
        f.write("\n".join(report.lines) + "\n")
    write_json(args.out / "decoding_speed.json", json.loads(json.dumps(report.numbers)))


if __name__ == "__main__":
    main()
