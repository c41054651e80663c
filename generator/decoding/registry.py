"""The one registry of decoders: every name semid decodes with, what it serves, and how it is built.

The command line (``--decoder`` choices and help), training validation, evaluation, recommendation and the
experiments all read this table and build decoders with :func:`build`. A decoder is built for one backbone from
:class:`Ingredients` (the model and what its decoders need); the run layer (``generator.runs.decoders``) makes the
ingredients from a run folder, including the hybrid's fusion chosen on validation users.

Imports go one way: ``protocol`` <- the decoder modules <- ``registry`` <- ``generator.runs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from generator.decoding.causal import CausalDecoders, StateDecoder
from generator.decoding.cold import ColdStartBeam
from generator.decoding.grounding import CODES_GROUNDED, GroundedCodeDecoders
from generator.decoding.protocol import (
    BLEND,
    COSINE,
    FUSED,
    GENERATION_LOG_PROB,
    INNER_PRODUCT,
    LOG_LIKELIHOOD,
    PREFIX_MATCHED,
    TITLE_LOG_PROB,
    Decoder,
)
from generator.decoding.titles import TITLE_BEAM, TITLE_GROUNDED, TitleDecoders
from generator.t5.beam import T5Beam
from generator.t5.dense import T5Dense
from generator.t5.generate import T5Generate
from generator.t5.hybrid import T5Hybrid

T5, CAUSAL, TITLE = "t5", "causal", "title"
BACKBONES = (T5, CAUSAL, TITLE)


class DecoderSpec(NamedTuple):
    """One decoder: its ``name``, the ``backbones`` it serves, what its scores are, whether its items are tree
    leaves, whether training may select checkpoints by it (``selects``), and a one-line summary for help texts."""

    name: str
    backbones: tuple[str, ...]
    score: str
    leaves: bool
    selects: bool
    summary: str


SPECS: dict[str, DecoderSpec] = {s.name: s for s in (
    DecoderSpec("beam", (T5, CAUSAL), LOG_LIKELIHOOD, True, True, "constrained beam search over the prefix tree"),
    DecoderSpec("generate", (T5,), LOG_LIKELIHOOD, True, True,
                "stock transformers generate + PrefixTreeLogitsProcessor (the reference; slow)"),
    DecoderSpec("exact", (CAUSAL,), LOG_LIKELIHOOD, True, True, "every item ranked by its log-likelihood"),
    DecoderSpec("dense", (T5, CAUSAL), INNER_PRODUCT, False, True, "inner-product search over the dense head's item vectors"),
    DecoderSpec("hybrid", (T5, CAUSAL), f"{BLEND} | {FUSED}", False, False,
                "both heads fused, the fusion chosen on validation users (RUN/hybrid.json)"),
    DecoderSpec("cold-beam", (T5, CAUSAL), PREFIX_MATCHED, False, False,
                "beam search, plus cold items sharing a candidate's semantic-ID prefix (TIGER's cold start)"),
    DecoderSpec(TITLE_BEAM, (TITLE,), TITLE_LOG_PROB, True, True, "beam search over the title tree (GENRE)"),
    DecoderSpec(TITLE_GROUNDED, (TITLE,), COSINE, False, False,
                "free title beam, embedded, nearest titles (BIGRec baseline)"),
    DecoderSpec(CODES_GROUNDED, (CAUSAL,), GENERATION_LOG_PROB, False, False,
                "free code beam, grounded to the nearest real ID (BIGRec baseline on semantic IDs)"),
)}
AUTO = {T5: "beam", CAUSAL: "beam", TITLE: TITLE_BEAM}  # what "auto" means per backbone
ALIASES = {TITLE: {"beam": TITLE_BEAM}}  # a title run's beam search is its title beam
NAMES = ("auto", *SPECS)


def names_for(backbone: str) -> tuple[str, ...]:
    """The decoders a backbone serves, in registry order."""
    return tuple(n for n, s in SPECS.items() if backbone in s.backbones)


def resolve(backbone: str, name: str) -> str:
    """``name`` for ``backbone`` ("auto" becomes its default), or a ValueError naming the decoders it has."""
    if backbone not in BACKBONES:
        raise ValueError(f"`backbone` must be one of {list(BACKBONES)}, got {backbone!r}")
    name = AUTO[backbone] if name == "auto" else ALIASES.get(backbone, {}).get(name, name)
    if name not in SPECS:
        raise ValueError(f"`decoder` must be one of {list(NAMES)}, got {name!r}")
    if backbone not in SPECS[name].backbones:
        runs = " or ".join(f"{b} runs" for b in SPECS[name].backbones)
        raise ValueError(f"decoder {name!r} is for {runs}; this {backbone} run has {['auto', *names_for(backbone)]}")
    return name


def help_text(names: tuple[str, ...] = NAMES) -> str:
    """One line per decoder for ``--decoder`` help."""
    lines = [f"{n}: {SPECS[n].summary} [{'/'.join(SPECS[n].backbones)}; scores: {SPECS[n].score}]" for n in names if n in SPECS]
    return "auto: beam (title-beam for a title run, where beam means title-beam too); " + "; ".join(lines)


@dataclass
class Ingredients:
    """What the decoders of one trained model are built from (all on the model's device).

    backbone: one of :data:`BACKBONES`; model: the network (T5ForConditionalGeneration, CausalGenerator or
    TitleGenerator) in eval mode; tree: the items' prefix tree (the title tree for a title run); layout and ids: the
    token layout and semantic IDs the model was trained with (after ``add-items``, the extended IDs).
    num_beams: beams of beam searches; num_candidates: C per list for the hybrids.
    dense_head: a T5 run's dense head (None: none). fusion: the hybrid's (kind, params), chosen on validation users
    by the run layer.
    trained_tree: a causal model's tree of the items it was trained with, when items were added since.
    cold_items: int (M,) item ids for ``cold-beam`` (default for a causal run: the items added after training);
    cold_options: ``ColdStartBeam`` keyword arguments (``epsilon``, ``prefix_levels``, ``max_per_prefix``, ...).
    title: ``TitleDecoders`` keyword arguments of a title run (``length_penalty``, ``tokenizer``, ``encoder``,
    ``item_emb``).
    item_ids, codes: LongTensors (N,), (N, L) standing for ``ids`` where only they are at hand (training validation
    of the item-level models; ``ids`` may then be None).
    """

    backbone: str
    model: Any
    tree: Any
    layout: Any
    ids: Any
    num_beams: int = 20
    num_candidates: int = 50
    dense_head: Any = None
    fusion: tuple[str, dict] | None = None
    trained_tree: Any = None
    cold_items: np.ndarray | None = None
    cold_options: dict[str, Any] = field(default_factory=dict)
    title: dict[str, Any] = field(default_factory=dict)
    item_ids: torch.Tensor | None = None
    codes: torch.Tensor | None = None

    def item_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.item_ids is not None:
            return self.item_ids, self.codes
        return torch.from_numpy(self.ids.item_ids), torch.from_numpy(self.ids.codes)


def build(ing: Ingredients, name: str) -> Decoder:
    """The decoder ``name`` (or "auto") for the model in ``ing``."""
    return build_many(ing, (name,))[resolve(ing.backbone, name)]


def build_many(ing: Ingredients, names: tuple[str, ...] | list[str]) -> dict[str, Decoder]:
    """Decoders by (resolved) name for one model; decoders of an item-level model share item paths, edge tables and
    item vectors (one ``CausalDecoders``)."""
    wanted = [resolve(ing.backbone, n) for n in names]
    if ing.backbone == T5:
        return {n: _t5(ing, n) for n in wanted}
    if ing.backbone == TITLE:
        item_ids, codes = ing.item_tensors()
        shared = TitleDecoders(ing.model, ing.tree, item_ids, codes, num_beams=ing.num_beams, **ing.title).to(_device(ing.model))
        return {n: StateDecoder(shared, n, score=SPECS[n].score, leaves=SPECS[n].leaves) for n in wanted}
    kind = GroundedCodeDecoders if CODES_GROUNDED in wanted else CausalDecoders
    shared = kind(ing.model, ing.tree, ing.item_tensors()[0], num_beams=ing.num_beams, num_candidates=ing.num_candidates,
                  trained_tree=ing.trained_tree).refresh()
    shared.fusion = ing.fusion
    out: dict[str, Decoder] = {}
    for n in wanted:  # loop over names (a handful)
        if n == "cold-beam":
            cold = ing.cold_items
            if cold is None:
                cold = ing.ids.item_ids[ing.model.trained_items :]
            if len(cold) == 0:
                raise ValueError("decoder 'cold-beam' needs cold items: add items to the run (`semid add-items`) or pass them")
            beam = StateDecoder(shared, "beam", score=LOG_LIKELIHOOD, leaves=True)
            out[n] = ColdStartBeam(beam, ing.ids, cold, **ing.cold_options)
        else:
            score = (BLEND if shared.fusion is None or shared.fusion[0] == "blend" else FUSED) if n == "hybrid" else SPECS[n].score
            out[n] = StateDecoder(shared, n, score=score, leaves=SPECS[n].leaves)
    return out


def _t5(ing: Ingredients, name: str) -> Decoder:
    if name == "beam":
        return T5Beam(ing.model, ing.tree, ing.layout, num_beams=ing.num_beams)
    if name == "generate":
        return T5Generate(ing.model, ing.tree, ing.layout, num_beams=ing.num_beams)
    if name == "cold-beam":
        if ing.cold_items is None or len(ing.cold_items) == 0:
            raise ValueError("decoder 'cold-beam' on a T5 run needs `cold_items` (the items added after training: "
                         "`Ingredients(cold_items=...)`); from the command line it serves causal runs with added items")
        return ColdStartBeam(T5Beam(ing.model, ing.tree, ing.layout, num_beams=ing.num_beams), ing.ids, ing.cold_items,
                             **ing.cold_options)
    if ing.dense_head is None:
        raise ValueError(f"decoder {name!r} needs a dense head, and this run has none (train it with `semid train --dense both ...`)")
    if name == "dense":
        return T5Dense(ing.model, ing.dense_head, ing.ids)
    if ing.fusion is None:
        raise ValueError("the hybrid decoder needs its fusion (chosen on validation users by the run layer)")
    return T5Hybrid(ing.model, ing.tree, ing.layout, ing.dense_head, ing.ids, fusion=ing.fusion,
                    num_candidates=min(ing.num_candidates, ing.ids.num_items), num_beams=ing.num_beams)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
