"""Bit-identity of everything the prefix index feeds, before and after a change to it (issue 18, item 3).

Builds small seeded worlds (causal models with and without node vectors, one with items added after training, a
T5 model), runs every decoder that reads prefix keys or prefix tables (causal beam, exact (whole and chunked),
dense, hybrid, codes-grounded, cold-beam; T5 beam and cold-beam), the training loss (with distillation), the model's
tree tables, the item paths and edge tables, the prefix tree's tensors and the semantic IDs' lookups, and saves every
output tensor. Run it once with the old code and once with the new, then compare:

    PYTHONPATH=/path/to/old python experiments/prefix_identity.py dump /tmp/before.pt
    PYTHONPATH=$PWD python experiments/prefix_identity.py dump /tmp/after.pt
    python experiments/prefix_identity.py compare /tmp/before.pt /tmp/after.pt   # exact equality, tensor by tensor
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration

from generator.decoding import registry
from generator.decoding.causal import edge_tables, item_paths
from generator.decoding.chunked import exact_topk
from generator.decoding.protocol import Histories
from generator.decoding.registry import CAUSAL, Ingredients
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.causal_loss import code_loss
from generator.t5.decoders import T5
from semid.ids import SemanticIDs
from semid.titles import dup_ranks
from semid.tree import PrefixTree

CAUSAL_NAMES = ("beam", "exact", "dense", "hybrid", "codes-grounded", "cold-beam")


def _model(ids: SemanticIDs, cfg: CausalConfig, seed: int) -> CausalGenerator:
    layout = ids.layout(0)
    torch.manual_seed(seed)
    model = CausalGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)))
    with torch.no_grad():
        for p in model.parameters():  # every weight random, node vectors too (they start at zero)
            p.normal_(0, 0.3)
    return model.eval()


def _ranking(out: dict, tag: str, res: object) -> None:
    for field in ("items", "scores", "codes"):
        out[f"{tag}.{field}"] = getattr(res, field).detach().clone()


def causal_world(out: dict, tag: str, *, n: int, sizes: tuple[int, ...], seed: int, node_vectors: bool, added: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, sizes, size=(n, len(sizes)))
    codes[n // 2 :: 7] = codes[0]  # some large collision groups
    if added:  # the trained items never use the last level-0 code: some added items open prefixes of their own
        codes[: n - added, 0] %= sizes[0] - 1
    trained = n - added
    base = SemanticIDs.from_codes(codes[:trained], sizes, extra_level_size=n)
    ids = base.add_items(codes[trained:], np.arange(trained + 1, n + 1)) if added else base
    cfg = CausalConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, dropout=0.0, max_history=8, dense_dim=16,
                       node_vectors=node_vectors, distill=0.3 if node_vectors else 0.0)
    model = _model(base, cfg, seed)
    layout = model.layout
    for name, buf in model.named_buffers():
        out[f"{tag}.buffer.{name}"] = buf.clone()
    # the training loss (with distillation where there are node vectors)
    tree = PrefixTree.from_semantic_ids(base, layout)
    rows = torch.from_numpy(rng.integers(0, trained, 40))
    h = torch.randn(40, 16, generator=torch.Generator().manual_seed(seed))
    allowed = None
    if not node_vectors:
        nodes = item_paths(model, tree).nodes[rows]
        allowed = [tree.allowed_mask(nodes[:, lv], token_range=layout.level_range(lv)) for lv in range(layout.num_levels)]
    teacher = torch.randn(40, trained).softmax(-1) if node_vectors else None
    out[f"{tag}.code_loss"] = code_loss(model, model.level_queries(h), model.item_tokens[rows + 1], allowed,
                                        label_smoothing=0.1, teacher=teacher, distill=cfg.distill).detach()
    if added:
        model.add_items(torch.as_tensor(layout.codes_to_tokens(ids.codes[trained:])))
    tree = PrefixTree.from_semantic_ids(ids, layout)
    for name in ("row_ptr", "child_token", "child_node", "edge_key", "node_value", "node_depth", "dense_next", "dense_spec"):
        out[f"{tag}.tree.{name}"] = getattr(tree, name).clone()
    paths = item_paths(model, tree)
    fields = paths._asdict()
    if "index" in fields:  # since the prefix index: the edges' parents and tokens are the index's
        index = fields.pop("index")
        fields["edge_parent"] = index.parent
        fields["edge_token"] = [c + layout.level_range(lv)[0] for lv, c in enumerate(index.code)]
    for field, value in fields.items():
        for i, t in enumerate(value if isinstance(value, list) else [value]):
            if t is not None:  # (active_norm: None per level where no items were added)
                out[f"{tag}.paths.{field}.{i}"] = t.clone()
    tables = edge_tables(model, paths)
    for i, (v, b) in enumerate(zip(tables.vectors, tables.biases, strict=True)):
        out[f"{tag}.tables.{i}"] = torch.cat([v, b[:, None]], 1)
    trained_tree = PrefixTree.from_semantic_ids(base, layout) if added else None
    ing = Ingredients(CAUSAL, model, tree, layout, ids, num_beams=12, num_candidates=15, trained_tree=trained_tree,
                      fusion=("blend", {"alpha": 0.4}), cold_items=ids.item_ids[-max(added, 5):],
                      cold_options={"max_per_prefix": 2})
    decoders = registry.build_many(ing, list(CAUSAL_NAMES))
    hist = torch.from_numpy(rng.integers(1, n + 1, (9, 6)))
    hist[3, 2:] = 0
    hist[5, 4:] = 0
    histories = Histories(hist, hist > 0)
    for name, dec in decoders.items():
        _ranking(out, f"{tag}.{name}", dec(histories, 10))
    shared = decoders["exact"].shared
    with torch.inference_mode():
        hs = shared.model.last_hidden(histories.tokens, histories.lengths)
        s, r = exact_topk(model, hs, shared.paths, shared.tables, 10, item_chunk=7, max_score_bytes=64)
    out[f"{tag}.exact_chunked.scores"], out[f"{tag}.exact_chunked.rows"] = s.clone(), r.clone()
    # the semantic IDs' lookups
    probe = np.concatenate([ids.codes[rng.integers(0, n, 50)], rng.integers(-1, max(ids.codebook_sizes) + 1, (50, ids.num_levels))])
    out[f"{tag}.ids.items_of"] = torch.from_numpy(ids.items_of(probe))
    out[f"{tag}.ids.collisions"] = torch.tensor(list(ids.collision_stats()[:2]) + list(ids.collision_stats()[3:]))
    out[f"{tag}.ids.codes"] = torch.from_numpy(ids.codes)


def t5_world(out: dict) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    ids = SemanticIDs.from_codes(rng.integers(0, 5, (60, 2)), (5, 5), extra_level_size=16)
    layout = ids.layout(num_user_tokens=0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=layout.vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, pad_token_id=layout.pad_token_id, eos_token_id=layout.eos_token_id,
        decoder_start_token_id=layout.bos_token_id)).eval()
    tokens = torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes[rng.integers(0, 60, (6, 3))]))).reshape(6, -1)
    ing = Ingredients(T5, model, PrefixTree.from_semantic_ids(ids, layout), layout, ids, num_beams=10,
                      cold_items=ids.item_ids[-12:])
    for name in ("beam", "cold-beam"):
        _ranking(out, f"t5.{name}", registry.build(ing, name)(Histories(tokens, torch.ones_like(tokens, dtype=torch.bool)), 8))


def ragged_world(out: dict) -> None:
    """Trees of variable-length sequences (titles: with an end token and padding; and without), and title ranks."""
    rng = np.random.default_rng(5)
    seqs = [rng.integers(3, 12, rng.integers(0, 6)).tolist() for _ in range(300)]
    rank, size = dup_ranks(seqs)
    out["ragged.dup_ranks"] = torch.from_numpy(np.stack([rank, size]))
    keep = [i for i in range(300) if rank[i] == 0 and seqs[i]]  # distinct, non-empty
    for tag, kwargs in (("eos", {"end_token": 1, "pad_token": 0}), ("plain", {"dense_budget": 40})):
        rows = [seqs[i] for i in keep] if tag == "eos" else [seqs[i] + [2] for i in keep]  # 2 closes: no prefixes
        tree = PrefixTree.from_sequences(rows, np.arange(len(rows)) * 3, 12, **kwargs)
        for name in ("row_ptr", "child_token", "child_node", "node_value", "node_depth", "dense_next", "dense_spec"):
            out[f"ragged.{tag}.{name}"] = getattr(tree, name).clone()


def dump(path: str) -> None:
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    causal_world(out, "nv", n=400, sizes=(6, 5, 4), seed=1, node_vectors=True, added=0)
    causal_world(out, "plain", n=300, sizes=(7, 3), seed=2, node_vectors=False, added=0)
    causal_world(out, "added", n=350, sizes=(5, 4, 3), seed=4, node_vectors=True, added=60)
    t5_world(out)
    ragged_world(out)
    torch.save(out, path)
    print(f"{len(out)} tensors written to {path}")


def compare(a: str, b: str) -> int:
    """Exit 1 when a tensor both dumps hold differs (dtype, shape or any value); tensors one of them lacks (an output
    that was removed or added) are listed apart."""
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    common = sorted(set(x) & set(y))
    bad = [k for k in common if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not torch.equal(x[k], y[k])]
    print(f"{len(common)} tensors compared; {'ALL IDENTICAL' if not bad else f'{len(bad)} differ: {bad[:20]}'}; "
          f"only in {a}: {sorted(set(x) - set(y))}; only in {b}: {sorted(set(y) - set(x))}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"] and len(sys.argv) == 3:
        dump(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
