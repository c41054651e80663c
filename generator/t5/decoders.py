"""The T5 plug-in's decoders in the one registry (``generator.decoding.registry``): importing this module registers
the backbone ``t5`` (``beam`` and so ``auto``, ``dense``, ``hybrid``, ``cold-beam``, and its own ``generate``: stock
transformers ``generate``, the reference), how they are built, and what choosing its hybrid's fusion reads.

A dense decoder's MIPS index and a hybrid's item vectors are built here, with the decoder, so that a call only
decodes (training validation builds its decoder again for every validation pass: the weights changed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from generator.decoding import registry
from generator.decoding.cold import ColdStartBeam
from generator.decoding.fusion import POOL_FUSIONS, Parts
from generator.decoding.protocol import LOG_LIKELIHOOD, Decoder, Histories
from generator.decoding.registry import Backbone, DecoderSpec, Ingredients
from generator.t5.beam import T5Beam
from generator.t5.dense import T5Dense
from generator.t5.generate import T5Generate
from generator.t5.hybrid import T5Hybrid

T5 = "t5"  # the backbone's name, and the design's (config.yaml's `design`)
FUSION_USERS = 2000  # the hybrid teacher-forces its candidates: fewer validation users than the causal design's


def build_decoders(ing: Ingredients, wanted: list[str]) -> dict[str, Decoder]:
    """The T5 decoders by (resolved) name for the model in ``ing``."""
    return {n: _decoder(ing, n) for n in wanted}


def _decoder(ing: Ingredients, name: str) -> Decoder:
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
        dense = T5Dense(ing.model, ing.dense_head, ing.ids)
        dense.refresh()
        return dense
    if ing.fusion is None:
        raise ValueError("the hybrid decoder needs its fusion (chosen on validation users by the run layer)")
    hybrid = T5Hybrid(ing.model, ing.tree, ing.layout, ing.dense_head, ing.ids, fusion=ing.fusion,
                      num_candidates=min(ing.num_candidates, ing.ids.num_items), num_beams=ing.num_beams)
    hybrid.refresh()
    return hybrid


def hybrid_parts(ing: Ingredients) -> Callable[[Histories], Parts]:
    """The hybrid's parts of a batch of histories (its parts do not depend on the fusion: any pool fusion builds it)."""
    return registry.build(replace(ing, fusion=("blend", {"alpha": 0.5})), "hybrid").parts


registry.register(
    T5, Backbone(build_decoders, "beam", hybrid_parts=hybrid_parts, fusions=POOL_FUSIONS, fusion_users=FUSION_USERS),
    serves=("beam", "dense", "hybrid", "cold-beam"),
    specs=(DecoderSpec("generate", (T5,), LOG_LIKELIHOOD, True, True,
                       "stock transformers generate + PrefixTreeLogitsProcessor (the reference; slow)"),),
)
