"""The decoders of a title run: ``title-beam`` (GENRE: beam search constrained by the title tree) and
``title-grounded`` (BIGRec: free title beam, embedded, nearest items by MIPS).

Both rank from backbone states ``h`` (B, D) and return a :class:`~generator.decoding.protocol.Ranking` (items (B, k)
best first, scores (B, k), the items' semantic-ID codes (B, k, L)); ``stats`` counts generations that
were not items and the grounding time (``generator.decoding.grounding.GroundingStats``).

Scores: ``title-beam``: the title's log-probability among the catalogue's titles (tokens renormalised over what
the tree allows), divided by ``length ** length_penalty``; ``title-grounded``: the cosine of the item's title
embedding with the generated title's.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from generator.decoding.grounding import GROUND_MAX_LENGTH, GroundingStats
from generator.decoding.protocol import COSINE, TITLE_LOG_PROB, Ranking, check_beams, check_k
from generator.decoding.title_beam import beam_items, lookup_generated, title_beam_search
from generator.models.titles import TitleGenerator
from semid.tree import PrefixTree

TITLE_BEAM, TITLE_GROUNDED = "title-beam", "title-grounded"
TITLE_DECODERS = (TITLE_BEAM, TITLE_GROUNDED)
# score / length ** LENGTH_PENALTY. D3 ("Decoding Matters") drops length normalisation (0); measured on 2,000 Beauty
# validation users of the 15-minute title run (experiments/results/titles_vs_ids.md), 0.5 was best by N@10 (0: 0.0037,
# 0.5: 0.0042, 1: 0.0041, differences within noise at that quality): see docs/architecture.md
LENGTH_PENALTY = 0.5


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
        check_beams(self.num_beams, k, self.model.num_items)
        t0 = time.perf_counter()
        if name == TITLE_BEAM:
            beams = title_beam_search(self.model, h, num_beams=self.num_beams, tree=self.tree, length_penalty=self.length_penalty)
            items, scores = beam_items(beams, self.tree, k)
            self._count(h.shape[0], torch.zeros(h.shape[0], self.num_beams, dtype=torch.bool), 0.0, time.perf_counter() - t0)
            return self._result(items, scores, TITLE_LOG_PROB, True)
        if self.encoder is None or self.item_emb is None or self.tokenizer is None:
            raise ValueError("decoder 'title-grounded' needs a sentence encoder: train the title run with `--encoder DIR` "
                             "(a local model folder, as for `semid embed`)")
        from semid.embed import embed_texts

        beams = title_beam_search(self.model, h, num_beams=self.num_beams, tree=None, length_penalty=self.length_penalty)
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
