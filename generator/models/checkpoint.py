"""Checkpoints of the generators: what a checkpoint holds, a safe loader (no unpickling), integrity and the check
that a checkpoint matches the semantic IDs it is used with. :func:`read_checkpoint` reads one for its design to build
the model (``generator.designs.registry.load_checkpoint``, the one loader).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from semid.ids import SemanticIDs
from semid.layout import TokenLayout

# ---- checkpoints -------------------------------------------------------------------------------------------------
CHECKPOINT_KEY = "semid"  # where a checkpoint keeps {config, layout, ids_digest}
STATE_PREFIX = "model."  # the LightningModule keeps the T5 as `self.model`
SERVING_KEYS = (CHECKPOINT_KEY, "state_dict", "hyper_parameters", "epoch", "global_step", "pytorch-lightning_version")  # what serving reads of a checkpoint
RESUME = "resume.ckpt"  # the resume point a training writes (generator.training.resume), read without Lightning


def ids_digest(ids: SemanticIDs) -> str:
    """A fingerprint of which item has which code tuple (sha256 of the arrays)."""
    h = hashlib.sha256()
    h.update(np.asarray(ids.codebook_sizes, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(ids.item_ids).tobytes())
    h.update(np.ascontiguousarray(ids.codes).tobytes())
    return h.hexdigest()


def checkpoint_meta(config: Any, layout: TokenLayout, digest: str) -> dict[str, Any]:
    return {"config": config.to_dict(), "layout": layout.to_dict(), "ids_digest": digest}


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # the design's model (T5ForConditionalGeneration, CausalGenerator, TitleGenerator)
    config: Any  # its config (GeneratorConfig, CausalConfig, TitleConfig)
    layout: TokenLayout
    ids_digest: str


INTEGRITY_KEY = "semid_integrity"  # {format, version, sha256}: what a checkpoint written by semid carries
CHECKPOINT_FORMAT = "semid.checkpoint"
CHECKPOINT_VERSION = 1
FINITE_CHUNK = 1 << 24  # elements checked for NaN / inf at a time


def content_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every other value, in the order
    the containers hold them (a checkpoint loaded back gives the same digest; one changed byte of any tensor does
    not). The entry :data:`INTEGRITY_KEY` of the top-level dict is left out."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes in place: no copy of a large table
        elif isinstance(x, dict):
            items = [(k, v) for k, v in x.items() if not (x is obj and k == INTEGRITY_KEY)]
            h.update(f"D{len(items)}".encode())
            for k, v in items:
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):  # subclasses (namedtuples, torch.Size) load back as their base
            h.update(f"{'L' if isinstance(x, list) else 'T'}{len(x)}".encode())
            for v in x:
                feed(v)
        elif isinstance(x, bool) or x is None:
            h.update(f"{x};".encode())
        elif isinstance(x, int):  # IntEnum members too
            h.update(f"i{int(x)};".encode())
        elif isinstance(x, float):
            h.update(f"f{float(x)!r};".encode())
        elif isinstance(x, str):
            h.update(f"s{len(x)}:{x}".encode("utf-8", "surrogatepass"))  # (a path of bytes not UTF-8: surrogates)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def with_integrity(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` plus its format, version and :func:`content_digest` (checked by :func:`safe_load`)."""
    body = {k: v for k, v in checkpoint.items() if k != INTEGRITY_KEY}
    return {**body, INTEGRITY_KEY: {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "sha256": content_digest(body)}}


def safe_load(path: str | os.PathLike[str], *, mmap: bool = False) -> Any:
    """``torch.load`` that runs no code: tensors, containers and primitives only (``weights_only=True``). With
    ``mmap`` the tensors are the file's pages, mapped copy-on-write (writes never reach the file), read when touched
    and never a second copy in memory (a file in torch's old, non-zip format is read whole).

    A file that needs anything else (a crafted pickle, an object with ``__reduce__``) is refused with a ValueError
    naming the file, before any of it is executed. An empty, truncated or garbled file, and a checkpoint whose
    content no longer matches the digest semid wrote into it (:func:`with_integrity`), is a ValueError naming the
    file too. Checkpoints written before semid recorded digests (no :data:`INTEGRITY_KEY`) load unchecked.
    """
    path = Path(path)
    damaged = "restore it from a copy, or train again (a file semid writes is renamed into place complete, so this one was damaged afterwards)"
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint; {damaged}")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or its older pickle
            raise ValueError(f"{path}: not a checkpoint (a torch checkpoint starts with a zip or pickle header, this file "
                             f"with {head!r}); name a checkpoint file such as RUN/checkpoints/best.ckpt")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _mappable(path))
        except RuntimeError:
            if not mmap:
                raise
            # a file that cannot be mapped (torch's old format, compressed records, a file system without mmap) is
            # read whole; that read's own error, if any, is the one reported
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" not in text and "Unsupported class" not in text:  # garbage, not a forbidden object
            raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted: {_first_reason(text)}); {damaged}") from None
        raise ValueError(
            f"{path}: refused: this file holds objects other than tensors and plain containers, which loading would "
            f"execute ({_first_reason(text)}); semid checkpoints never do, so it was not written by semid or has been "
            "tampered with"
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 (zip, EOF, decode and unpickler errors of a damaged file: all re-raised)
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted: {type(e).__name__}: {_first_reason(str(e))}); {damaged}") from None
    if isinstance(ckpt, dict) and INTEGRITY_KEY in ckpt:
        check_integrity(ckpt, path)
    return ckpt


