"""The quantizer file: a plain dict of tensors, numbers and strings, readable with ``torch.load(weights_only=True)``.

Layout: ``{"format": "rqvae.quantizer", "version": 1, "method": "rqvae" | "rqkmeans", ...method's own keys}``.
Writes are atomic (temporary file beside the target, then rename), as every artifact of the project.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

import torch

FORMAT = "rqvae.quantizer"
VERSION = 1


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``checkpoint`` (plain types and tensors only) to ``path`` atomically, with the permissions ``open``
    would give (the umask's), and the same bytes for the same content (serialised in memory first: ``torch.save``
    to a file names the archive inside after the file, here a random temporary name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **checkpoint}, buffer)
    # the temporary file is created 0666 so the kernel applies the umask, as `open` does (the umask is never read:
    # setting it to read it would change it for every thread meanwhile); flushed before the rename, the rename after
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{path.parent}: no free temporary name .{path.name}.*.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: str | os.PathLike[str], method: str | None = None) -> dict[str, Any]:
    """Load a quantizer file with ``weights_only=True`` and check its format, version and (if given) method."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no quantizer file here (write one with `semid fit-codebooks`)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a quantizer; re-run `semid fit-codebooks`")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # every quantizer file is torch's zip format; a bare pickle is not read at all
        raise ValueError(f"{path}: not a quantizer file (one is a zip that torch.save writes; this file starts with "
                         f"{head!r}); name the quantizer.pt that `semid fit-codebooks` wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        kind = "holds objects other than tensors (refused, nothing ran)" if "GLOBAL" in str(e) else "truncated or corrupted"
        raise ValueError(f"{path}: not a readable quantizer file ({kind}); re-run `semid fit-codebooks`") from None
    except (RuntimeError, EOFError, UnicodeDecodeError, IndexError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a readable quantizer file (truncated or corrupted: {type(e).__name__}); re-run `semid fit-codebooks`") from None
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
