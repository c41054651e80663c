"""Atomic writes: every artifact is written to a temporary file beside its target, then renamed into place.

Also :func:`not_utf8`, which turns a text file's UnicodeDecodeError into an error naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the target's suffix, so writers that add a suffix (``np.savez``) leave it alone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact gets the permissions open() would give
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing that only replaces ``path`` once the block finished without an exception."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" decodes a non-UTF-8 byte to


def not_utf8(path: str | os.PathLike[str], newline: str | None = None) -> ValueError:
    """The error to raise when reading ``path`` as UTF-8 text failed: it names the file, the first line holding bytes
    that are not UTF-8 (numbered as a reader opened with the same ``newline`` numbers them) and the byte.

    A ``UnicodeDecodeError`` names neither file nor line (text files are decoded in blocks), so the file is read again
    here, on the error path only, with undecodable bytes escaped. ``.gz`` files are read through gzip.
    """
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline=newline) as f:
        for lineno, line in enumerate(f, start=1):
            if (bad := _ESCAPED_BYTE.search(line)) is not None:
                byte = ord(bad.group()) - 0xDC00
                return ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {byte:#04x} at column {bad.start() + 1}); save the file "
                    "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                )
    return ValueError(f"{path}: not UTF-8 text; save the file as UTF-8")


@contextmanager
def folder_lock(folder: str | os.PathLike[str], name: str = ".lock", *, what: str = "another process") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block: ``folder/name`` holds the holder's
    pid, locked with ``flock`` so that the kernel releases it when the holder ends, ``kill -9`` included. A second
    holder gets a FileExistsError naming the folder and the pid holding it; a lock file left by a process that no
    longer runs is stale and taken over. The file is removed when the block ends.
    """
    import fcntl  # POSIX only, like the rest of semid's tooling

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(
                f"{folder}: {what} (pid {holder}) is writing this folder now ({path} is locked); wait for it to end "
                "or stop it, then try again"
            ) from None
        # the file may have been removed (and made again) by the holder we waited for: lock the file at `path`
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = os.read(fd, 64).decode("ascii", "replace").strip()
    if stale:
        logging.getLogger(__name__).warning("%s: took over a stale lock of pid %s, which no longer runs", path, stale)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
