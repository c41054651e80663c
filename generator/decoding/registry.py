"""The one registry of decoders: every name semid decodes with, what it serves, and how it is built.

The command line (``--decoder`` choices and help), training validation, evaluation, recommendation and the
experiments all read this table and build decoders with :func:`build`. A decoder is built for one backbone from
:class:`Ingredients` (the model and what its decoders need); the run layer (``generator.runs.decoders``) makes the
ingredients from a run folder, including the hybrid's fusion chosen on validation users.

The causal and title backbones are built in; a design plug-in registers its backbone with :func:`register` when it
is imported (``generator.t5.decoders``: T5's decoders and its ``generate``). ``generator.designs.registry`` imports
every plug-in, so the table is whole once that module is loaded (``generator.designs.registry.decoder_names``).

Imports go one way: ``protocol`` <- the decoder modules <- ``registry`` <- a plug-in's registration, ``generator.runs``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from generator.decoding.causal import CausalDecoders
from generator.decoding.cold import ColdStartBeam
from generator.decoding.fusion import FUSIONS, Parts
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
    Histories,
    StateDecoder,
)
from generator.decoding.titles import TITLE_BEAM, TITLE_GROUNDED, TitleDecoders

CAUSAL, TITLE = "causal", "title"


class DecoderSpec(NamedTuple):
    """One decoder: its ``name``, the ``backbones`` it serves, what its scores are, whether its items are tree
    leaves, whether training may select checkpoints by it (``selects``), and a one-line summary for help texts."""

    name: str
    backbones: tuple[str, ...]
    score: str
    leaves: bool
    selects: bool
    summary: str


SPECS: dict[str, DecoderSpec] = {s.name: s for s in (  # the built-in backbones'; a plug-in adds itself (register)
    DecoderSpec("beam", (CAUSAL,), LOG_LIKELIHOOD, True, True, "constrained beam search over the prefix tree"),
    DecoderSpec("exact", (CAUSAL,), LOG_LIKELIHOOD, True, True, "every item ranked by its log-likelihood"),
    DecoderSpec("dense", (CAUSAL,), INNER_PRODUCT, False, True, "inner-product search over the dense head's item vectors"),
    DecoderSpec("hybrid", (CAUSAL,), f"{BLEND} | {FUSED}", False, False,
                "both heads fused, the fusion chosen on validation users (RUN/hybrid.json)"),
    DecoderSpec("cold-beam", (CAUSAL,), PREFIX_MATCHED, False, False,
                "beam search, plus cold items sharing a candidate's semantic-ID prefix (TIGER's cold start)"),
    DecoderSpec(TITLE_BEAM, (TITLE,), TITLE_LOG_PROB, True, True, "beam search over the title tree (GENRE)"),
    DecoderSpec(TITLE_GROUNDED, (TITLE,), COSINE, False, False,
                "free title beam, embedded, nearest titles (BIGRec baseline)"),
    DecoderSpec(CODES_GROUNDED, (CAUSAL,), GENERATION_LOG_PROB, False, False,
                "free code beam, grounded to the nearest real ID (BIGRec baseline on semantic IDs)"),
)}


BEAMLESS = frozenset({"exact", "dense"})  # decoders with no beams: a beam count changes nothing they rank
# decoders whose top-k is the first k of their top-n (n > k) at a given beam count: a call may ask one for more items
# than a history needs (the batch's most) and cut, and gets what that history alone gets
PREFIX_CONSISTENT = frozenset({"beam", "exact", "dense", "hybrid", "title-beam"})


def names() -> tuple[str, ...]:
    """Every decoder name, "auto" first, in registry order (with those of the plug-ins registered so far)."""
    return ("auto", *SPECS)


def names_for(backbone: str) -> tuple[str, ...]:
    """The decoders a backbone serves, in registry order."""
    return tuple(n for n, s in SPECS.items() if backbone in s.backbones)


def resolve(backbone: str, name: str) -> str:
    """``name`` for ``backbone`` ("auto" becomes its default), or a ValueError naming the decoders it has."""
    if backbone not in BACKBONES:
        raise ValueError(f"`backbone` must be one of {list(BACKBONES)}, got {backbone!r}")
    entry = BACKBONES[backbone]
    name = entry.auto if name == "auto" else entry.aliases.get(name, name)
    if name not in SPECS:
        raise ValueError(f"`decoder` must be one of {list(names())}, got {name!r}")
    if backbone not in SPECS[name].backbones:
        runs = " or ".join(f"{b} runs" for b in SPECS[name].backbones)
        raise ValueError(f"decoder {name!r} is for {runs}; this {backbone} run has {['auto', *names_for(backbone)]}")
    return name


def help_text(wanted: tuple[str, ...] | None = None) -> str:
    """One line per decoder (default: every one) for ``--decoder`` help."""
    lines = [f"{n}: {SPECS[n].summary} [{'/'.join(SPECS[n].backbones)}; scores: {SPECS[n].score}]"
             for n in (names() if wanted is None else wanted) if n in SPECS]
    return "auto: beam (title-beam for a title run, where beam means title-beam too); " + "; ".join(lines)


@dataclass
class Ingredients:
    """What the decoders of one trained model are built from (all on the model's device).

    backbone: one of :data:`BACKBONES`; model: the network (CausalGenerator, TitleGenerator or a plug-in's, such as
    T5's T5ForConditionalGeneration) in eval mode; tree: the items' prefix tree (the title tree for a title run); layout and ids: the
    token layout and semantic IDs the model was trained with (after ``add-items``, the extended IDs).
    num_beams: beams of beam searches; num_candidates: C per list for the hybrids.
    dense_head: a dense head kept beside the model (a T5 run's; None: none). fusion: the hybrid's (kind, params), chosen on validation users
    by the run layer.
    trained_tree: a causal model's tree of the items it was trained with, when items were added since.
    cold_items: int (M,) item ids for ``cold-beam`` (default for a causal run: the items added after training);
    cold_options: ``ColdStartBeam`` keyword arguments (``epsilon``, ``prefix_levels``, ``max_per_prefix``, ...).
    title: ``TitleDecoders`` keyword arguments of a title run (``length_penalty``, ``tokenizer``, ``encoder``,
    ``item_emb``).
    item_ids, codes: LongTensors (N,), (N, L) standing for ``ids`` where only they are at hand (training validation
    of the item-level models; ``ids`` may then be None).
    table_dtype: a causal model's serving tables (edge tables, item vectors): "float32", or 16 bits ("float16",
    "bfloat16"; ``generator.decoding.paths``). release_tables: free the causal model's N-row tables once the decoders
    hold what they give (``CausalDecoders.refresh(release=True)``; not with ``codes-grounded``, which reads them): for
    a model that nothing else will use.
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
    table_dtype: str = "float32"
    release_tables: bool = False

    def item_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.item_ids is not None:
            return self.item_ids, self.codes
        return torch.from_numpy(self.ids.item_ids), torch.from_numpy(self.ids.codes)


def build(ing: Ingredients, name: str) -> Decoder:
    """The decoder ``name`` (or "auto") for the model in ``ing``."""
    return build_many(ing, (name,))[resolve(ing.backbone, name)]


def build_many(ing: Ingredients, names: tuple[str, ...] | list[str]) -> dict[str, Decoder]:
    """Decoders by (resolved) name for one model, built by its backbone's entry (decoders of an item-level model
    share item paths, edge tables and item vectors: one ``CausalDecoders``)."""
    wanted = [resolve(ing.backbone, n) for n in names]
    return BACKBONES[ing.backbone].build(ing, wanted)


def hybrid_parts(ing: Ingredients) -> tuple[Callable[[Histories], Parts], tuple[str, ...], int]:
    """What choosing the hybrid's fusion reads for the model in ``ing``: the hybrid's parts of a batch of histories,
    the fusions it may take and the validation users to fit on by default (a ValueError where the backbone has no
    hybrid)."""
    entry = BACKBONES[ing.backbone]
    if entry.hybrid_parts is None:
        raise ValueError(f"a {ing.backbone} run has no hybrid decoder (it is for {' and '.join(with_hybrid())} runs)")
    return entry.hybrid_parts(ing), entry.fusions, entry.fusion_users


def with_hybrid() -> tuple[str, ...]:
    """The backbones with a hybrid decoder (a fusion to choose)."""
    return tuple(b for b, e in BACKBONES.items() if e.hybrid_parts is not None)


def _title(ing: Ingredients, wanted: list[str]) -> dict[str, Decoder]:
    item_ids, codes = ing.item_tensors()
    shared = TitleDecoders(ing.model, ing.tree, item_ids, codes, num_beams=ing.num_beams, **ing.title).to(_device(ing.model))
    return {n: StateDecoder(shared, n, score=SPECS[n].score, leaves=SPECS[n].leaves) for n in wanted}


def causal_release(wanted: list[str], release_tables: bool) -> bool:
    """Whether a causal build of ``wanted`` releases the model's N-row tables: asked, and no decoder reads them
    (``codes-grounded`` does). With ``causal.drops_tree`` it decides whether the build reads the prefix tree."""
    return bool(release_tables) and CODES_GROUNDED not in wanted


def _causal(ing: Ingredients, wanted: list[str]) -> dict[str, Decoder]:
    kind = GroundedCodeDecoders if CODES_GROUNDED in wanted else CausalDecoders
    shared = kind(ing.model, ing.tree, ing.item_tensors()[0], num_beams=ing.num_beams, num_candidates=ing.num_candidates,
                  trained_tree=ing.trained_tree, table_dtype=ing.table_dtype
                  ).refresh(release=causal_release(wanted, ing.release_tables))
    shared.fusion = ing.fusion
    out: dict[str, Decoder] = {}
    for n in wanted:  # loop over names (a handful)
        if n == "cold-beam":
            cold = ing.cold_items
            if cold is None:
                cold = ing.ids.item_ids[ing.model.trained_items :]
            if len(cold) == 0:
                raise ValueError("decoder 'cold-beam' needs cold items: add items to the run (`semid add-items`), or give "
                                 "them in Python (`cold_items=`)")
            beam = StateDecoder(shared, "beam", score=LOG_LIKELIHOOD, leaves=True)
            out[n] = ColdStartBeam(beam, ing.ids, cold, **ing.cold_options)
        else:
            score = (BLEND if shared.fusion is None or shared.fusion[0] == "blend" else FUSED) if n == "hybrid" else SPECS[n].score
            out[n] = StateDecoder(shared, n, score=score, leaves=SPECS[n].leaves)
    return out


def _causal_hybrid(ing: Ingredients) -> Callable[[Histories], Parts]:
    shared = build_many(ing, ["exact"])["exact"].shared  # the run's CausalDecoders (paths, tables, vectors)
    return functools.partial(shared.history_parts, levels=True)  # with the per-level terms the `levels` fusion reads


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class Backbone:
    """What a backbone registers: ``build(ing, names) -> {name: Decoder}`` (names resolved), what "auto" means, its
    aliases, and for a hybrid: ``hybrid_parts(ing)`` (the hybrid's parts of a batch of histories), the ``fusions``
    it may take and the validation users its fusion is fitted on by default (``fusion_users``)."""

    build: Callable[[Ingredients, list[str]], dict[str, Decoder]]
    auto: str
    aliases: Mapping[str, str] = field(default_factory=dict)
    hybrid_parts: Callable[[Ingredients], Callable[[Histories], Parts]] | None = None
    fusions: tuple[str, ...] = ()
    fusion_users: int = 0


BACKBONES: dict[str, Backbone] = {
    CAUSAL: Backbone(_causal, "beam", hybrid_parts=_causal_hybrid, fusions=FUSIONS, fusion_users=5000),
    TITLE: Backbone(_title, TITLE_BEAM, aliases={"beam": TITLE_BEAM}),  # a title run's beam search is its title beam
}


def register(name: str, backbone: Backbone, serves: tuple[str, ...], specs: tuple[DecoderSpec, ...] = ()) -> None:
    """Register a design plug-in's backbone ``name`` (once, when the plug-in is imported): it ``serves`` these
    registered decoders and adds ``specs``, decoders of its own (naming it among their backbones)."""
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is registered already")
    for spec in specs:
        if spec.name in SPECS or name not in spec.backbones:
            raise ValueError(f"decoder {spec.name!r} is registered already, or is not for backbone {name!r}")
    unknown = [n for n in serves if n not in SPECS]
    if unknown:
        raise ValueError(f"backbone {name!r} serves unregistered decoders {unknown}: register them in `specs`")
    for n in serves:
        SPECS[n] = SPECS[n]._replace(backbones=(*SPECS[n].backbones, name))
    SPECS.update((spec.name, spec) for spec in specs)
    BACKBONES[name] = backbone
