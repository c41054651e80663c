"""The quantizer file: a plain dict of tensors, numbers and strings, readable with ``torch.load(weights_only=True)``.

Layout: ``{"format": "rqvae.quantizer", "version": 1, "method": "rqvae" | "rqkmeans", ...method's own keys}``.
Writes are atomic (temporary file beside the target, then rename), as every artifact of the project.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "rqvae.quantizer"
VERSION = 1


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``checkpoint`` (plain types and tensors only) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **checkpoint}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: str | os.PathLike[str], method: str | None = None) -> dict[str, Any]:
    """Load a quantizer file with ``weights_only=True`` and check its format, version and (if given) method."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no quantizer file here (write one with `semid fit-codebooks`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a quantizer file (format {ckpt.get('format') if isinstance(ckpt, dict) else None!r})"
        )
    if ckpt.get("version") != VERSION:
        raise ValueError(
            f"{path}: quantizer format version {ckpt.get('version')!r}; this rqvae reads version {VERSION}"
        )
    if method is not None and ckpt.get("method") != method:
        raise ValueError(f"{path}: holds a {ckpt.get('method')!r} quantizer, not {method!r}")
    return ckpt
