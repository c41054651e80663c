"""A loaded run that serves many calls: :class:`Recommender`.

    rec = Recommender.from_run("runs/demo/run")                      # loads and builds once
    recs = rec.recommend([[12, 45, 99]], k=10)                        # only decodes (default: beam search)
    recs = rec.recommend([[12, 45, 99]], k=10, decoder="hybrid", exclude_history=False)  # the history ranked too
    recs[0].items, recs[0].scores, rec.titles(recs[0].items)          # best first
    rec.version                                     # "ckpt-<sha256>.ids-<sha256>[.fusion-<sha256>]" (16, 16, 8 hex)

Everything derived from the weights and the catalogue is built when the run is loaded: the decoders of its backbone
(causal: beam, exact, dense and hybrid sharing one set of item paths, edge tables and item vectors; T5: beam,
generate, dense with its MIPS index, hybrid with its item vectors; title: title-beam), the hybrid's fusion read
from ``RUN/hybrid.json`` (chosen by ``semid choose-fusion`` or at the end of ``semid train``; never chosen here), the
checkpoint's and IDs' hashes and the hybrid's fusion (:attr:`Recommender.version`, computed once: all that decides the
answers), and the catalogue's id <-> asin and title
maps. A call checks its arguments, batches the histories, decodes and checks the items: no file is read or written,
nothing is hashed or rebuilt.

Thread safety: :meth:`Recommender.recommend` may be called from several threads at once. A call reads the loaded
state and writes none of it (decoding runs under ``torch.inference_mode``; each call's beams, masks and outputs are
its own tensors). Two caveats: the title decoders and ``codes-grounded`` add to running counts (``stats``), which
concurrent calls may under-count (their rankings are unaffected); ``codes-grounded`` also keeps per-call grounding
state on its shared decoder, so serve it from one thread. Torch's intra-op threads are shared by concurrent calls
(``torch.set_num_threads``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch

from generator.decoding import registry
from generator.decoding.causal import CausalDecoders, drops_tree
from generator.decoding.protocol import Decoder, as_int, call_beams, check_beams, check_k
from generator.decoding.registry import CAUSAL
from generator.designs.registry import DESIGNS
from generator.models.checkpoint import own_tensors
from generator.runs import fusion_store
from generator.runs.batches import history_batches, int_ids
from generator.runs.decoders import decoders_for, no_fusion_error, stored_fusion
from generator.runs.exclusion import distinct_counts, drop_history, with_beams, with_cold_cap
from generator.runs.folder import Run, best_checkpoint, check_same_items, load_run, read_config
from generator.runs.pinning import file_state as _file_state  # (one stat triple for pins, loads and evaluate)
from semid.data import Catalogue, load_catalogue
from semid.tree import PrefixTree

log = logging.getLogger(__name__)

DEFAULT_BEAMS = 20


class Recommendation(NamedTuple):
    """Top-k for one history, best first. items: int64 (k,) item ids; scores: float32 (k,), descending."""

    items: np.ndarray
    scores: np.ndarray


def on_device(run: Run, device: str | torch.device | None) -> Run:
    """``run`` with its model (eval mode) and tree on ``device``: ``run`` itself where they are there already, else a
    copy whose model is a deep copy; the run given is never changed (read paths leave a loaded run as it was)."""
    here = next(run.model.parameters()).device
    device = here if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tree_here = run.tree is None or run.tree.device == device  # (None: a lean load, Recommender.from_run)
    if device == here and tree_here and not run.model.training:
        return run
    model = copy.deepcopy(run.model).to(device).eval()
    return dataclasses.replace(run, model=model, tree=None if run.tree is None else run.tree.to(device))


def check_histories(histories: Sequence[Sequence[int]], item_ids: np.ndarray) -> list[np.ndarray]:
    """B non-empty histories of known item ids (``item_ids``: sorted int64 (N,)) as int64 arrays; a ValueError naming
    the first bad history otherwise."""
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence) or len(histories) == 0:
        raise ValueError(f"`histories` must be a non-empty list of item-id lists, got {histories!r}")
    out = [np.asarray(h) for h in histories]  # the input is a list of lists: one conversion each
    for i, arr in enumerate(out):
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"`histories[{i}]` must be a list of int item ids, got {histories[i]!r}")
        if arr.size == 0:
            raise ValueError(f"`histories[{i}]` is empty: a history needs at least one item")
    out = [a.astype(np.int64, copy=False) for a in out]
    flat = np.concatenate(out)
    pos = np.clip(np.searchsorted(item_ids, flat), 0, len(item_ids) - 1)  # one binary search over all histories
    unknown = np.flatnonzero(item_ids[pos] != flat)
    if unknown.size:
        first = int(unknown[0])
        i = int(np.searchsorted(np.cumsum([len(a) for a in out]), first, side="right"))
        raise ValueError(f"`histories[{i}]` holds unknown item id {int(flat[first])!r}: the catalogue has ids "
                         f"{int(item_ids.min())}..{int(item_ids.max())}")
    return out


class Recommender:
    """A run loaded for serving: decoders, tables, item vectors, fusion and catalogue maps built once (module doc).

    Args:
        run: a loaded run (``generator.runs.folder.load_run``); it is served on ``device`` (a copy where it must
            move: the run given is left as it was).
        decoder: the default decoder of :meth:`recommend` ("auto": the run's beam search).
        decoders: the registry names to build (default: what the run's design serves (``Design.served``), less what the run
            cannot serve: dense and hybrid without a dense head, hybrid without a stored fusion, cold-beam without
            added items). ``decoder`` and every name given here must be servable, else a ValueError says why.
        num_beams: beams of the beam searches (capped at the catalogue size; a call asking for more items gets more).
        num_candidates: C per list for the hybrids (default: the C the stored fusion was chosen for, else 50).
        alpha: serve the hybrid as the pool blend with this weight instead of the stored fusion.
        data: the dataset folder for the id <-> asin and title maps (default: the run's; none where it is missing).
        maps: build those maps (False: none; a one-off call has no use for them).
        table_dtype: a causal run's serving tables (edge tables, item vectors) in "float32" (default) or 16 bits
            ("float16", "bfloat16": half their memory, scores still computed in float32 from the rounded vectors, so
            near-tied items may swap; ``generator.decoding.paths``).
        release_tables: free the causal model's N-row tables (node vectors; the dense item table unless the input
            reads it) once the decoders hold what they give: serving reads them no more. Default (None): when this
            Recommender owns the model (``from_run``, or a copy made to move it to ``device``); a run given in place is
            left whole unless True. Over ``generator.decoding.causal.LEAN_SERVING_ITEMS`` items a released causal
            run goes without its prefix tree where no items were added (``from_run`` never builds it; ``self.run.tree``
            is None: the beam walks the decoders' prefix index), and its input reads the item vectors, not the item table
            (``CausalDecoders.refresh``).
    """

    def __init__(self, run: Run, *, decoder: str = "auto", decoders: Iterable[str] | None = None,
                 num_beams: int = DEFAULT_BEAMS, num_candidates: int | None = None, alpha: float | None = None,
                 device: str | torch.device | None = None, data: str | os.PathLike[str] | None = None,
                 cold_items: np.ndarray | None = None, cold_options: dict[str, Any] | None = None, maps: bool = True,
                 table_dtype: str = "float32", release_tables: bool | None = None) -> None:
        if release_tables is not None and not isinstance(release_tables, bool):
            raise TypeError(f"`release_tables` must be a bool or None, got {release_tables!r}")
        given, run = run, on_device(run, device)
        release = run is not given if release_tables is None else release_tables
        self.run, self.device = run, next(run.model.parameters()).device
        self.default = registry.resolve(run.design, decoder)
        asked = {self.default, *(registry.resolve(run.design, n) for n in (decoders or ()))}
        key = fusion_store.choice_key(run)  # hashes the checkpoint file: once, here
        num_candidates = fusion_store.stored_candidates(run, key) if num_candidates is None else num_candidates
        N, num_beams, num_candidates = run.ids.num_items, as_int(num_beams), as_int(num_candidates)  # (numpy's ints too)
        check_beams(min(num_beams, N) if isinstance(num_beams, int) and not isinstance(num_beams, bool) else num_beams, 1, N)
        self.num_beams = min(num_beams, N)
        self.num_candidates = min(num_candidates, N)  # the hybrids' C per list; a call with more beams ranks more
        self.version = f"ckpt-{key['checkpoint_sha256'][:16]}.ids-{key['ids_sha256'][:16]}"
        # which decoders: what was asked for, plus the backbone's usual ones where the run can serve them
        self.unavailable: dict[str, str] = {}  # name -> why it is not served
        wanted = list(asked) if decoders is not None else list(dict.fromkeys([*DESIGNS[run.design].served, *asked]))
        fusion = self._servable(wanted, asked, alpha, num_candidates, key, cold_items)
        if fusion is not None or alpha is not None:  # (a new fusion changes the hybrid's answers: a new version)
            blob = json.dumps([fusion, alpha], sort_keys=True, default=repr).encode()
            self.version += f".fusion-{hashlib.sha256(blob).hexdigest()[:8]}"
        names = [n for n in wanted if n not in self.unavailable]
        if run.tree is None and not (run.design == CAUSAL and drops_tree(run.model, registry.causal_release(names, release))):
            tree = PrefixTree.from_semantic_ids(run.ids, run.layout).to(self.device)  # (None: a lean build reads none)
            self.run = run = dataclasses.replace(run, tree=tree)
        self._decoders: dict[str, Decoder] = decoders_for(
            run, names, alpha=alpha, num_beams=self.num_beams, num_candidates=num_candidates, fusion=fusion, key=key,
            cold_items=cold_items, cold_options=cold_options, table_dtype=table_dtype, release_tables=bool(release), data=data)
        shared = [getattr(d, "shared", None) for d in self._decoders.values()]
        if run.design == CAUSAL and all(isinstance(x, CausalDecoders) and x.tree is None for x in shared):  # a lean build:
            self.run = run = dataclasses.replace(run, tree=None)  # the run's tree (257 MB per million items) is read no more
        self._item_ids = run.ids.item_ids  # sorted int64 (N,)
        self._said: set[str] = set()  # the user-id warnings given (once per loaded run, not per call of a service)
        # what batching reads of the run, read once (Run.design rebuilds the model config's dict on every read)
        self._batching = SimpleNamespace(design=run.design, ids=run.ids, layout=run.layout, max_history=run.max_history,
                                         use_user_tokens=run.use_user_tokens)
        self._by_asin: dict[str, int] = {}
        self.catalogue = self._catalogue(data) if maps else None
        log.info("serving %s (%s): decoders %s", run.path, self.version, sorted(self._decoders))

    @classmethod
    def from_run(cls, path: str | os.PathLike[str], *, checkpoint: str | os.PathLike[str] | None = None,
                 device: str | torch.device | None = None, **options: Any) -> Recommender:
        """Load the run folder ``path`` (its best checkpoint, or ``checkpoint``) onto ``device`` (default CPU) and
        build everything a call needs; ``options`` as for the constructor (``decoder``, ``decoders``, ...). The
        checkpoint is memory-mapped: a causal model's tensors are the file's pages while the build reads them and
        releases its N-row tables, then what the model keeps is copied (``own_tensors``), so start-up never holds the
        model twice nor its released tables at all (``experiments/results/scale_serve_mmap.md``)."""
        ckpt = Path(checkpoint) if checkpoint is not None else best_checkpoint(path, read_config(path))
        seen = _file_state(ckpt)  # before it is mapped: a rewrite any time until it is unmapped is seen
        run = load_run(path, ckpt, mmap=True, tree=False)  # its prefix tree: built by the constructor where it is read
        if device is not None:  # the run was loaded for this Recommender alone: move it in place
            run.model.to(device)
            run.tree = None if run.tree is None else run.tree.to(device)
        rec = cls(run, **{"release_tables": True, **options})  # its model: nothing else uses it
        own_tensors(rec.run.model, buffers=False)  # the file is read no more (it may be replaced, even in place)
        if _file_state(run.checkpoint) != seen:
            raise ValueError(f"{run.checkpoint}: the file changed while the run was loaded from it (was it rewritten in "
                             "place? write a new checkpoint beside it and rename it into place); load the run again")
        return rec

    @property
    def decoders(self) -> tuple[str, ...]:
        """The names this Recommender serves."""
        return tuple(self._decoders)

    def resolve(self, decoder: str | None = None) -> str:
        """The served name ``decoder`` stands for ("auto", an alias, None: the default); a ValueError says why a name
        is not served (unknown, another backbone's, not loaded, or what the run lacks for it)."""
        return self._decoder(decoder)

    def score_kind(self, decoder: str | None = None) -> str:
        """What the scores of ``decoder`` are (one of ``generator.decoding.protocol.SCORES``)."""
        return self._decoders[self._decoder(decoder)].score

    # ---- serving -------------------------------------------------------------------------------------------------
    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, decoder: str | None = None, *,
                  exclude_history: bool = True, user_ids: Sequence[int] | None = None, num_beams: int | None = None,
                  batch_size: int = 64) -> list[Recommendation]:
        """Top-k items for each history (item ids, oldest first), decoded in batches of ``batch_size``.

        Args:
            histories: B non-empty sequences of known item ids; only the last ``max_history`` items are read.
            decoder: a served name (default: the one given at load); scores are what its ``score`` says.
            exclude_history: leave out items of the history (default, as ``semid serve`` and ``semid recommend``
                do; the decoder is asked for k more per distinct item in it, so k plus those must not exceed the
                catalogue). False ranks every item, as the benchmark protocol does (``evaluate``).
            user_ids: B user ids to hash into user tokens where the run was trained with them (T5 runs).
            num_beams: beams for this call, at least the items asked for (default: for each history, the loaded count
                doubled until it holds that history's items, as ``semid serve`` decodes: ``protocol.call_beams``; the
                histories of one bucket are decoded together, so a history gets what it gets alone); the hybrids rank
                max(``num_candidates``, beams) per list, so a call asking for more than C (k plus a history's distinct
                items) is served too.
        Returns:
            B :class:`Recommendation`, in the order of ``histories``; items distinct and in the catalogue.
        """
        name, N = self._decoder(decoder), self.run.ids.num_items
        k, num_beams, batch_size = as_int(k), as_int(num_beams), as_int(batch_size)  # (numpy's ints too)
        check_k(k, N, "the catalogue size")
        if not isinstance(exclude_history, bool):
            raise TypeError(f"`exclude_history` must be a bool, got {exclude_history!r}")
        hist = check_histories(histories, self._item_ids)
        user_ids = self._user_ids(user_ids, len(hist))
        wants = k + distinct_counts(hist) if exclude_history else np.full(len(hist), k, dtype=np.int64)
        if wants.max() > N:
            most = int(wants.max()) - k
            raise ValueError(f"`k` ({k}) plus the {most} distinct items of a history to exclude is "
                             f"{k + most}, more than the catalogue's {N} items: ask for fewer")
        # each history decoded with the beams it gets alone (the service's buckets): one long history gave every
        # history of the call its beams (3x the work on 64 Beauty users, and answers that hung on the batch-mates)
        plain = name in registry.PREFIX_CONSISTENT  # (else a history's `want` changes what it ranks: a key of its own)
        asked, at = np.unique(wants, return_inverse=True)  # (a handful of distinct asks: no loop over histories)
        bucket = np.array([call_beams(w, self.num_beams, N) if num_beams is None else num_beams for w in asked.tolist()])
        beams = dict(zip(asked.tolist(), bucket.tolist(), strict=True))
        keys = bucket[at] if plain else wants
        if name in registry.BEAMLESS:  # beams change nothing it ranks: one group
            keys = np.full(len(hist), bucket[-1])
        items_a, scores_a = np.full((len(hist), k), -1, dtype=np.int64), np.full((len(hist), k), -np.inf, dtype=np.float32)
        for key in np.unique(keys)[::-1].tolist():  # loop over beam buckets (a few), the largest first: a refusal names it
            rows = np.flatnonzero(keys == key)
            want = int(wants[rows].max())
            M = beams[want] if not plain else key
            try:
                check_beams(M, want, N)
            except ValueError as e:
                if want == k:
                    raise
                raise ValueError(f"{e}: k ({k}) plus the {want - k} distinct items of the longest history left out "
                                 "(`exclude_history`); pass more beams, or rank every item (exclude_history=False, "
                                 "--no-exclude-history)") from None
            dec = with_beams(self._decoders[name], M, candidates=name == "hybrid")
            dec = with_cold_cap(dec, k) if exclude_history else dec  # (k's share of cold items, not k plus the history's)
            part = hist if rows.size == len(hist) else [hist[r] for r in rows.tolist()]  # (one bucket: as given)
            got, got_s = [], []
            for b in history_batches(self._batching, part, None if user_ids is None else user_ids[rows], batch_size):
                res = dec(b.to(self.device), want)  # loop over batches of histories
                got.append(res.items.cpu().numpy())
                got_s.append(res.scores.float().cpu().numpy())
            got_a, got_sa = np.concatenate(got), np.concatenate(got_s)
            if exclude_history:  # drop history items, keep the order of the rest: the first k of each row
                got_a, got_sa = drop_history(got_a, got_sa, part, k)
            items_a[rows], scores_a[rows] = got_a[:, :k], got_sa[:, :k]
        self._check_items(items_a, name)
        return [Recommendation(i, s) for i, s in zip(items_a, scores_a, strict=True)]

    __call__ = recommend

    # ---- the catalogue's maps ------------------------------------------------------------------------------------
    def titles(self, items: Iterable[int]) -> list[str]:
        """The titles of item ids ("" where the dataset has none)."""
        cat = self._need_catalogue()
        return [cat.titles[i - 1] for i in self._rows(items)]

    def asins(self, items: Iterable[int]) -> list[str]:
        """The original ids (``asin``) of item ids."""
        cat = self._need_catalogue()
        return [cat.original_ids[i - 1] for i in self._rows(items)]

    def item_ids(self, asins: Iterable[str]) -> np.ndarray:
        """The item ids of original ids (``asin``); a ValueError names the first unknown one."""
        self._need_catalogue()
        asins = [asins] if isinstance(asins, str) else list(asins)  # (a string was read character by character)
        out = [self._by_asin.get(a, -1) for a in asins]
        if -1 in out:
            raise ValueError(f"unknown asin {asins[out.index(-1)]!r}: not in the catalogue of {self.run.path}")
        return np.asarray(out, dtype=np.int64)

    def _servable(self, wanted: list[str], asked: set[str], alpha: float | None, num_candidates: int,
                  key: dict[str, str], cold_items: np.ndarray | None) -> Any:
        """Mark what the run cannot serve in ``self.unavailable`` (a ValueError if it was asked for); the stored fusion."""
        run, why, fusion = self.run, {}, None
        load_head = DESIGNS[run.design].dense_head
        if {"dense", "hybrid"} & set(wanted):
            if run.design == CAUSAL and not run.model.has_dense:
                why["dense"] = why["hybrid"] = f"{run.path}: this run has no dense head (it was trained with dense_dim 0)"
            elif load_head is not None:
                try:
                    load_head(run)
                except ValueError as e:
                    why["dense"] = why["hybrid"] = str(e)
        if "hybrid" in wanted and "hybrid" not in why and alpha is None:
            try:
                fusion = stored_fusion(run, num_candidates, key, required=False)
            except ValueError as e:  # a damaged hybrid.json: the hybrid is not served, the rest is (it failed the load)
                why["hybrid"] = str(e)
            else:
                if fusion is None:
                    why["hybrid"] = str(no_fusion_error(run))
        if "cold-beam" in wanted and run.design == CAUSAL and cold_items is None and run.model.trained_items == run.ids.num_items:
            why["cold-beam"] = "decoder 'cold-beam' needs cold items: add items to the run (`semid add-items`)"
        for name in asked & set(why):
            raise ValueError(why[name])
        self.unavailable = {n: w for n, w in why.items() if n in wanted}
        return fusion

    def _decoder(self, decoder: str | None) -> str:
        name = self.default if decoder is None else registry.resolve(self._batching.design, decoder)
        if name in self.unavailable:
            raise ValueError(self.unavailable[name])
        if name not in self._decoders:
            raise ValueError(f"decoder {name!r} was not loaded; this Recommender serves {list(self._decoders)}: load it with "
                             f"`Recommender.from_run(..., decoders=[..., {name!r}])`")
        return name

    def _user_ids(self, user_ids: Sequence[int] | None, B: int) -> np.ndarray | None:
        if user_ids is not None:
            user_ids = int_ids(user_ids, "user_ids")  # (floats, strings and bools were coerced)
            if user_ids.shape != (B,):
                raise ValueError(f"`user_ids` must hold one id per history ({B}), got shape {user_ids.shape}")
            if not self.run.use_user_tokens:  # said (once), not dropped in silence
                self._say_once("unused", "this run was trained without user tokens: `user_ids` (`semid recommend --user`) "
                               "are not used")
            return user_ids if self.run.use_user_tokens else None
        if self.run.use_user_tokens:
            self._say_once("missing", f"this run was trained with user tokens ({self.run.layout.num_user_tokens} buckets) "
                           "but no `user_ids` were given: the inputs differ from training (no user token), which can lower "
                           "quality; pass the users' ids (`semid recommend --user ID`; the service's `user_id`)")
        return None

    def _say_once(self, key: str, message: str) -> None:
        """A warning logged the first time it applies to this loaded run (a service's every request once logged it)."""
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)

    def _check_items(self, items: np.ndarray, decoder: str) -> None:
        pos = np.clip(np.searchsorted(self._item_ids, items), 0, len(self._item_ids) - 1)
        outside = int((self._item_ids[pos] != items).sum())
        if outside:  # a real check, not an assert (which `python -O` strips)
            raise RuntimeError(f"the {decoder!r} decoder returned {outside} items outside the catalogue")

    def _catalogue(self, data: str | os.PathLike[str] | None) -> Catalogue | None:
        folder = Path(data) if data is not None else self.run.data_dir
        try:
            cat = load_catalogue(folder if data is None else check_same_items(self.run.config, self.run.path, folder))
        except FileNotFoundError as e:
            if data is not None:
                raise
            log.warning("no catalogue maps (titles, asins): %s; pass `data`", e)
            return None
        self._by_asin = {a: i + 1 for i, a in enumerate(cat.original_ids)}
        return cat

    def _need_catalogue(self) -> Catalogue:
        if self.catalogue is None:
            raise ValueError(f"{self.run.data_dir}: the run's dataset folder is missing, so there are no titles or asins: "
                             "load with `data=` a dataset folder holding the run's items")
        return self.catalogue

    def _rows(self, items: Iterable[int]) -> list[int]:
        arr = int_ids(items, "items")  # (a string "12" was items 1 and 2; floats and bools were coerced)
        bad = arr[(arr < 1) | (arr > self.catalogue.num_items)]
        if bad.size:
            raise ValueError(f"unknown item id {int(bad[0])}: the dataset's items are 1..{self.catalogue.num_items}")
        return arr.tolist()


