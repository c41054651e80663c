"""Atomic writes: every artifact is written to a temporary file beside its target, flushed to disk, then renamed into
place; a lock that only ever touches its own regular file.

Also :func:`not_utf8`, which turns a text file's UnicodeDecodeError into an error naming the file and line.

Nothing here reads or changes the process umask: files and folders are created with the widest mode they may have
(0666 / 0777) and the kernel applies the umask (and any default ACL), as ``open`` and ``mkdir`` do.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile's alphabet: leftovers of older semids match too
# `.<name>.<8 random>[<suffix>]`: an atomic write's temporary file (the name keeps the target's suffix)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]+)?$")


def atomic_target_name(name: str) -> str | None:
    """The name of the file whose atomic write a temporary file named ``name`` is, or None when it is no such name."""
    m = _TEMP_NAME.match(name)
    return m.group("name") if m is not None and m.group("name").endswith(m.group("suffix") or "") else None


def _random_tag() -> str:
    return "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))


def _create_temp(parent: Path, prefix: str, suffix: str, folder: bool = False) -> Path:
    """A new file (mode 0666) or folder (0777), less the umask, named ``prefix + 8 random chars + suffix``."""
    for _ in range(100):
        path = parent / f"{prefix}{_random_tag()}{suffix}"
        try:
            if folder:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: could not find a free temporary name {prefix}*{suffix}")


def make_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new folder in ``parent`` named ``prefix`` + 8 random characters, with the permissions ``mkdir`` gives."""
    return _create_temp(Path(parent), prefix, "", folder=True)