def _mappable(path: Path) -> bool:
    """Whether torch can map ``path``'s tensors: it maps a zip's records as they lie, so only records stored
    uncompressed (what ``torch.save`` writes); a compressed one would be mapped as its compressed bytes, wrong data
    without an error. Anything else (the old format, garbage) is read whole, and that read reports its errors."""
    try:
        with zipfile.ZipFile(path) as z:
            return all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _first_reason(text: str) -> str:
    """The informative line of a torch.load error (its "Weights only load failed" preamble dropped)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "error" in ln.lower() and "Weights only" not in ln:
            return ln[:300]
    return (lines[-1] if lines else "no detail")[:300]


def check_integrity(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise ValueError naming ``path`` unless ``ckpt``'s format, version and content digest are what semid wrote."""
    meta = ckpt[INTEGRITY_KEY]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: `{INTEGRITY_KEY}` is not a semid checkpoint record ({meta!r}); the file was not written by semid")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {meta.get('version')!r}; this semid reads version {CHECKPOINT_VERSION}: use the semid that wrote it")
    if meta.get("sha256") != content_digest(ckpt):
        raise ValueError(
            f"{path}: corrupted: its content no longer matches the sha256 semid recorded when writing it (a changed "
            "byte in the weights or the training state); restore it from a copy, or train again"
        )


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Raise ValueError naming ``path`` and the first tensor of ``state`` holding NaN or inf values."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{path}: tensor `{name}` holds {bad} NaN or inf value(s) of {t.numel()}: the weights are unusable "
                "(training diverged, or the file was damaged); use another checkpoint or train again"
            )


@torch.no_grad()
def own_tensors(model: torch.nn.Module, *, parameters: bool = True, buffers: bool = True) -> None:
    """Give the parameters and / or buffers of ``model`` memory of their own (a copy), so that nothing of it reads a
    memory-mapped checkpoint any longer (``load_checkpoint(mmap=True)``): the file's pages are then unmapped and the
    file may change. ``load_checkpoint`` copies the buffers at once (the decoders' builds take views of some, which
    a second copy would leave behind); a served run copies the parameters once its build released the N-row
    tables, so only the small rest (``generator.runs.recommender.Recommender.from_run``)."""
    for module in model.modules():
        for p in module._parameters.values() if parameters else ():
            if p is not None:
                p.data = p.data.clone()
        for name, b in module._buffers.items() if buffers else ():
            if b is not None:
                module._buffers[name] = b.clone()


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: a large table in chunks of rows, never a mask of its size."""
    rows = max(1, FINITE_CHUNK // max(1, t[0].numel())) if t.ndim > 1 and t.shape[0] else None
    return all(bool(torch.isfinite(part).all()) for part in (t.split(rows) if rows else (t,)))


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False) -> tuple[dict[str, Any], TokenLayout, dict[str, torch.Tensor]]:
    """(meta, layout, model state) of a semid generator checkpoint, read safely (:func:`safe_load`, memory-mapped
    with ``mmap``) and checked to hold them; the model is built by its design
    (``generator.designs.registry.load_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    ckpt = safe_load(path, mmap=mmap)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path}: not a semid generator checkpoint (no {CHECKPOINT_KEY!r} entry)")
    missing = [k for k in ("layout", "config", "ids_digest") if not isinstance(meta, dict) or k not in meta]
    if missing or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{path}: a damaged semid checkpoint (no {missing or ['state_dict']} in it); use another checkpoint or train again")
    try:
        layout = TokenLayout.from_dict(meta["layout"])
        if not isinstance(meta["config"], dict):
            raise TypeError(f"`config` is {type(meta['config']).__name__}, not a mapping")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: the checkpoint's `{CHECKPOINT_KEY}` record is damaged ({type(e).__name__}: {e}); use another "
                         "checkpoint or train again") from None
    state = {k[len(STATE_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    return meta, layout, state


def check_vocabulary(layout: TokenLayout, digest: str, ids: SemanticIDs, *, source: str) -> None:
    """Raise ValueError unless a model with ``layout`` (trained on IDs with ``digest``) can decode ``ids``."""
    if tuple(layout.codebook_sizes) != tuple(ids.codebook_sizes):
        raise ValueError(
            f"{source}: the checkpoint's vocabulary has codebook sizes {list(layout.codebook_sizes)} "
            f"(V = {layout.vocab_size}), but the semantic IDs have {list(ids.codebook_sizes)} "
            f"(V = {ids.layout(layout.num_user_tokens).vocab_size}): it was trained with other semantic IDs"
        )
    if digest != ids_digest(ids):
        raise ValueError(
            f"{source}: the checkpoint was trained with other semantic IDs (same codebook sizes "
            f"{list(ids.codebook_sizes)}, but other items, other item ids or other code tuples); use the run's own semantic_ids.npz"
        )
