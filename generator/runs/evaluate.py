"""Leave-one-out evaluation of a run with any decoder of the registry: Recall@K / NDCG@K over the catalogue.

Every user's held-out item (validation or test) is ranked among *all* items; no candidate sampling, and by default
no filtering of items the user has seen (the protocol of TIGER and the Beauty numbers in ../shared/data/README.md).
``exclude_history`` leaves the user's history out of each ranking: each user's is what
``Recommender.recommend([history], k, exclude_history=True)`` returns for it alone, the first k items of the decoder's
ranking that the user has not seen (the decoder asked for k more per distinct history item, with the beams such a
call gets: ``protocol.call_beams``), which is what ``semid serve`` answers by default. On a catalogue whose users
never take an item twice (Beauty's), a seen item in the top k is a slot wasted.

:func:`evaluate` is a read path: it writes no file and leaves the loaded run as it was (a model to be moved to
another device is copied); the hybrid reads the fusion stored by ``semid choose-fusion`` / ``semid train``.
:func:`evaluate_run` writes the metrics file only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from numbers import Real
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.decoding import registry
from generator.decoding.protocol import as_int, call_beams, check_decode_args, check_k
from generator.runs.batches import history_batches, split_batches
from generator.runs.decoders import decoders_for
from generator.runs.exclusion import distinct_counts, drop_history, with_beams, with_cold_cap
from generator.runs.folder import (
    HYBRID_FILE,
    Run,
    best_checkpoint,
    check_same_data,
    check_writable,
    load_run,
    metrics_file,
)
from generator.runs.pinning import file_state as _file_state
from generator.runs.recommender import on_device
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import file_sha256, write_json
from semid.metrics import RankingMetrics
from semid.safe_read import is_int
from semid.split import Split, leave_one_out

log = logging.getLogger(__name__)


class DecoderError(RuntimeError):
    """A decoder returned items outside the catalogue or the same item twice for one user: its metrics mean nothing."""


class EvalResult(NamedTuple):
    """Metrics of one evaluation. ``metrics`` holds ``recall@K`` and ``ndcg@K`` for each K."""

    split: str
    decoder: str  # "<backbone>.<registry name>", e.g. "causal.beam", "t5.hybrid"
    metrics: dict[str, float]
    users: int
    invalid_items: int  # items returned that are not in the catalogue (must be 0)
    duplicate_items: int  # items returned twice for one user (must be 0)
    seconds: float
    grounding: dict[str, Any] | None = None  # grounded decoders: generations that were not items, grounding time
    user_rows: np.ndarray | None = None  # (users,) the split's rows evaluated, in the order of ``ranks`` (None: unknown)
    ranks: np.ndarray | None = None  # (users,) each one's target rank in its top max(ks) (-1: not in it)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "decoder": self.decoder, **self.metrics, "users_evaluated": self.users,
                "invalid_items": self.invalid_items, "duplicate_items": self.duplicate_items,
                "seconds": round(self.seconds, 2), **({"grounding": self.grounding} if self.grounding is not None else {})}


def parse_ks(text: str) -> tuple[int, ...]:
    """``"5,10"`` -> (5, 10)."""
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise ValueError(f"`k` must be comma-separated positive ints, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"`k` must be comma-separated positive ints, got {text!r}")
    return ks


def evaluate(
    run: Run,
    split: Split,
    which: str = "test",
    *,
    ks: Sequence[int] = (5, 10),
    num_beams: int = 20,
    max_users: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    decoder: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
    alpha: float | None = None,
    length_penalty: float | None = None,
    table_dtype: str = "float32",
    release_tables: bool = False,
    exclude_history: bool = False,
) -> EvalResult:
    """Rank every (or a seeded sample of ``max_users``) user's held-out item over the whole catalogue.

    Args:
        which: "valid" (history = all but the last two items) or "test" (all but the last).
        ks: cut-offs; the decoder returns max(ks) items per user, so ``num_beams >= max(ks)``.
        decoder: a name of ``generator.decoding.registry`` for this run's backbone ("auto": its beam search); the
            hybrid's fusion is ``alpha``, or the one stored in RUN/hybrid.json (chosen on validation users, never
            test users, by ``semid choose-fusion``); without either, a ValueError says to choose it.
        length_penalty: title runs' length normalisation (default ``generator.decoding.titles.LENGTH_PENALTY``).
        table_dtype: a causal run's serving tables, "float32" or 16 bits (``generator.runs.recommender.Recommender``).
        release_tables: free the causal model's N-row tables once the decoder is built (the run given is then
            changed: for a run loaded for this evaluation alone, as :func:`evaluate_run` does).
        exclude_history: rank only items outside each user's history (see the module docstring): a user's ranking
            is what ``Recommender.recommend([history], k, exclude_history=True)`` serves for it alone (beams, and a
            hybrid's candidates, ``protocol.call_beams`` of k plus its distinct history items; users of one such
            count decoded together).
    """
    if which not in ("valid", "test"):  # (with exclude_history, any other name scored the test split)
        raise ValueError(f"`which` must be 'valid' or 'test', got {which!r}")
    name = registry.resolve(run.design, decoder)
    if which == "valid" and name == "hybrid" and alpha is None:
        raise ValueError(
            "the hybrid decoder's fusion is chosen on validation users, so scoring it on the validation split "
            "would grade it on the users it was tuned on; evaluate `split='test'` (--split test), or pass an explicit "
            "`alpha` (--alpha A) to score a fixed blend weight on the validation split"
        )
    if not isinstance(exclude_history, bool):
        raise TypeError(f"`exclude_history` must be a bool, got {exclude_history!r}")
    num_beams, max_users, seed, batch_size = (as_int(v) for v in (num_beams, max_users, seed, batch_size))
    ks = ks.tolist() if isinstance(ks, np.ndarray) else ks  # (cut-offs read from an array)
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks or not all(is_int(k) and k >= 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty list of positive int cut-offs such as (5, 10), got {ks!r}")
    if length_penalty is not None and run.design != "title":  # (it was taken, ignored, and written in the metrics)
        raise ValueError(f"`length_penalty` is for title runs' decoders; this is a {run.design} run: leave it out")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r}, but CUDA is not available here: pass 'cpu', or leave it out")
    ks = tuple(sorted(int(k) for k in ks))
    check_decode_args(ks[-1], num_beams, run.ids.num_items)
    if device is None:  # the accelerator where there is one, as training does
        device = "cuda" if torch.cuda.is_available() else next(run.model.parameters()).device
    run = on_device(run, device)  # a copy where the model must move: the run given is left as it was
    device = next(run.model.parameters()).device
    dec = decoders_for(run, [name], alpha=alpha, num_beams=num_beams, length_penalty=length_penalty, table_dtype=table_dtype,
                       release_tables=release_tables)[name]
    rows = sample_users(split.num_users, max_users, seed)
    metrics = RankingMetrics(ks)
    known = torch.from_numpy(run.ids.item_ids)
    invalid = duplicates = 0
    start = time.perf_counter()
    if exclude_history:
        rows, batches = _unseen_batches(run, split, which, rows, ks[-1], batch_size)
    else:
        made = split_batches(run, split, which, rows, batch_size)
        order = [b.rows for b in made]  # where each batch's users are in `rows`: the designs batch in their own order
        rows = rows if not made else rows[np.concatenate(order)] if all(o is not None for o in order) else None
        batches = [(b.histories, b.targets, 0, None) for b in made]
    # extra items -> the decoder with beams (and a hybrid's candidates) for k plus them; none: the loaded beams, and a
    # hybrid's candidates at least as many, as `Recommender.recommend` ranks (a stored C below them failed, or differed)
    decs = {0: with_beams(dec, num_beams, candidates=name == "hybrid")}
    for histories, targets, more, seen in tqdm(batches, desc=f"evaluate {which}", disable=not progress, unit="batch"):  # loop over batches of users
        want = ks[-1] + more
        if more not in decs:
            decs[more] = with_beams(dec, call_beams(want, num_beams, run.ids.num_items), candidates=name == "hybrid")
            decs[more] = with_cold_cap(decs[more], ks[-1]) if seen is not None else decs[more]  # (k's cold share)
        ranked = decs[more](histories.to(device), want)
        items = ranked.items.cpu()  # (B, want)
        if seen is not None:
            items = torch.from_numpy(drop_history(items.numpy(), ranked.scores.float().cpu().numpy(), seen, ks[-1])[0])
        invalid += int((~torch.isin(items, known)).sum())
        duplicates += int((items.sort(1).values.diff(dim=1) == 0).sum())
        metrics.update(items, targets)
    seconds = time.perf_counter() - start
    stats = getattr(getattr(dec, "shared", None), "stats", None)  # the grounded decoders count their generations
    result = EvalResult(which, f"{run.design}.{name}", metrics.compute(), metrics.count, invalid, duplicates, seconds,
                        None if stats is None else stats.as_dict(), rows, metrics.ranks())
    _check_result(result)
    log.info("evaluated %d %s users in %.1f s: %s", result.users, which, seconds, result.metrics)
    return result


def _unseen_batches(run: Run, split: Split, which: str, rows: np.ndarray, k: int, batch_size: int,
                    ) -> tuple[np.ndarray, list[tuple[Any, torch.Tensor, int, list[np.ndarray]]]]:
    """``rows`` grouped by their histories' distinct items (the extra items each user's own call asks for), and
    batches of up to ``batch_size`` users of one count: (histories as the Recommender batches them, targets, the
    count, the histories' item ids). Returns the rows in that order too (the order of the metrics' ranks)."""
    history = split.valid_history if which == "valid" else split.test_history
    targets = split.valid_targets if which == "valid" else split.test_targets
    hists = [history(int(r)) for r in rows]
    extra = distinct_counts(hists)
    check_k(k + int(extra.max(initial=0)), run.ids.num_items, "the catalogue size (k plus a history's distinct items to exclude)")
    order = np.argsort(extra, kind="stable")
    rows, extra, hists = rows[order], extra[order], [hists[i] for i in order]
    edges = np.flatnonzero(np.diff(extra, prepend=-1, append=-1))  # runs of one count
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):  # loop over counts (at most the longest history's)
        uids = split.user_ids[rows[a:b]] if getattr(run, "use_user_tokens", False) else None
        for lo, h in zip(range(a, b, batch_size), history_batches(run, hists[a:b], uids, batch_size), strict=True):
            part = slice(lo, min(lo + batch_size, b))
            out.append((h, torch.from_numpy(targets[rows[part]]), int(extra[a]), hists[part]))
    return rows, out


def _check_result(result: EvalResult) -> None:
    if result.invalid_items or result.duplicate_items:  # metrics of a broken decoder must not be reported as if valid
        raise DecoderError(
            f"decoder {result.decoder} returned {result.invalid_items} invalid and {result.duplicate_items} duplicate "
            f"items on {result.users} {result.split} users: the decoder is broken"
        )


def validated_decoder(objective: Any, dense: Any, decoder: Any) -> str:
    """The decoder training validates a run with (and evaluates all validation users with at its end), from its
    train options: the dense one for a dense-only run, else the one it serves (``--decoder``)."""
    return "dense" if objective == "dense" and dense else decoder if isinstance(decoder, str) else "auto"


def _served_decoder(run: Run) -> str:
    """The registry name of the decoder training validated the run with (config.yaml's train options,
    :func:`validated_decoder`; the backbone's "auto" where they name none of its decoders): its metrics are the
    protocol's file."""
    train = run.config.get("train") or {}
    try:
        return registry.resolve(run.design, validated_decoder(train.get("objective"), train.get("dense"), train.get("decoder")))
    except ValueError:
        return registry.resolve(run.design, "auto")


# evaluate()'s keyword arguments and their defaults, which evaluate_run passes on (release_tables is its own choice)
EVALUATE_DEFAULTS = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "release_tables"}


