"""``semid combine``: one run folder whose model is the members of several causal runs trained apart.

An ensemble's members train one after another inside one run (``CausalConfig.members``); runs of the same design
trained apart, at the same time on other cores or machines (other seeds), combine into the same ensemble: the new
run's model is :class:`~generator.models.ensemble.EnsembleGenerator` of every source's members (a one-member run adds
one, an ensemble all of its own), scoring an item by the sum of their log-likelihoods as a trained ensemble does.

The sources must share their data (the fingerprint in config.yaml), semantic IDs (the digest), token layout and model
config but for ``members``, have no items added after training, and are only read (each under its lock). The new
folder holds the first source's config.yaml with the members summed (its ``train:`` section and training figures are
the first source's, as ``combine.json`` says), the IDs, one checkpoint of every member's weights (loadable and
servable like any run's, not resumable), ``combine.json`` (the sources, their checkpoints' digests and every trained
model's: no model is counted twice, also through a combined source) and, as after training, the hybrid's fusion
chosen on validation users. Written in a temporary folder beside ``out`` and renamed into place when complete, so
``out`` is either absent or whole.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from generator.designs import registry
from generator.models.checkpoint import CHECKPOINT_KEY
from generator.models.ensemble import EnsembleGenerator, member_models
from generator.runs.derive import check_new_out, finish, new_run_folder, read_source, write_serving_checkpoint
from generator.runs.folder import COMBINE_FILE, IDS_FILE, read_config

log = logging.getLogger(__name__)


def _check_out(sources: list[Path], out: Path) -> None:
    if len(sources) < 2:
        raise ValueError(f"`semid combine` makes one run of two runs or more, got {len(sources)}: name each with --run")
    seen: dict[Path, Path] = {}
    for source in sources:  # loop over the sources (a few)
        if source.resolve() in seen:
            raise ValueError(f"{source}: named twice (as {seen[source.resolve()]}); name each run once")
        seen[source.resolve()] = source
    check_new_out(out, sources, "combine")
    for source in sources:
        design = registry.for_config(read_config(source)).name  # a title run records its backbone's design
        if design != "causal":
            raise ValueError(f"{source}: a run of the {design!r} design; `semid combine` makes an ensemble of runs of "
                             "the causal design (the default of `semid train`)")


def _held(source: Path, digest: str) -> set[str]:
    """The sha256 of every trained model's checkpoint ``source`` holds: its own and, for a combined run, its
    sources' and theirs (``combine.json``)."""
    path = source / COMBINE_FILE
    if not path.is_file():
        return {digest}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {digest, *(s["sha256"] for s in record["sources"]), *record.get("contains", [])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not the record `semid combine` writes ({e!r}); its members cannot be told apart from "
                         "the other runs': restore it") from e


def _check_distinct(sources: list[Path], digests: list[str]) -> set[str]:
    """Refuse a trained model counted twice: two sources holding the same checkpoint (a copied run folder), or a
    source that is already a member of another (combined) source. Returns every model's digest."""
    held = [_held(s, d) for s, d in zip(sources, digests, strict=True)]
    for i, (source, digest) in enumerate(zip(sources, digests, strict=True)):  # loop over pairs of sources (a few)
        for j, other in enumerate(sources):
            if i != j and digest == digests[j]:
                raise ValueError(f"{source} and {other}: hold the same checkpoint (sha256 {digest[:12]}), one trained model "
                                 "(a copied run folder?); combine runs trained apart (other seeds), each once")
            if i != j and digest in held[j]:
                raise ValueError(f"{source}: its model (checkpoint sha256 {digest[:12]}) is already a member of the combined "
                                 f"run {other} ({COMBINE_FILE}); combine {other} with the other runs only")
    return set().union(*held)


def _check_alike(sources: list[Path], runs: list[Any], configs: list[dict[str, Any]]) -> None:
    """Refuse sources another ensemble member could not join: other data, IDs, layout or model config."""
    def model_of(run: Any) -> dict[str, Any]:  # the loaded config: a field added since reads as its default
        return {k: v for k, v in run.model_config.to_dict().items() if k != "members"}

    first, first_model = configs[0], model_of(runs[0])
    for source, run, config in zip(sources, runs, configs, strict=True):  # loop over the sources (a few)
        for key in ("objective", "target"):  # a dense-only run's code head is untrained: it would join the beam's sum
            mine, theirs = (c.get("train", {}).get(key) for c in (config, first))
            if mine != theirs:
                raise ValueError(f"{source}: trained with {key} {mine!r}, {sources[0]} with {theirs!r}; combine runs "
                                 "trained alike")
        for key in ("data_fingerprint", "ids_digest"):
            if config.get(key) != first.get(key):
                raise ValueError(f"{source}: its {key} {str(config.get(key))[:40]} differs from {sources[0]}'s "
                                 f"{str(first.get(key))[:40]}; combine runs trained on the same data and semantic IDs")
        model = model_of(run)
        if model != first_model or run.layout.to_dict() != runs[0].layout.to_dict():
            diff = sorted(k for k in set(model) | set(first_model) if model.get(k) != first_model.get(k)) or ["layout"]
            raise ValueError(f"{source}: its model differs from {sources[0]}'s in {diff}; combine runs of one model "
                             "config (members aside)")


def combine_runs(run_dirs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, fusion: bool = True) -> dict[str, Any]:
    """Write the members of ``run_dirs`` as one ensemble run ``out_dir`` (module docstring). Returns what
    ``combine.json`` holds."""
    sources, out = [Path(r) for r in run_dirs], Path(out_dir)
    _check_out(sources, out)
    with new_run_folder(out, "combine") as tmp:
        runs, configs, metas, digests = zip(*(read_source(s, "combine", tmp / IDS_FILE if i == 0 else None)
                                              for i, s in enumerate(sources)), strict=True)  # loop over the sources (a few)
        _check_alike(sources, list(runs), list(configs))
        held = _check_distinct(sources, list(digests))
        members = [m for run in runs for m in member_models(run.model)]
        K = len(members)
        meta = dict(metas[0])
        meta[CHECKPOINT_KEY] = {**meta[CHECKPOINT_KEY], "config": {**meta[CHECKPOINT_KEY]["config"], "members": K}}
        hparams = dict(meta.get("hyper_parameters") or {})
        if isinstance(hparams.get("model"), dict):
            hparams["model"] = {**hparams["model"], "members": K}
        meta["hyper_parameters"] = hparams
        write_serving_checkpoint(tmp, meta, EnsembleGenerator.of(members).state_dict(),
                                 {**configs[0], "model": {**configs[0]["model"], "members": K}})
        record: dict[str, Any] = {
            "sources": [{"run": str(s.resolve()), "checkpoint": str(r.checkpoint.resolve()), "sha256": d,
                         "members": len(member_models(r.model)), "seed": c.get("train", {}).get("seed")}
                        for s, r, c, d in zip(sources, runs, configs, digests, strict=True)],
            "members": K,
            "contains": sorted(held),  # every trained model's checkpoint sha256, the sources' members' included
            "note": "config.yaml is the first source's with the members summed: its training figures are that run's",
        }
        del runs, members  # the weights, before the fusion loads the new run
        joint = configs[0].get("train", {}).get("objective", "joint") == "joint"  # as training: a dense-only run has no hybrid
        finish(tmp, COMBINE_FILE, record, fusion=fusion and joint and bool(configs[0]["model"].get("dense_dim", 0)))
    log.info("combined %d runs (%d members) into %s", len(sources), K, out)
    return record
