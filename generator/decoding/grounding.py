"""Generate, then ground (BIGRec, Bao et al. 2023): free generation, mapped to real items afterwards.

- **Titles** (``title-grounded``): the best free title beam (no tree) is embedded with the same sentence encoder as
  the catalogue's titles (``semid.embed``: a local model folder, mean pooling, L2-normalised), and every item is
  ranked by the inner product of its title embedding with it (MIPS; cosine, so the same order as BIGRec's L2
  distance). A generated title equal to a catalogue title embeds to that item's vector and ranks it first.
- **Semantic IDs** (``codes-grounded``, on a causal semantic-ID run): beam search over code tokens with no tree
  mask (each level's log-softmax over its whole block), then each generated tuple is grounded by the rule: a tuple
  that is an item is that item; otherwise take the **longest prefix it shares with a real ID** (the deepest tree
  node its codes reach), and among the items under that node the **nearest** to the tuple by the model's own
  vector of a code tuple (the sum of its code embeddings, which is how the model reads an item): smallest L2
  distance. The user's list is the grounded items in beam order with repeats dropped, filled up to k with the
  items nearest the best beam's tuple (scores of the fill: below every beam's, in that order).

Both keep :class:`GroundingStats`: generations that were not items before grounding (of the best beam, and of all
beams) and the seconds spent grounding, against the seconds of the whole decode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from generator.decoding.beam import Free, search
from generator.decoding.causal import CausalDecoders, CausalLevels
from generator.decoding.protocol import GENERATION_LOG_PROB, Ranking, check_beams, check_k
from generator.models.causal import CausalGenerator
from generator.models.ensemble import member_models
from semid.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

CODES_GROUNDED = "codes-grounded"
GROUND_MAX_LENGTH = 64  # encoder tokens per title, both sides (generated titles are <= 33 BPE tokens; 1% of Beauty's are longer)


@dataclass
class GroundingStats:
    """Counters over every decode call of one decoder."""

    users: int = 0
    generations: int = 0  # beams generated (users x M)
    non_items_top1: int = 0  # best beams that were not an item before grounding
    non_items: int = 0  # beams (all M) that were not an item
    left_at_level: list[int] | None = None  # codes-grounded: beams whose codes left the tree at level l (0-based)
    ground_seconds: float = 0.0
    decode_seconds: float = 0.0  # the whole decode (generation + grounding), states excluded

    def as_dict(self) -> dict[str, float]:
        return {"users": self.users, "non_item_share_top1": self.non_items_top1 / max(self.users, 1),
                "non_item_share_beams": self.non_items / max(self.generations, 1),
                "ground_seconds": round(self.ground_seconds, 3), "decode_seconds": round(self.decode_seconds, 3),
                "ground_share": self.ground_seconds / max(self.decode_seconds, 1e-9),
                **({"left_at_level": list(self.left_at_level)} if self.left_at_level is not None else {})}


def first_occurrences(rows: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first k distinct entries of ``rows`` (B, W) in their order, with their scores (B, W)."""
    srt, perm = torch.sort(rows, dim=1, stable=True)
    dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    keep = ~torch.zeros_like(dup_sorted).scatter_(1, perm, dup_sorted)
    if bool((keep.sum(1) < k).any()):
        raise RuntimeError(f"fewer than {k} distinct items to return for some history: grounding is broken")
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    return rows.gather(1, order), scores.gather(1, order)