def protocol_beams(run: Run) -> int:
    """The beams of a run's protocol figures: those it was validated with (evaluate's default where none is recorded)."""
    beams = (run.config.get("train") or {}).get("num_beams")
    return beams if isinstance(beams, int) and not isinstance(beams, bool) else EVALUATE_DEFAULTS["num_beams"]


def _options_variant(run: Run, name: str, o: dict[str, Any], sampled: bool) -> list[str]:
    """The parts of a metrics file's name for options other than the protocol's, so that their figures never replace
    the protocol's file nor each other: beams other than the run's validation's (:func:`protocol_beams`; decoders with
    beams; 20 and the run's 30 both wrote one file), cut-offs other than (5, 10) (a --k 20 file held @20 alone), a
    sample's seed other than 0, a given ``alpha``, 16-bit tables, a given length penalty."""
    try:  # (bad cut-offs: evaluate refuses them, by name)
        ks = tuple(sorted(int(k) for k in o["ks"])) if all(is_int(k) for k in o["ks"]) else tuple(EVALUATE_DEFAULTS["ks"])
    except TypeError:
        ks = tuple(EVALUATE_DEFAULTS["ks"])
    return ([f"beams{o['num_beams']}"] if name not in registry.BEAMLESS and o["num_beams"] != protocol_beams(run) else []) + (
        [f"k{'-'.join(str(k) for k in ks)}"] if ks != tuple(EVALUATE_DEFAULTS["ks"]) else []) + (
        [f"seed{o['seed']}"] if sampled and o["seed"] != EVALUATE_DEFAULTS["seed"] else []) + (
        [f"alpha{o['alpha']:g}"] if o["alpha"] is not None else []) + (
        [o["table_dtype"]] if o["table_dtype"] != EVALUATE_DEFAULTS["table_dtype"] else []) + (
        [f"lp{o['length_penalty']:g}"] if o["length_penalty"] is not None else [])


