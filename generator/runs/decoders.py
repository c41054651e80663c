"""Decoders for a loaded run, built through the one registry (``generator.decoding.registry``).

:func:`decoders_for` makes the registry's :class:`~generator.decoding.registry.Ingredients` from a run: its model,
tree, layout and IDs on the device, a dense head its design keeps beside the model (a T5 run's), the tree a causal model was trained with when items
were added since, the title run's tokenizer and (for ``title-grounded``) its encoder and catalogue title embeddings,
and the hybrid's fusion: a given ``alpha``, else the one stored for this checkpoint in ``RUN/hybrid.json``. Building
decoders reads the run and writes nothing: the fusion is chosen by an explicit step, :func:`choose_run_fusion`
(``semid choose-fusion``, and ``semid train`` at its end for a run with a dense head).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding import registry
from generator.decoding.protocol import Decoder, as_int, check_alpha
from generator.decoding.registry import CAUSAL, TITLE, Ingredients
from generator.decoding.titles import LENGTH_PENALTY, TITLE_GROUNDED
from generator.designs.registry import DESIGNS
from generator.runs import fusion_store
from generator.runs.folder import check_same_items
from semid.data import load_catalogue, load_dataset
from semid.split import Split, leave_one_out
from semid.tree import PrefixTree


def trained_tree(run: Any) -> PrefixTree | None:
    """The prefix tree of the items a causal run's model was trained with, when items were added since (else None)."""
    n0 = run.model.trained_items
    if n0 == run.ids.num_items:
        return None
    return PrefixTree.from_semantic_ids(run.ids.head(n0), run.layout).to(run.tree.device)


def decoders_for(run: Any, names: tuple[str, ...] | list[str], *, alpha: float | None = None, num_beams: int = 20,
                 num_candidates: int | None = None, cold_items: np.ndarray | None = None, cold_options: dict[str, Any] | None = None,
                 length_penalty: float | None = None, fusion: tuple[str, dict] | float | None = None,
                 key: dict[str, str] | None = None, table_dtype: str = "float32", release_tables: bool = False,
                 data: str | os.PathLike[str] | None = None) -> dict[str, Decoder]:
    """The run's decoders by (resolved) name, on the model's device (the run's tree must be there too).

    Args:
        names: registry names ("auto" resolves per backbone).
        alpha: the hybrid's blend weight (for a causal run: the pool blend with this weight); None: the fusion stored
            for this checkpoint in RUN/hybrid.json (a ValueError saying to run `semid choose-fusion` if there is none).
        fusion: the stored fusion when the caller has read it already (a T5 alpha or a causal (kind, params)).
        key: ``fusion_store.choice_key(run)`` when the caller has it (it hashes the checkpoint file).
        num_candidates: C per list for the hybrids (default: the C the stored fusion was chosen for, else 50).
        cold_items, cold_options: ``cold-beam``'s cold item ids and ``ColdStartBeam`` options.
        length_penalty: title runs' length normalisation (default ``LENGTH_PENALTY``).
        table_dtype, release_tables: a causal run's serving tables in 16 bits, and its model's N-row tables freed once
            the decoders are built (``Ingredients``; release only a model nothing else will use).
    """
    backbone = run.design
    wanted = [registry.resolve(backbone, n) for n in names]
    if num_candidates is None and "hybrid" in wanted:  # (only the hybrid reads C: its current fusion's)
        key = fusion_store.choice_key(run) if key is None else key
        num_candidates = fusion_store.stored_candidates(run, key)
    num_candidates = fusion_store.DEFAULT_CANDIDATES if num_candidates is None else num_candidates
    if alpha is not None:
        check_alpha(alpha)
        if "hybrid" not in wanted:  # no decoder but the hybrid reads it: ignoring it would mislead
            raise ValueError(f"`alpha` is the hybrid decoder's blend weight, and decoder {', '.join(wanted)} does not use "
                             f"it (got alpha = {alpha!r}); leave out --alpha, or pass --decoder hybrid")
    device = next(run.model.parameters()).device
    if run.tree is not None and run.tree.device != device:  # (None: a lean serving load, Recommender.from_run)
        raise ValueError(f"the run's tree is on {run.tree.device} and its model on {device}: move both "
                         "(`generator.runs.recommender.on_device`)")
    if backbone != CAUSAL and table_dtype != "float32":
        raise ValueError(f"`table_dtype` {table_dtype!r} (16-bit serving tables) is for causal runs; this is a {backbone} run")
    ing = Ingredients(backbone, run.model, run.tree, run.layout, run.ids, num_beams=num_beams, num_candidates=num_candidates,
                      cold_items=cold_items, cold_options=dict(cold_options or {}), table_dtype=table_dtype,
                      release_tables=release_tables and backbone == CAUSAL)
    if "hybrid" in wanted:
        ing.fusion = (("blend", {"alpha": float(alpha)}) if alpha is not None else fusion if fusion is not None
                      else stored_fusion(run, num_candidates, key))
    load_head = DESIGNS[backbone].dense_head
    if load_head is not None and {"dense", "hybrid"} & set(wanted):
        ing.dense_head = load_head(run)
    elif backbone == CAUSAL:
        ing.trained_tree = trained_tree(run)
    elif backbone == TITLE:
        ing.title = {"length_penalty": LENGTH_PENALTY if length_penalty is None else length_penalty, "tokenizer": run.tokenizer}
        if TITLE_GROUNDED in wanted:
            ing.title.update(_grounding_encoder(run, device, data))
    return registry.build_many(ing, wanted)


