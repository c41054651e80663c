"""Bit-identity of every beam decoder across a refactor: save their outputs on tiny seeded random models, compare later.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python experiments/beam_identity.py save /tmp/beams_before.pt
    (change the code)
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python experiments/beam_identity.py compare /tmp/beams_before.pt

Covers: the causal beam (node vectors on/off, with items added after training, a flat model where every score
ties), the free code beam and ``codes-grounded``, ``cold-beam``, the T5 beam (three output heads, chunked, flat)
with ``auto``, ``cold-beam`` and ``hybrid`` through the registry, T5 teacher forcing (``score_codes``), the title beam
(constrained with three length penalties, free, flat) and ``title-beam``, and the causal code loss. Every tensor
must be equal bit for bit (``torch.equal``, NaN-free), tie order included: all M beams are kept (k = M).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import torch
from transformers import T5Config, T5ForConditionalGeneration

from generator.decoding import registry
from generator.decoding.causal import CausalDecoders, item_paths
from generator.decoding.grounding import CODES_GROUNDED, GroundedCodeDecoders, free_code_beam
from generator.decoding.protocol import Histories
from generator.decoding.registry import CAUSAL, Ingredients
from generator.decoding.titles import TitleDecoders, title_beam_search
from generator.models.causal import CausalConfig, CausalGenerator
from generator.models.causal_loss import code_loss
from generator.models.dense import DenseHead, DenseHeadConfig
from generator.models.titles import TitleConfig, TitleGenerator
from generator.t5.beam import beam_search as t5_beam_search
from generator.t5.decoders import T5
from generator.t5.step import score_codes
from semid.ids import SemanticIDs
from semid.titles import TitleIndex
from semid.tree import PrefixTree

CFG = CausalConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, dropout=0.0, max_history=12, dense_dim=8)


def ids_of(n: int, seed: int, sizes: tuple[int, ...]) -> SemanticIDs:
    rng = np.random.default_rng(seed)
    return SemanticIDs.from_codes(rng.integers(0, sizes, size=(n, len(sizes))), sizes, extra_level_size=n)


def causal(n: int, seed: int, sizes: tuple[int, ...], cfg: CausalConfig = CFG, flat: bool = False):
    ids = ids_of(n, seed, sizes)
    layout = ids.layout(0)
    torch.manual_seed(seed)
    model = CausalGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)))
    with torch.no_grad():
        for mlp in model.prefix_mlp:
            mlp[2].weight.normal_(0, 0.5)
            mlp[2].bias.normal_(0, 0.5)
        model.code_bias.normal_(0, 0.5)
        for level in range(layout.num_levels if cfg.node_vectors else 0):
            getattr(model, f"node_vec_{level}").normal_(0, 0.5)
        if flat:  # every allowed code equally likely: scores tie everywhere
            model.code_emb.weight.zero_()
            model.code_bias.zero_()
            for level in range(layout.num_levels if cfg.node_vectors else 0):
                getattr(model, f"node_vec_{level}").zero_()
    return model.eval(), ids, PrefixTree.from_semantic_ids(ids, layout)


def ranking(r) -> list[torch.Tensor]:
    return [r.items, r.scores, r.codes]


def causal_outputs(out: dict) -> None:
    for seed, n, sizes, nv, flat in [(0, 30, (3, 4), True, False), (1, 30, (3, 4), False, False), (2, 60, (4, 4, 4), True, False),
                                     (3, 25, (2, 3), True, True), (4, 40, (5, 3), False, True)]:
        model, ids, tree = causal(n, seed, sizes, replace(CFG, node_vectors=nv), flat)
        h = torch.randn(9, CFG.d_model, generator=torch.Generator().manual_seed(seed))
        dec = GroundedCodeDecoders(model, tree, torch.from_numpy(ids.item_ids), num_beams=8).refresh()
        for M in (1, 5, 8, 20, n):
            out[f"causal/{seed}/beam/M{M}"] = ranking(dec.decode("beam", h, k=M, num_beams=M))
            with torch.inference_mode():
                out[f"causal/{seed}/free/M{M}"] = list(free_code_beam(model, h, num_beams=M))
            dec.num_beams = M
            out[f"causal/{seed}/grounded/M{M}"] = ranking(dec.decode(CODES_GROUNDED, h, k=min(M, 5)))
        ing = Ingredients(CAUSAL, model, tree, model.layout, ids, num_beams=8, num_candidates=10, cold_items=ids.item_ids[-3:])
        hist = Histories(torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [n, 7, 0, 0]]), torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [n, 7, 0, 0]]) > 0)
        for name in ("auto", "cold-beam"):
            out[f"causal/{seed}/registry/{name}"] = ranking(registry.build(ing, name)(hist, 5))
        # the code loss (without node vectors it runs the masked log-softmax)
        rows = torch.arange(min(n, 12))
        nodes = item_paths(model, tree).nodes[rows]  # the decoders keep no `nodes` (serving_paths)
        allowed = [tree.allowed_mask(nodes[:, lv], token_range=model.layout.level_range(lv)) for lv in range(model.layout.num_levels)]
        hq = model.level_queries(torch.randn(rows.numel(), CFG.d_model, generator=torch.Generator().manual_seed(seed + 9)))
        with torch.no_grad():
            out[f"causal/{seed}/loss"] = [code_loss(model, hq, model.item_tokens[rows + 1], allowed, label_smoothing=0.1)]
    # items added after training: the beam normalises over the trained children
    model, ids, _ = causal(20, 7, (3, 4))
    grown = ids.add_items(np.array([[2, 3], [0, 1], [1, 1]]), np.array([21, 22, 23]))
    layout = model.layout
    model.add_items(torch.as_tensor(layout.codes_to_tokens(grown.codes[-3:])))
    dec = CausalDecoders(model, PrefixTree.from_semantic_ids(grown, layout), torch.from_numpy(grown.item_ids), num_beams=8,
                         trained_tree=PrefixTree.from_semantic_ids(ids, layout)).refresh()
    h = torch.randn(50, CFG.d_model, generator=torch.Generator().manual_seed(0))
    for M in (3, 8, 23):
        out[f"causal/added/M{M}"] = ranking(dec.decode("beam", h, k=M, num_beams=M))


def t5_model(layout, head: str, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=layout.vocab_size + 3, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                   num_decoder_layers=2, dropout_rate=0.1, tie_word_embeddings=head == "tied",
                   decoder_start_token_id=layout.bos_token_id)
    model = T5ForConditionalGeneration(cfg)
    if head in ("separate", "flat"):
        model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * (head == "separate"))
    return model.eval()


def t5_outputs(out: dict) -> None:
    for seed, head in [(0, "tied"), (1, "unscaled"), (2, "separate"), (3, "flat")]:
        ids = ids_of(20, seed, (3, 4))
        layout = ids.layout(num_user_tokens=0)
        model = t5_model(layout, head, seed)
        tree = PrefixTree.from_semantic_ids(ids, layout)
        rng = np.random.default_rng(seed)
        S, B = 6, 7
        tokens = torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes[rng.integers(0, 20, (B, S // 3))]))).reshape(B, -1)
        mask = torch.ones_like(tokens)
        mask[1, 3:] = 0
        tokens[1, 3:] = layout.pad_token_id
        for M in (1, 5, 12, 20):
            for bs in (None, 2):
                out[f"t5/{seed}/beam/M{M}/bs{bs}"] = ranking(t5_beam_search(model, tokens, mask, tree, layout, k=M, num_beams=M, batch_size=bs))
        codes = torch.from_numpy(ids.codes)[None].expand(B, -1, -1).clone()
        codes[0, 0, 0] = -1  # an empty slot
        codes[2, 1, 1] = 3  # a tuple outside the tree
        out[f"t5/{seed}/score_codes"] = [score_codes(model, tokens, mask, tree, layout, codes, batch_size=3)]
        head_ = DenseHead(DenseHeadConfig(input_dim=32, dim=8, mode="both", normalize=False), torch.from_numpy(ids.item_ids),
                          torch.randn(ids.num_items, 10, generator=torch.Generator().manual_seed(seed))).eval()
        ing = Ingredients(T5, model, tree, layout, ids, num_beams=8, num_candidates=6, dense_head=head_, fusion=("blend", {"alpha": 0.5}),
                          cold_items=ids.item_ids[-3:])
        hist = Histories(tokens, mask.bool())
        for name in ("auto", "hybrid", "cold-beam"):
            out[f"t5/{seed}/registry/{name}"] = ranking(registry.build(ing, name)(hist, 5))


class WordTokenizer:
    pad_id, eos_id, vocab_size = 0, 1, 12

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [[int(w) for w in t.split()] for t in texts]


TITLES = ["2 3", "2 3 4", "2 3", "", "5", "5 6 7", "", "2 8 9 10", "11", "6 6", "4 4 5", "7 3 2", "9"]


def title_outputs(out: dict) -> None:
    for seed, flat in [(0, False), (1, False), (2, True)]:
        ids = ids_of(len(TITLES), seed, (4, 4))
        index = TitleIndex.build(WordTokenizer(), TITLES, ids.item_ids)
        layout = ids.layout(0)
        cfg = TitleConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, title_dim=16, vocab_size=index.vocab_size, pad_id=0, eos_id=1)
        torch.manual_seed(seed)
        model = TitleGenerator(cfg, layout, torch.as_tensor(layout.codes_to_tokens(ids.codes)), torch.from_numpy(index.padded_targets()))
        with torch.no_grad():
            model.out_bias.normal_(0, 2.0)
            model.out_bias[1] += 1.0
            if flat:
                model.out_bias.zero_()
                model.tok_emb.weight.zero_()
        model.eval()
        h = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for M in (2, 3, 10, len(TITLES)):  # 1: the title loop refused it before (its "no step ran" check)
                for lp in (0.0, 0.5, 1.0):
                    out[f"title/{seed}/tree/M{M}/lp{lp}"] = list(title_beam_search(model, h, num_beams=M, tree=index.tree, length_penalty=lp))
                    out[f"title/{seed}/free/M{M}/lp{lp}"] = list(title_beam_search(model, h, num_beams=M, tree=None, length_penalty=lp, max_steps=6))
            dec = TitleDecoders(model, index.tree, torch.from_numpy(ids.item_ids), torch.from_numpy(ids.codes), num_beams=6)
            out[f"title/{seed}/title-beam"] = ranking(dec.decode("title-beam", h, k=5))


def collect() -> dict[str, list[torch.Tensor]]:
    torch.use_deterministic_algorithms(True)
    out: dict[str, list[torch.Tensor]] = {}
    causal_outputs(out)
    t5_outputs(out)
    title_outputs(out)
    return {k: [t.detach().clone() for t in v] for k, v in out.items()}


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    out = collect()
    if mode == "save":
        torch.save(out, path)
        print(f"saved {len(out)} outputs ({sum(len(v) for v in out.values())} tensors) to {path}")
        return
    before = torch.load(path, weights_only=True)
    bad = [k for k in before if k not in out or len(before[k]) != len(out[k])
           or not all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(before[k], out[k], strict=True))]
    bad += [k for k in out if k not in before]
    print(f"{len(before)} outputs before, {len(out)} after; {len(bad)} differ" + ("" if not bad else ": " + ", ".join(bad[:20])))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
