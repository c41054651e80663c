"""Title runs' catalogue title embeddings for ``title-grounded``: the catalogue's titles embedded once with the
``--encoder`` folder named at training time, cached in ``RUN/title_grounding_emb.npy``.

The rest of the title design (options, model, tokenizer, title tree, training setup) is registered in
``generator.designs.title`` and loads through ``generator.runs.folder.load_run`` like every design.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from generator.decoding.grounding import GROUND_MAX_LENGTH
from generator.runs.folder import TITLE_EMB_FILE
from semid.data import read_npy
from semid.io import atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)


# ---- the catalogue's title embeddings for title-grounded (cached in the run folder) ------------------------------
def titles_digest(titles: list[str], encoder_dir: str | os.PathLike[str]) -> str:
    """What the cached embeddings depend on: the titles and the encoder's files (their names and contents: another
    model copied into the same folder name must not reuse the cache)."""
    folder = Path(encoder_dir).resolve()
    h = hashlib.sha256(folder.name.encode())
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):  # loop over the encoder's files (a few)
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f)}\0".encode())
    for t in titles:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def catalogue_title_embeddings(run_dir: Path, titles: list[str], encoder: object, encoder_dir: str | os.PathLike[str],
                               batch_size: int = 128) -> np.ndarray:
    """(N, D_e) float32 embeddings of the catalogue's titles, cached in ``RUN/title_grounding_emb.npy``."""
    from semid.embed import embed_texts

    digest = titles_digest(titles, encoder_dir)
    path, meta = run_dir / TITLE_EMB_FILE, run_dir / (TITLE_EMB_FILE + ".json")
    cached = _cached(path, meta, digest, len(titles))
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    emb = embed_texts(titles, encoder, batch_size=batch_size, max_length=GROUND_MAX_LENGTH, progress=False)
    with atomic_path(path) as tmp:
        np.save(tmp, emb)
    write_json(meta, {"digest": digest, "sha256": file_sha256(path), "encoder": str(Path(encoder_dir).resolve()),
                      "items": len(titles), "seconds": round(time.perf_counter() - t0, 1)})
    log.info("embedded %d catalogue titles for grounding in %.0f s -> %s", len(titles), time.perf_counter() - t0, path)
    return emb


def _cached(path: Path, meta_path: Path, digest: str, n: int) -> np.ndarray | None:
    """The cache's embeddings where its record says they are of these titles and encoder and the array is the one it
    wrote (its sha256: the answers come from it, and no run pin covers it), else None with a warning: a cache that is
    stale, damaged or changed is made again, never read and never an error."""
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object expected, got {type(meta).__name__}")
        if meta.get("digest") != digest:
            return None  # (other titles or another encoder: stale, as expected after a change)
        if meta.get("sha256") != file_sha256(path):
            raise ValueError("the array is not the one its record was written with")
        cached = read_npy(path)  # header checked against the file size first
        if cached.ndim != 2 or cached.shape[0] != n:
            raise ValueError(f"holds {cached.shape} embeddings for {n} titles")
    except (OSError, ValueError, UnicodeDecodeError) as e:  # (json's errors are ValueErrors)
        log.warning("%s: %s; embedding the titles again", path, e)
        return None
    return cached