def no_fusion_error(run: Any) -> ValueError:
    best = run.config.get("best_checkpoint") if isinstance(getattr(run, "config", None), dict) else None
    if best is not None and Path(run.checkpoint).resolve() != (Path(run.path) / best).resolve():
        return ValueError(f"{run.path}: no hybrid fusion is stored for checkpoint {Path(run.checkpoint).name} (`semid "
                          "choose-fusion` chooses one for the run's best checkpoint only): give a blend weight for this "
                          "one (`--alpha A`; `alpha=` in Python)")
    return ValueError(f"{run.path}: no hybrid fusion is stored for this checkpoint ({fusion_store.HYBRID_FILE} is missing or "
                      f"was chosen for another checkpoint, IDs or candidate count): run `semid choose-fusion --run {run.path}` once to "
                      "choose it on validation users, or give a blend weight (`--alpha A`; `alpha=` in Python)")


def stored_fusion(run: Any, num_candidates: int, key: dict[str, str] | None = None, *, required: bool = True
                  ) -> tuple[str, dict] | None:
    """The hybrid's fusion (kind, params) stored for this checkpoint; None (or, with ``required``, the ValueError of
    :func:`no_fusion_error`) when none is."""
    found = fusion_store.stored_fusion(run, min(num_candidates, run.ids.num_items), key)  # C as the hybrids cap it
    if found is None and required:
        raise no_fusion_error(run)
    return found


def choose_run_fusion(run: Any, split: Split | None = None, *, num_candidates: int = 50, num_beams: int = 20,
                      users: int | None = None, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Choose the hybrid's fusion on validation users of ``split`` (default: the run's dataset) and store it in
    ``RUN/hybrid.json`` (never test users); returns what was chosen: ``{"fusion": kind, "params": ...}``. The one
    step that writes the fusion.

    Args:
        users: validation users to fit on, and as many to choose on (default: 2,000 for T5 runs, whose hybrid
            teacher-forces its candidates; 5,000 for causal runs).
    """
    num_candidates, num_beams, batch_size, users = (as_int(v) for v in (num_candidates, num_beams, batch_size, users))
    for name, value in (("num_candidates", num_candidates), ("num_beams", num_beams), ("batch_size", batch_size),
                        ("users", 1 if users is None else users)):  # (numpy's ints taken: as_int; written to JSON)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if run.design not in registry.with_hybrid():
        raise ValueError(f"{run.path}: a {run.design} run has no hybrid decoder (it is for {' and '.join(registry.with_hybrid())} runs)")
    if split is None:
        split = leave_one_out(load_dataset(run.data_dir))
    C = min(num_candidates, run.ids.num_items)
    ing = Ingredients(run.design, run.model, run.tree, run.layout, run.ids, num_beams=num_beams, num_candidates=C)
    load_head = DESIGNS[run.design].dense_head
    if load_head is not None:
        ing.dense_head = load_head(run)
    elif not run.model.has_dense:  # the causal model holds its own head
        raise ValueError(f"{run.path}: this run has no dense head (it was trained with dense_dim 0), so no hybrid to choose for")
    else:
        ing.trained_tree = trained_tree(run)
    parts_of, kinds, default_users = registry.hybrid_parts(ing)
    users = users or default_users
    chosen = fusion_store.choose_fusion(run, parts_of, split, num_candidates=C, kinds=kinds, max_users=users,
                                        batch_size=batch_size, seed=seed)
    return {"fusion": chosen.kind, "params": chosen.params}


def _grounding_encoder(run: Any, device: torch.device, data: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``title-grounded``'s sentence encoder (named at training time) and the catalogue's title embeddings (the titles
    of ``data``, a folder holding the run's items, default the run's own: a moved dataset is read where it is now)."""
    from generator.runs.titles import catalogue_title_embeddings
    from semid.embed import load_encoder

    enc_dir = run.config["train"].get("encoder")
    if enc_dir is None:
        raise ValueError(f"{run.path}: decoder {TITLE_GROUNDED!r} embeds generated titles with a sentence encoder, and this run "
                         "names none: train it with `--encoder DIR` (a local model folder, as for `semid embed`)")
    encoder = load_encoder(enc_dir, device)
    folder = run.data_dir if data is None else check_same_items(run.config, run.path, data)
    catalogue = load_catalogue(folder)  # once: it parses the items file
    titles = [catalogue.title_of(int(i)) for i in run.ids.item_ids]
    return {"encoder": encoder, "item_emb": torch.from_numpy(catalogue_title_embeddings(run.path, titles, encoder, enc_dir))}
