"""The served version and its swap without downtime.

:class:`Served` is one loaded version: a ``Recommender`` plus the item id -> asin and title lists a response reads,
built once. :class:`Holder` keeps the current one. A reload loads the new version on a thread beside the old one
(the event loop and the decoding worker go on), checks it, and swaps one reference: a request takes the current
version when it is checked and is decoded and answered by that version to the end, so requests in flight finish on
the old one, which is freed when the last of them is answered. A version that fails to load, fails its pin or
serves fewer decoders than the running one is refused with the reason, and the old one keeps serving.

:func:`watch_signature` is what a file watch compares: the size and mtime of the files a version is made of.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generator.runs.folder import CONFIG_FILE, HYBRID_FILE, IDS_FILE, best_checkpoint, read_config
from generator.runs.pinning import is_digest, pin
from generator.runs.recommender import Recommender
from generator.serving.requests import MISSING, ApiError

log = logging.getLogger(__name__)


class ReloadBusy(ApiError):
    """A reload was asked for while another runs (409): nothing was read; ask again once it is done."""


class VersionRefused(ApiError):
    """The new version loaded but was refused for what its own files hold (409): it would serve fewer decoders,
    lost its dataset folder or holds another catalogue. Counted as a failed reload, not as the request's fault."""


@dataclass(frozen=True)
class Served:
    """One loaded version. asins, titles: aligned with ``rec.run.ids.item_ids`` (None where the dataset has none)."""

    rec: Recommender
    asins: list[str | None]
    titles: list[str | None]

    @classmethod
    def build(cls, rec: Recommender) -> Served:
        ids = rec.run.ids.item_ids.tolist()
        cat = rec.catalogue
        n = cat.num_items if cat is not None else 0
        asins = [cat.original_ids[i - 1] if 1 <= i <= n else None for i in ids]  # once per load
        titles = [cat.titles[i - 1] if 1 <= i <= n else None for i in ids]
        return cls(rec, asins, titles)

    @property
    def version(self) -> str:
        return self.rec.version

    def rows(self, items: np.ndarray) -> np.ndarray:
        """Rows of ``items`` (int64, all served item ids) in ``rec.run.ids.item_ids``."""
        return np.searchsorted(self.rec.run.ids.item_ids, items)


def watch_signature(run_dir: Path) -> tuple:
    """(name, size, mtime_ns) of config.yaml, semantic_ids.npz, hybrid.json and the best checkpoint (absent: None)."""
    names = [CONFIG_FILE, IDS_FILE, HYBRID_FILE]
    try:
        names.append(str(best_checkpoint(run_dir, read_config(run_dir))))
    except (ValueError, FileNotFoundError, OSError):  # mid-write or broken: the reload will say why
        pass
    out = []
    for name in names:
        try:
            st = os.stat(run_dir / name)
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