# ---- semantic IDs: free beam over codes, then the longest matching prefix and the nearest item under it --------
def free_code_beam(model: CausalGenerator, h: torch.Tensor, *, num_beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over code tokens with no tree (the causal beam's loop, unmasked): (tokens (B, M, L), scores (B, M)),
    best first."""
    beams = search(CausalLevels(model, h), Free(), num_beams=num_beams, steps=model.layout.num_levels)
    return beams.tokens, beams.logp


class CodeGrounder:
    """Grounds code-token tuples to items: exact match, else longest matching prefix, then nearest under it."""

    def __init__(self, model: CausalGenerator, index: PrefixIndex | None = None, chunk: int = 1024) -> None:
        """``index``: the prefix index of the model's items where the caller has it (``ItemPaths.index``)."""
        self.model, self.chunk = model, chunk
        tokens = model.item_tokens[1:]  # (N, L)
        if index is None:
            index = PrefixIndex(model.layout.tokens_to_codes(tokens), model.layout.codebook_sizes).to(tokens.device)
        self.index = index
        self.order = self.index.order  # rows in tree order: the items under a node are a run of it (``index.span``)
        with torch.no_grad():
            self.sorted_vec = self.vectors(tokens[self.order])  # (N, D)

    def vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's vector of code tuples (G, L) -> (G, D): the sum of their code embeddings (an ensemble's
        members' side by side, (G, K * D))."""
        return torch.cat([m.code_emb(tokens).sum(-2) for m in member_models(self.model)], -1)  # loop over members

    def ground(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(item rows (G,), was an item (G,) bool) for code-token tuples (G, L); ``last_depth`` keeps the matched depths
        (the levels of each tuple's longest prefix that is an ID's)."""
        codes = self.model.layout.tokens_to_codes(tokens)
        nodes = torch.stack([self.index.find(codes[:, :d]) for d in range(codes.shape[1] + 1)], 1)  # (G, L + 1)
        depth = self.last_depth = (nodes[:, 1:] >= 0).sum(1)  # a prefix of an ID's prefix is one too
        start, stop = self.index.span(depth, nodes.gather(1, depth[:, None]).squeeze(1))  # the items under it, in `order`
        is_item = depth == tokens.shape[1]  # a whole tuple is one item: the node's only one
        rows = torch.where(is_item, self.order[start], -1)
        miss = torch.nonzero(~is_item).squeeze(1)
        pos = torch.arange(self.order.numel(), device=tokens.device)
        for lo in range(0, miss.numel(), self.chunk):  # loop over chunks of the tuples that are not items
            g = miss[lo : lo + self.chunk]
            dist = torch.cdist(self.vectors(tokens[g]), self.sorted_vec)  # (G', N) in tree order
            inside = (pos[None, :] >= start[g, None]) & (pos[None, :] < stop[g, None])
            rows[g] = self.order[dist.masked_fill(~inside, float("inf")).argmin(1)]
        return rows, is_item

    def nearest(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of the k items nearest each tuple (B, L) over the whole catalogue: (B, k)."""
        dist = torch.cdist(self.vectors(tokens), self.sorted_vec)
        return self.order[dist.topk(k, dim=1, largest=False).indices]


class GroundedCodeDecoders(CausalDecoders):
    """The causal run's decoders plus ``codes-grounded`` (free code beam, then grounding); keeps ``stats``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.stats = GroundingStats()
        self._grounder: CodeGrounder | None = None

    def refresh(self, *, release: bool = False) -> GroundedCodeDecoders:
        if release:  # the free code beam scores codes with the model's node vectors
            raise ValueError("`codes-grounded` reads the model's node vectors: its decoders cannot release them")
        super().refresh()
        self._grounder = CodeGrounder(self.model, self.paths.index)  # the item paths' index: built once
        return self

    @torch.inference_mode()
    def decode(self, name: str, h: torch.Tensor, *, k: int, num_beams: int | None = None) -> Ranking:
        if name != CODES_GROUNDED:
            return super().decode(name, h, k=k, num_beams=num_beams)
        self._ready()
        if self._grounder is None:
            self.refresh()
        check_k(k, self.model.num_items, "the catalogue size")
        M = self.num_beams if num_beams is None else num_beams  # the call's (a history left out asks for more)
        check_beams(M, k, self.model.num_items)
        t0 = time.perf_counter()
        tokens, scores = free_code_beam(self.model, h, num_beams=M)  # (B, M, L), (B, M)
        t1 = time.perf_counter()
        B, M, L = tokens.shape
        rows, is_item = self._grounder.ground(tokens.reshape(B * M, L))
        rows, is_item = rows.view(B, M), is_item.view(B, M)
        fill = self._grounder.nearest(tokens[:, 0], k)  # (B, k) the items nearest the best beam's tuple
        fill_scores = scores.min(1, keepdim=True).values - torch.arange(1, k + 1, device=h.device, dtype=scores.dtype)
        rows, out_scores = first_occurrences(torch.cat([rows, fill], 1), torch.cat([scores, fill_scores], 1), k)
        t2 = time.perf_counter()
        s = self.stats
        s.users += B
        s.generations += B * M
        s.non_items_top1 += int((~is_item[:, 0]).sum())
        s.non_items += int((~is_item).sum())
        left = torch.bincount(self._grounder.last_depth[~is_item.view(-1)], minlength=L)[:L].tolist()
        s.left_at_level = left if s.left_at_level is None else [a + b for a, b in zip(s.left_at_level, left, strict=True)]
        s.ground_seconds += t2 - t1
        s.decode_seconds += t2 - t0
        return Ranking(self.item_ids[rows], out_scores, self.codes_of_rows(rows), GENERATION_LOG_PROB, False)