def fsync_path(path: str | os.PathLike[str], folder: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to disk. A file system that cannot sync a folder (EINVAL) is
    passed over: there is nothing more to do there."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not folder or e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is flushed to disk, renamed to ``path`` and the
    rename flushed too (so a power loss leaves the old file or the whole new one), on error removed.

    The temporary name keeps the target's suffix, so writers that add a suffix (``np.savez``) leave it alone. It gets
    the permissions ``open`` would give.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path.parent, f".{path.name}.", path.suffix)
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent, folder=True)
    finally:
        if os.path.lexists(tmp_path):
            tmp_path.unlink()


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` for writing that only replaces ``path`` once the block finished without an exception."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def remove_atomic_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of atomic writes into ``folder`` that never finished (a ``kill -9`` mid-write);
    returns them. Call it only while no one else writes the folder (under its lock)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if atomic_target_name(path.name) is None or not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        path.unlink()
        removed.append(path)
    if removed:
        log.info("%s: removed %d unfinished write(s) left by a stopped process: %s", folder, len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def check_can_write(folder: str | os.PathLike[str], flag: str, *, beside: bool = False) -> None:
    """Refuse, before any work, a ``folder`` to write in (made where missing) that cannot be: a file where a folder of
    its path should be, or a folder without write permission (``flag`` names the option that gave the path).
    ``beside``: the folder is written next to it and swapped in, so its parent must take writes."""
    path = Path(folder).absolute().parent if beside else Path(folder).absolute()
    there = next(p for p in (path, *path.parents) if os.path.lexists(p))  # the nearest part that exists
    if not there.is_dir():
        raise NotADirectoryError(f"{folder}: {there} is a file, not a folder; choose another {flag}")
    if not os.access(there, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder}: cannot write in {there} (permission denied); choose another {flag}, or fix "
                              "its permissions")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" decodes a non-UTF-8 byte to


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in blocks (a checkpoint of many GB is never held whole), as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def not_utf8(path: str | os.PathLike[str], newline: str | None = None) -> ValueError:
    """The error to raise when reading ``path`` as UTF-8 text failed: it names the file, the first line holding bytes
    that are not UTF-8 (numbered as a reader opened with the same ``newline`` numbers them) and the byte.

    A ``UnicodeDecodeError`` names neither file nor line (text files are decoded in blocks), so the file is read again
    here, on the error path only, with undecodable bytes escaped. ``.gz`` files are read through gzip.
    """
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    if path.suffix != ".gz":
        with open(path, "rb") as raw:
            if raw.read(2) == b"\x1f\x8b":  # gzip's magic: compressed data in a file named as text
                return ValueError(f"{path}: gzip-compressed, not text: name it {path.name}.gz (it is read through gzip "
                                  "then), or decompress it")
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline=newline) as f:
        for lineno, line in enumerate(f, start=1):
            if (bad := _ESCAPED_BYTE.search(line)) is not None:
                byte = ord(bad.group()) - 0xDC00
                return ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {byte:#04x} at column {bad.start() + 1}); save the file "
                    "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                )
    return ValueError(f"{path}: not UTF-8 text; save the file as UTF-8")




_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file ``path``: a regular file with no other link, never a symbolic link (not
    followed), a folder, a pipe or a device; anything else is refused by name, and nothing of it is read or written."""
    refuse = (f"semid's lock file must be a regular file that semid made; remove it (`rm {path}`, which changes "
              "nothing it may point at) and try again")
    try:
        fd = os.open(path, _LOCK_FLAGS, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileExistsError(f"{path}: is a symbolic link (to {os.readlink(path)!r}), not followed. {refuse}") from None
        if e.errno in (errno.EACCES, errno.EPERM) and (holder := _held_by(path)) is not None:  # (told to rm a live lock)
            raise FileExistsError(f"{path.parent}: another user's command (pid {holder}) is using this folder now ({path} "
                                  "is locked, and this user may not open it for writing); wait for it to end") from None
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
            raise FileExistsError(f"{path}: cannot be opened as a lock file ({e.strerror}). {refuse}") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(st.st_mode) else "is not a regular file"
        raise FileExistsError(f"{path}: {what}. {refuse}")
    return fd


def _held_by(path: Path) -> str | None:
    """The pid (or "unknown") holding the lock file ``path``, which this user may read but not write; None when no
    one holds it, or it cannot be read either (``flock`` needs no write permission)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (exclusive: a shared try succeeds beside readers)
        return None  # (not held: the file is someone's leftover)
    except BlockingIOError:
        return _pid_text(fd) or "unknown"
    finally:
        os.close(fd)


def _pid_text(fd: int) -> str | None:
    """The pid a lock file holds, or None when it holds anything else (which is never shown)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else None


@contextmanager
def folder_lock(folder: str | os.PathLike[str], name: str = ".lock", *, what: str = "another process",
                shared: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the block: ``folder/name`` holds the holder's
    pid, locked with ``flock`` so that the kernel releases it when the holder ends, ``kill -9`` included. A second
    holder gets a FileExistsError naming the folder and the pid holding it; a lock file left by a process that no
    longer runs is stale and taken over. The file is removed when the block ends.

    The lock file is opened with ``O_NOFOLLOW``: a symbolic link, a folder, a pipe, a device or a file with other
    hard links at ``folder/name`` is refused (FileExistsError naming it) and left as it is, so the lock never writes
    a file outside the folder. ``folder`` must be a folder (or not exist).

    ``shared``: a reader's lock (``LOCK_SH``): readers hold it together (three `semid distill` of one source ran one at
    a time, the others refused as if a writer held it), a writer excludes them all; the last reader out removes the
    file, and a reader never writes its pid (the file names an exclusive holder only).
    """
    import fcntl  # POSIX only, like the rest of semid's tooling

    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; give a folder (new or semid's own)")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_text(fd)
            os.close(fd)
            doing = f"{what} (pid {holder}) is writing" if holder else "a command is reading or writing"
            raise FileExistsError(
                f"{folder}: {doing} this folder now ({path} is locked); wait for it to end or stop it, then try again"
            ) from None
        # the file may have been removed (and made again) by the holder we waited for: lock the file at `path`
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    if os.fstat(fd).st_size:
        stale = _pid_text(fd)
        log.warning("%s: took over a lock%s that no process holds (its holder ended or was killed, or the folder is "
                    "a copy of one in use)", path, f" left by pid {stale}" if stale else " (its content is not a pid)")
    os.ftruncate(fd, 0)
    if not shared:
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield path
    finally:
        if shared:  # the last reader out removes it: an exclusive lock got now means no one else holds the file
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino == os.lstat(path).st_ino:
                    path.unlink()
            except (BlockingIOError, FileNotFoundError):
                pass
        else:
            path.unlink(missing_ok=True)
        os.close(fd)