class Holder:
    """The current :class:`Served` and the one way to replace it (:meth:`reload`).

    Args:
        load: builds a new Recommender (from the run folder, with the service's options); runs on a worker thread.
        run_dir: the run folder, for pins and the file watch.
        pinned: the service was started with ``--expect-sha256``: a reload must name the new version's digest.
    """

    def __init__(self, load: Callable[[], Recommender], run_dir: Path, *, served: Served | None = None,
                 pinned: bool = False) -> None:
        self._load, self.run_dir, self.pinned = load, Path(run_dir), pinned
        self.current: Served | None = served
        self.reloading = False
        self._lock = asyncio.Lock()

    async def reload(self, expect_sha256: str | None = None) -> Served:
        """Load a new version beside the current one and swap (module doc); an ApiError says why one is refused."""
        if self.pinned and expect_sha256 is None:
            raise ApiError(409, "expect_sha256", MISSING, "the new version's combined digest (`semid digest --run RUN "
                           "--combined`)", "this service serves a pinned run: a reload must pin the new version too")
        if expect_sha256 is not None and (not isinstance(expect_sha256, str) or not is_digest(expect_sha256)):
            # (a digest only: a pins file is the command line's, never a path a client names)
            raise ApiError(422, "expect_sha256", expect_sha256, "64 hex digits (`semid digest --run RUN --combined`)")
        if self._lock.locked():
            raise ReloadBusy(409, "reload", MISSING, "one reload at a time", "a reload is already in progress")
        async with self._lock:
            self.reloading = True
            try:
                new = await asyncio.to_thread(self._build, expect_sha256)
            finally:
                self.reloading = False
            old = self.current
            if old is not None:
                lost = [n for n in old.rec.decoders if n not in new.rec.decoders]
                if lost:
                    why = "; ".join(f"{n}: {new.rec.unavailable.get(n, 'not loaded')}" for n in lost)
                    raise VersionRefused(409, "reload", MISSING, f"a version that serves {list(old.rec.decoders)}",
                                   f"the new version {new.version} cannot serve {lost}, which the running one serves "
                                   f"({why}); the running version {old.version} keeps serving")
                if old.rec.catalogue is not None and new.rec.catalogue is None:  # every answer would lose its titles
                    raise VersionRefused(409, "reload", MISSING, "a version with the dataset's titles and asins",
                                         f"the new version {new.version} finds no dataset folder ({new.rec.run.data_dir}: "
                                         f"config.yaml's `data`), so it would answer without titles and asins; the "
                                         f"running version {old.version} keeps serving")
                changed = await asyncio.to_thread(catalogue_change, old, new)  # (off the loop: N asins compared)
                if changed:
                    raise VersionRefused(409, "reload", MISSING, "a version that keeps the running version's items (`semid "
                                         "add-items` adds to them)", f"the new version {new.version} {changed}; the running "
                                         f"version {old.version} keeps serving (a run of another catalogue needs a "
                                         "service of its own)")
            self.current = new  # the swap: one reference
            log.warning("serving %s (was %s)", new.version, old.version if old else None)
            return new

    def _build(self, expect_sha256: str | None) -> Served:
        running = self.current.version if self.current else "none"
        try:
            try:
                loaded = pin(self.run_dir, expect_sha256)  # (nothing checked without a pin)
            except ValueError as e:  # the files' digests are not the client's pin: its field, not the reload's
                raise ApiError(409, "expect_sha256", expect_sha256, "the combined digest of the run folder as it "
                               "is now (`semid digest --run RUN --combined`)", f"the new version was refused: {e}; "
                               f"the running version ({running}) keeps serving") from None
            served = Served.build(self._load())
            loaded()  # the files loaded are the ones the pin checked
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure refuses the version; the running one stays
            if not isinstance(e, (ValueError, TypeError, OSError)):
                log.exception("loading the new version failed")
            raise ApiError(500, "reload", MISSING, "a run folder that loads", f"the new version was refused: "
                           f"{type(e).__name__}: {e}; the running version ({running}) keeps serving") from None
        settle_heap()  # the new version's objects out of the collector's way (and the last reload's garbage freed)
        return served


def catalogue_change(old: Served, new: Served) -> str | None:
    """What ``new`` changes of the items ``old`` serves (None: it keeps every one of them, with its asin): a reload
    that took another dataset's run would answer every item id with another item."""
    old_ids, new_ids = old.rec.run.ids.item_ids, new.rec.run.ids.item_ids
    rows = np.minimum(np.searchsorted(new_ids, old_ids), len(new_ids) - 1)
    lost = new_ids[rows] != old_ids
    if lost.any():
        return (f"serves {len(new_ids):,} items without {int(lost.sum()):,} of the running version's {len(old_ids):,} "
                f"(item {int(old_ids[lost][0])} first)")
    if old.rec.catalogue is not None and new.rec.catalogue is not None:
        was, now = np.asarray(old.asins, dtype=object), np.asarray(new.asins, dtype=object)[rows]
        other = np.flatnonzero(was != now)
        if other.size:
            i = int(other[0])
            return (f"gives {other.size:,} of the running version's items another asin (item {int(old_ids[i])}: "
                    f"{was[i]!r}, now {now[i]!r})")
    return None


def settle_heap() -> None:
    """Collect once, then move every object alive (the loaded model, its tables, the catalogue's lists: ~400k objects)
    into the collector's permanent generation (``gc.freeze``). A full collection otherwise walks them all, ~200 ms
    with the GIL held: every few seconds under load, the service's p99. Frozen objects are still freed when their
    last reference goes; only cycles among them wait for the next call (the next reload's), which unfreezes first."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