def evaluate_run(
    run_dir: str | os.PathLike[str],
    which: str = "test",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    loaded: Callable[[], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a run folder and write ``RUN/metrics_<which>.json`` (atomically; a sample of ``max_users`` users
    writes ``RUN/metrics_<which>_sample<N>.json`` instead, another decoder than the run's default or a checkpoint
    other than its best or other options (:func:`_options_variant`) ``RUN/metrics_<which>_<decoder>[_<options>][_<checkpoint>].json``:
    :func:`~generator.runs.folder.metrics_file`);
    returns what was written, with ``file`` its path.

    Before anything is computed, the folder must take the file, and a ``data_dir`` must be the data the run was
    trained on (its fingerprint in config.yaml; runs trained before semid recorded one get a warning).

    Args:
        data_dir: the dataset folder (default: the one the run was trained on, from config.yaml).
        checkpoint: the checkpoint to evaluate (default: the run's best).
        loaded: called once the run is loaded, before anything is evaluated or written (a pin's check that the files
            loaded are the ones checked: what ``generator.runs.pinning.pin`` returns).
        options: :func:`evaluate`'s keyword arguments (``ks``, ``num_beams``, ``max_users``, ``seed``, ``decoder``,
            ``exclude_history``, ...); ``num_beams`` by default those the run was validated with (:func:`protocol_beams`). ``table_dtype``: a causal run's serving tables, "float32" or 16 bits (the
            model's N-row tables are freed once the decoder is built: the run is loaded for this evaluation alone);
            ``exclude_history``: rankings without each user's history, written to ``RUN/metrics_<which>_unseen.json``
            beside the protocol's file.
    """
    if which not in ("valid", "test"):
        raise ValueError(f"`split` must be 'valid' or 'test', got {which!r}")
    unknown = sorted(set(options) - set(EVALUATE_DEFAULTS))
    if unknown:
        raise TypeError(f"evaluate_run() got unknown options {unknown}; known: {sorted(EVALUATE_DEFAULTS)}")
    o = {**EVALUATE_DEFAULTS, **options, "release_tables": True}
    o.update((key, as_int(o[key])) for key in ("num_beams", "max_users", "seed", "batch_size"))  # (written to JSON)
    o.update((key, float(o[key])) for key in ("alpha", "length_penalty")  # numpy's floats, as JSON numbers
             if isinstance(o[key], Real) and not isinstance(o[key], bool))
    max_users, exclude_history = o["max_users"], o["exclude_history"]
    ckpt_path = Path(checkpoint) if checkpoint is not None else best_checkpoint(run_dir)
    seen = _file_state(ckpt_path)  # the checkpoint's digest is recorded: it must be the file that was loaded
    run = load_run(run_dir, checkpoint)  # any design
    if "num_beams" not in options:  # the beams the run was validated with: its protocol figures
        o["num_beams"] = protocol_beams(run)
    if loaded is not None:
        loaded()
    ckpt_sha256 = file_sha256(run.checkpoint)
    if _file_state(run.checkpoint) != seen:
        raise ValueError(f"{run.checkpoint}: replaced while it was loaded (a training writing it?); evaluate again")
    data = Path(data_dir) if data_dir is not None else run.data_dir
    dataset = load_dataset(data)
    check_same_data(run.config, run.path, data)
    if data_dir is not None:  # the run's data is read where it is now (title-grounded's titles: the recorded path was read)
        run = dataclasses.replace(run, config={**run.config, "data": str(data.resolve())})
    split = leave_one_out(dataset)
    sample = max_users if max_users is not None and max_users < split.num_users else None
    # the run's default decoder on its best checkpoint writes the protocol's file; any other decoder or checkpoint a
    # file of its own (it once replaced the best checkpoint's metrics)
    best = (run.path / str(run.config.get("best_checkpoint"))).resolve()
    name, served = registry.resolve(run.design, o["decoder"]), _served_decoder(run)
    other_checkpoint = checkpoint is not None and run.checkpoint.resolve() != best
    options_part = _options_variant(run, name, o, sample is not None)
    inside = run.checkpoint.resolve().is_relative_to(run.path.resolve())  # (another run's best.ckpt read as this one's)
    variant = ([name] if other_checkpoint or name != served or options_part else []) + options_part + (
        [Path(run.checkpoint).stem + ("" if inside else f"-{ckpt_sha256[:8]}")] if other_checkpoint else [])
    target = metrics_file(run.path, which, sample, unseen=exclude_history, variant="_".join(variant) or None)
    check_writable(target, f"the metrics ({target.name})")  # before the work, not after it
    if split.num_users and int(np.max(np.concatenate([split.valid_targets, split.test_targets]))) > int(run.ids.item_ids.max()):
        raise ValueError(f"{data}: the dataset has items the run's semantic IDs do not cover")
    fusion_file = run.path / HYBRID_FILE  # the stored fusion a hybrid ranks with: recorded, so it cannot outlive it
    fusion_seen = _file_state(fusion_file) if name == "hybrid" and o["alpha"] is None and fusion_file.is_file() else None
    result = evaluate(run, split, which, **o)
    # the run's best checkpoint was chosen on validation unless training ran none (then it is last.ckpt)
    selected = bool(run.config.get("selected_on_validation", True)) and (
        checkpoint is None or run.checkpoint.resolve() == best
    )
    if not selected:
        log.warning("%s: checkpoint %s was not selected on validation (no validation ran, or another checkpoint was "
                    "given)", run.path, run.checkpoint.name)
    out = {
        **result.to_dict(),
        "selected_on_validation": selected,
        "num_beams": o["num_beams"],
        "max_users": max_users,
        "seed": o["seed"],
        "exclude_history": exclude_history,
        # what else changes the rankings, where it is not the default (alpha: the hybrid's blend; length_penalty: a
        # title beam's)
        **{k: o[k] for k in ("table_dtype", "alpha", "length_penalty") if o[k] != EVALUATE_DEFAULTS[k]},
        "checkpoint": str(run.checkpoint.relative_to(run.path)) if run.checkpoint.is_relative_to(run.path) else str(run.checkpoint),
        "checkpoint_sha256": ckpt_sha256,  # (a resume that replaces it removes these metrics: runs.train)
        "data": str(data),
    }
    if fusion_seen is not None:
        out["hybrid_sha256"] = file_sha256(fusion_file)  # (`semid choose-fusion` removes metrics of another fusion)
        if _file_state(fusion_file) != fusion_seen:
            raise ValueError(f"{fusion_file}: replaced while it was evaluated (`semid choose-fusion`?): these metrics "
                             f"would describe a fusion no longer there; {target.name} left as it was: evaluate again")
    if _file_state(run.checkpoint) != seen:  # (a resume may replace best.ckpt while an evaluation runs)
        raise ValueError(f"{run.checkpoint}: replaced while it was evaluated (a training writing it?): these metrics "
                         f"would describe a checkpoint no longer there; {target.name} left as it was: evaluate again")
    write_json(target, out)
    return {**out, "file": str(target)}
