"""The one registry of designs, and the one checkpoint loader (every design's checkpoint loads through it).

    design = for_options(options.preset, options.target)   # training
    design = for_config(read_config(run_dir))               # a run folder
    loaded = load_checkpoint(path, ids)                      # any design's checkpoint, from its file alone

The one module that imports the design plug-ins (``generator.t5``): importing its design entry registers the
plug-in's decoders too, so once this module is loaded the decoder registry is whole (:func:`decoder_names`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from generator.decoding import registry as decoding
from generator.designs.base import Design
from generator.designs.causal import CAUSAL
from generator.designs.title import TITLE_DESIGN
from generator.models.checkpoint import (
    CHECKPOINT_KEY,
    LoadedModel,
    check_finite,
    check_vocabulary,
    own_tensors,
    read_checkpoint,
)
from generator.models.dense import deferred_tables
from generator.t5.design import T5
from semid.ids import SemanticIDs

DESIGNS: dict[str, Design] = {d.name: d for d in (CAUSAL, T5, TITLE_DESIGN)}
PRESETS: tuple[str, ...] = tuple(dict.fromkeys(p for d in DESIGNS.values() if d.target == "ids" for p in d.presets))
TARGETS: tuple[str, ...] = tuple(dict.fromkeys(d.target for d in DESIGNS.values()))
_BY_CONFIG = {d.config: d for d in DESIGNS.values()}
UNNAMED = T5.name  # the design of a checkpoint whose config records none (T5's configs, from before designs were named)


def for_options(preset: str, target: str) -> Design:
    """The design a training with ``preset`` and ``target`` trains (errors name the option)."""
    if preset not in PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {preset!r}")
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {target!r}")
    found = [d for d in DESIGNS.values() if d.target == target]
    return next((d for d in found if preset in d.presets), found[0])  # found[0] refuses the preset in check_options


def recorded(design: Design) -> str:
    """What a run's config.yaml records as its ``design`` (a title run records its backbone's: causal)."""
    return design.backbone or design.name


def for_config(config: dict[str, Any]) -> Design:
    """The design of a run from its config.yaml: ``train.target`` where it is not "ids", else ``design``."""
    target = (config.get("train") or {}).get("target", "ids")
    if target != "ids":
        return next(d for d in DESIGNS.values() if d.target == target)
    return DESIGNS[config["design"]]


def of_model_config(config: Any) -> Design:
    """The design of a model config (a ``CausalConfig``, T5 ``GeneratorConfig`` or ``TitleConfig``)."""
    return _BY_CONFIG[type(config)]


def names(recordable: bool = False) -> tuple[str, ...]:
    """The designs' names (``recordable``: those config.yaml's ``design`` may hold)."""
    return tuple(dict.fromkeys(recorded(d) if recordable else d.name for d in DESIGNS.values()))


def decoder_names() -> tuple[str, ...]:
    """Every decoder name, "auto" first: the built-in backbones' and every plug-in's (for ``--decoder`` choices)."""
    return decoding.names()


def decoder_help() -> str:
    """``--decoder`` help: one line per decoder, the plug-ins' included."""
    return decoding.help_text()


def load_checkpoint(path: str | os.PathLike[str], ids: SemanticIDs | None = None, *, mmap: bool = False) -> LoadedModel:
    """Rebuild the model of any design from a checkpoint file alone; with ``ids``, refuse one whose vocabulary does
    not match. Returns the model in eval mode on the CPU (errors name the file: a damaged record, NaN weights,
    sizes the weights do not have, other semantic IDs).

    ``mmap``: the file is memory-mapped (copy-on-write) rather than read into memory, and a design that
    ``maps_weights`` (causal) keeps its tensors as the model's: no second copy, and its N-row tables are never
    allocated or initialised (a server's start-up then holds the model once, as file pages that the serving build
    reads and releases: ``generator.runs.recommender.Recommender.from_run``). The model reads the file for as long as
    it holds those tensors (:func:`generator.models.checkpoint.own_tensors` ends that); other designs copy their
    parameters, and every design's buffers are copied here. A file of other dtypes than the model's is converted
    (as a read whole is). Writers must rename a new file into place (semid's do): one rewritten in place while a
    model reads it may crash the process (SIGBUS) or mix two files' weights (``Recommender.from_run`` refuses a
    checkpoint that changed while it was built)."""
    path = Path(path)
    meta, layout, state = read_checkpoint(path, mmap=mmap)
    try:
        design = DESIGNS[meta["config"].get("design", UNNAMED)]
        config = design.config.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: the checkpoint's `{CHECKPOINT_KEY}` record is damaged ({type(e).__name__}: {e}); use another "
                         "checkpoint or train again") from None
    if ids is not None:
        check_vocabulary(layout, meta["ids_digest"], ids, source=str(path))
    check_finite(state, path)
    assign = mmap and design.maps_weights
    with deferred_tables() if assign else nullcontext():
        model = design.build(config, layout, state, path, ids)  # every size checked against the file's tensors first
    if assign:  # a tensor kept as it is must have the model's dtype (a copy into the model converts it)
        want = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
        state = {k: v.to(want[k]) if k in want and v.dtype != want[k] else v for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=assign)
        if mmap:
            own_tensors(model, parameters=False)  # the N-row tables stay the file's pages until serving releases them
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the model its own config describes ({str(e).splitlines()[0]}); the file is damaged") from None
    model.eval()
    return LoadedModel(model, config, layout, meta["ids_digest"])
