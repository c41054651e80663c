"""The decoders of a title run: ``title-beam`` (GENRE: beam search constrained by the title tree) and
``title-grounded`` (BIGRec: free title beam, embedded, nearest items by MIPS); both rank from backbone states ``h``
(B, D) into a :class:`~generator.decoding.protocol.Ranking`, and ``stats`` counts generations that were not items and
the grounding time (``generator.decoding.grounding.GroundingStats``).

The title beam is the one beam loop (``generator.decoding.beam.search``, with eos) on the title head
(:class:`TitleSteps`). Constrained, each token is renormalised over what the title tree allows: a title's score is its
log-probability among the catalogue's titles, divided by ``length ** length_penalty``, and the beams are distinct
items. Free, over the whole vocabulary (pad excluded): a finished beam is any token sequence, looked up afterwards.
``title-grounded`` scores by the cosine of the item's title embedding with the generated title's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from generator.decoding.beam import Beams, Free, TreeConstraint, leaf_items, search
from generator.decoding.grounding import GROUND_MAX_LENGTH, GroundingStats
from generator.decoding.protocol import COSINE, TITLE_LOG_PROB, Ranking, check_beams, check_k
from generator.models.titles import TitleGenerator
from semid.safe_read import is_int
from semid.tree import PrefixTree

TITLE_BEAM, TITLE_GROUNDED = "title-beam", "title-grounded"
TITLE_DECODERS = (TITLE_BEAM, TITLE_GROUNDED)
# score / length ** LENGTH_PENALTY. D3 ("Decoding Matters") drops length normalisation (0); measured on 2,000 Beauty
# validation users of the 15-minute title run (experiments/results/titles_vs_ids.md), 0.5 was best by N@10 (0: 0.0037,
# 0.5: 0.0042, 1: 0.0041, differences within noise at that quality): see docs/architecture.md
LENGTH_PENALTY = 0.5


class TitleSteps:
    """The title head as a :class:`~generator.decoding.beam.Backbone`: one GRU step (``TitleGenerator.step``) of the
    unfinished beams per title position, over the whole vocabulary; a finished beam's row is zeros (never read)."""

    def __init__(self, model: TitleGenerator, h: torch.Tensor) -> None:
        self.model, self.B, self.device, self.V = model, h.shape[0], h.device, model.config.vocab_size
        self.state, self.cond = model.title_start(h)  # (B*m, E) each

    def window(self, step: int) -> tuple[int, int]:
        return 0, self.V

    def logits(self, step: int, prefix: torch.Tensor, m: int, done: torch.Tensor | None) -> torch.Tensor:
        live = torch.nonzero(~done).squeeze(1)  # only unfinished beams take a step (most are finished late on)
        out, state = self.model.step(None if step == 0 else prefix[live, -1], self.state[live], self.cond[live])
        self.new_state = self.state.index_copy(0, live, state)
        return out.new_zeros(done.shape[0], self.V).index_copy(0, live, out)  # (B*m, V)

    def reorder(self, step: int, rows: torch.Tensor) -> None:
        self.state, self.cond = self.new_state[rows], self.cond[rows]


def title_beam_search(model: TitleGenerator, h: torch.Tensor, *, num_beams: int, tree: PrefixTree | None = None,
                      length_penalty: float = 0.0, max_steps: int | None = None) -> Beams:
    """Beam search from backbone states h (B, D); constrained by ``tree`` (None: free generation).

    Args:
        max_steps: title positions at most (eos included); default the tree's depth, or the longest training
            title + 1 when free. A free beam cut by it is returned unfinished.
    """
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int, got {num_beams!r}")
    if length_penalty < 0:
        raise ValueError(f"`length_penalty` must be >= 0, got {length_penalty!r}")
    cfg = model.config
    V, pad, eos = cfg.vocab_size, cfg.pad_id, cfg.eos_id
    if tree is not None and tree.vocab_size != V:
        raise ValueError(f"the title tree has vocabulary {tree.vocab_size}, the model {V}: built for another tokenizer")
    if max_steps is None:
        max_steps = tree.max_depth if tree is not None else int(model.title_lengths.max())
    if not is_int(max_steps) or max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    on_tree = Free(pad) if tree is None else TreeConstraint(tree, h.shape[0], h.device)
    return search(TitleSteps(model, h), on_tree, num_beams=int(num_beams), steps=int(max_steps), eos=eos, pad=pad,
                  length_penalty=length_penalty)


def lookup_generated(beams: Beams, tree: PrefixTree) -> torch.Tensor:
    """The item each beam's tokens name (a complete path of the title tree, eos included), else -1: (B, M)."""
    B, M, J = beams.tokens.shape
    nodes = tree.walk(beams.tokens.view(B * M, J)).view(B, M)  # pads after eos loop on the leaf
    items = torch.where(nodes >= 0, tree.node_value[nodes.clamp_min(0)], -1)
    return torch.where(beams.finished, items, -1)


class TitleDecoders:
    """Args:
        model: the title model; tree: the title tree (leaf values = item ids); item_ids: LongTensor (N,) sorted;
        codes: LongTensor (N, L) each row's semantic-ID codes (for the result's ``codes``).
        tokenizer: a ``semid.titles.TitleTokenizer`` (text of free generations); encoder: a ``semid.embed.Encoder``
        and item_emb: FloatTensor (N, D_e) unit rows, the catalogue's titles embedded by it (``title-grounded`` only).
    """

    def __init__(self, model: TitleGenerator, tree: PrefixTree, item_ids: torch.Tensor, codes: torch.Tensor, *,
                 num_beams: int = 20, length_penalty: float = LENGTH_PENALTY, tokenizer: Any = None,
                 encoder: Any = None, item_emb: torch.Tensor | None = None) -> None:
        self.model, self.tree, self.num_beams, self.length_penalty = model, tree, num_beams, float(length_penalty)
        self.item_ids = torch.as_tensor(item_ids, dtype=torch.long)
        self.codes = torch.as_tensor(codes, dtype=torch.long)
        if self.item_ids.numel() != model.num_items:
            raise ValueError(f"`item_ids` must hold the model's {model.num_items} items, got {self.item_ids.numel()}")
        self.tokenizer, self.encoder, self.item_emb = tokenizer, encoder, item_emb
        self.stats = GroundingStats()

    def to(self, device: torch.device) -> TitleDecoders:
        self.tree = self.tree.to(device)
        self.item_ids, self.codes = self.item_ids.to(device), self.codes.to(device)
        if self.item_emb is not None:
            self.item_emb = self.item_emb.to(device)
        return self

    def _result(self, items: torch.Tensor, scores: torch.Tensor, score: str, leaves: bool) -> Ranking:
        rows = torch.searchsorted(self.item_ids, items)
        return Ranking(items, scores, self.codes[rows], score, leaves)

    @torch.inference_mode()
    def decode(self, name: str, h: torch.Tensor, *, k: int, num_beams: int | None = None) -> Ranking:
        if name not in TITLE_DECODERS:
            raise ValueError(f"`decoder` must be one of {list(TITLE_DECODERS)} for a title run, got {name!r}")
        check_k(k, self.model.num_items, "the catalogue size")
        M = self.num_beams if num_beams is None else num_beams  # a call's own (Recommender.recommend raises it to k)
        check_beams(M, k, self.model.num_items)
        t0 = time.perf_counter()
        if name == TITLE_BEAM:
            beams = title_beam_search(self.model, h, num_beams=M, tree=self.tree, length_penalty=self.length_penalty)
            items, scores = leaf_items(beams, self.tree, k), beams.scores[:, :k]
            self._count(h.shape[0], torch.zeros(h.shape[0], M, dtype=torch.bool), 0.0, time.perf_counter() - t0)
            return self._result(items, scores, TITLE_LOG_PROB, True)
        if self.encoder is None or self.item_emb is None or self.tokenizer is None:
            raise ValueError("decoder 'title-grounded' needs a sentence encoder: train the title run with `--encoder DIR` "
                             "(a local model folder, as for `semid embed`)")
        from semid.embed import embed_texts

        beams = title_beam_search(self.model, h, num_beams=M, tree=None, length_penalty=self.length_penalty)
        named = lookup_generated(beams, self.tree)  # (B, M) item named by each beam, -1 if none
        t1 = time.perf_counter()
        best = beams.tokens[:, 0]  # (B, J): BIGRec grounds the best generation
        texts = self.tokenizer.decode(best.cpu().tolist())
        q = torch.from_numpy(embed_texts(texts, self.encoder, batch_size=64, max_length=GROUND_MAX_LENGTH, progress=False)).to(self.item_emb)
        scores, rows = (q @ self.item_emb.T).topk(k, dim=1)  # MIPS over unit vectors = nearest by cosine
        self._count(h.shape[0], named < 0, time.perf_counter() - t1, time.perf_counter() - t0)
        return self._result(self.item_ids[rows], scores, COSINE, False)

    def _count(self, B: int, not_item: torch.Tensor, ground: float, total: float) -> None:
        s = self.stats
        s.users += B
        s.generations += int(not_item.numel())
        s.non_items_top1 += int(not_item[:, 0].sum())
        s.non_items += int(not_item.sum())
        s.ground_seconds += ground
        s.decode_seconds += total


def tree_from_targets(title_targets: np.ndarray, item_ids: np.ndarray, vocab_size: int, pad_id: int, eos_id: int) -> PrefixTree:
    """The title tree rebuilt from a model's title targets (N, J) (tokens + eos, pad after)."""
    seqs = np.where((title_targets == pad_id) | (title_targets == eos_id), -1, title_targets)
    return PrefixTree.from_sequences(seqs, item_ids, vocab_size, end_token=eos_id, pad_token=pad_id)
