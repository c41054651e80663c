"""The codebooks folder: what ``semid fit-codebooks`` writes and ``semid train --ids DIR`` reads, as one set.

::

    DIR/semantic_ids.npz   the semantic IDs (base codes + the extra level that separates collisions)
    DIR/quantizer.pt       the fitted quantizer (weights + config; torch.load(..., weights_only=True))
    DIR/stats.json         per-level codes used and perplexity, collisions, reconstruction error, seconds
    DIR/code_usage.png     items per code at every level, most used first
    DIR/manifest.json      format, version, and the size and sha256 of each file above (written last)

:func:`write_codebooks_folder` writes the files as a set: into a temporary folder beside DIR, which then takes DIR's
place in one atomic exchange (``renameat2(RENAME_EXCHANGE)``; two renames where the system lacks it), so a
``kill -9`` at any point leaves the old set or the new one, never a mixture. Into a folder holding other files (the
command line's ``--overwrite``), the files are moved in one by one after the manifest is marked incomplete, and the
complete manifest comes last. :func:`check_codebooks` checks the manifest: a changed, missing or half-written file
is an error naming it. :func:`check_out` refuses a folder that holds anything else (a run, a dataset).

What goes into the files (the fitted quantizer, the statistics, the plot) is the caller's: this module knows the
format, not the fitting (``rqvae``), so the library below the command line holds it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from semid.ids import SemanticIDs
from semid.io import check_can_write, file_sha256, make_temp_dir, write_json

T = TypeVar("T")

IDS_FILE = "semantic_ids.npz"
QUANTIZER_FILE = "quantizer.pt"
STATS_FILE = "stats.json"
PLOT_FILE = "code_usage.png"
MANIFEST_FILE = "manifest.json"
CODEBOOK_FILES = (IDS_FILE, QUANTIZER_FILE, STATS_FILE, PLOT_FILE)
MANIFEST_FORMAT, MANIFEST_VERSION = "semid.codebooks", 1


def write_codebooks_folder(out: str | os.PathLike[str], write_files: Callable[[Path], T]) -> T:
    """Write a codebooks folder as a set (module docstring): ``write_files(folder)`` writes the four files of
    :data:`CODEBOOK_FILES` into a temporary folder, the manifest follows, and the set takes ``out``'s place; returns
    what ``write_files`` returns. ``out`` a symbolic link to a folder: the set replaces that folder; the link stays."""
    given = Path(out)
    out = real_out(given)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    if given != out:
        _remove_abandoned(given)  # left by semids that replaced the link
    tmp = make_temp_dir(out.parent, f".{out.name}.writing-{os.getpid()}-")
    try:
        result = write_files(tmp)
        missing = [name for name in CODEBOOK_FILES if not (tmp / name).is_file()]
        if missing:
            raise ValueError(f"a codebooks folder needs {', '.join(CODEBOOK_FILES)}; the writer left out {', '.join(missing)}")
        write_json(tmp / MANIFEST_FILE, _manifest(tmp))
        _publish(tmp, out)
    finally:
        _remove(tmp)
    return result


def real_out(out: Path) -> Path:
    """``out``, or the folder it points at when it is a symbolic link (FileExistsError for a link to anything else)."""
    if not out.is_symlink():
        return out
    target = Path(os.path.realpath(out))
    if not target.is_dir():
        raise FileExistsError(f"{out}: a symbolic link to {target}, which is not a folder; give a folder to --out")
    return target


def _remove(path: Path, ignore_errors: bool = False) -> None:
    """Remove a temporary folder of ours; a symbolic link at its name (left by an older semid) goes as a link."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def _manifest(folder: Path, complete: bool = True) -> dict[str, Any]:
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in CODEBOOK_FILES} if complete else {}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": complete, "files": files}


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def _publish(tmp: Path, out: Path) -> None:
    """Put the complete set in ``tmp`` at ``out``."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if all(_ours(p) for p in out.iterdir()):  # a codebooks folder (or an empty one): replace it whole
        os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))  # with the folder's own permissions (a 555 one became 755)
        if _exchange(tmp, out):
            return  # `tmp` now holds the old set; the caller removes it
        old = make_temp_dir(out.parent, f".{out.name}.old-{os.getpid()}-")
        os.rename(out, old / out.name)
        os.rename(tmp, out)
        shutil.rmtree(old)
        return
    # --overwrite into a folder with other files: they stay; ours move in under an incomplete manifest
    write_json(out / MANIFEST_FILE, _manifest(out, complete=False))
    for name in CODEBOOK_FILES:
        os.replace(tmp / name, out / name)
    os.replace(tmp / MANIFEST_FILE, out / MANIFEST_FILE)


def _remove_abandoned(out: Path) -> None:
    """Remove temporary folders of earlier writes to ``out`` whose process no longer runs (a ``kill -9``)."""
    for prefix in (f".{out.name}.writing-", f".{out.name}.old-"):
        for path in out.parent.glob(prefix + "*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_codebooks(folder: str | os.PathLike[str]) -> None:
    """Raise ValueError naming the file unless ``folder``'s files match its manifest (a folder written before
    semid kept one has none, and is taken as it is)."""
    manifest_path = Path(folder) / MANIFEST_FILE
    if not manifest_path.is_file():
        return
    redo = f"re-run `semid fit-codebooks --out {folder}`"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path}: not a readable manifest ({e}); {redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path}: not a codebooks manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); {redo}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path}: manifest version {manifest.get('version')!r}; this semid reads version {MANIFEST_VERSION}")
    if manifest.get("complete") is not True or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{folder}: a fit-codebooks write into this folder was interrupted (its manifest is incomplete); {redo}")
    files = manifest["files"]
    for name in files:
        if name not in CODEBOOK_FILES:  # `../data/items.jsonl`, `/etc/passwd`: nothing outside the folder is read
            raise ValueError(f"{manifest_path}: lists {name!r}, which is not a file of a codebooks folder (those are "
                             f"{', '.join(CODEBOOK_FILES)}); refused; {redo}")
    missing = [name for name in CODEBOOK_FILES if name not in files]
    if missing:
        raise ValueError(f"{manifest_path}: does not list {', '.join(missing)}; {redo}")
    for name, entry in files.items():
        path = Path(folder) / name
        if path.is_symlink():
            raise ValueError(f"{path}: a symbolic link; a codebooks folder holds its own files; {redo}")
        if not path.is_file():
            raise ValueError(f"{path}: missing from the codebooks folder its manifest describes; {redo}")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            raise ValueError(f"{path}: does not match {MANIFEST_FILE} (changed or damaged after fit-codebooks wrote it); {redo}")


def check_out(out: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder that is not a codebooks folder (unless ``overwrite``).

    A codebooks folder holds nothing but the files this command writes (all four, or some of them when a fit was
    interrupted, and the temporary files of an interrupted atomic write): re-fitting into it replaces them. Anything
    else -- a run folder, a dataset folder -- is someone's work that writing here would corrupt.
    """
    out = real_out(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; pass a folder to --out")
    check_can_write(out, "--out", beside=True)  # (the folder is written beside it and swapped in: after the fit, too late)
    if overwrite or not out.is_dir():
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _ours(p))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out}: not empty and not a codebooks folder (it holds {shown}, which fit-codebooks does not write); choose a new or empty folder, or pass "
            f"--overwrite to write {', '.join(CODEBOOK_FILES)} there anyway"
        )


def _ours(path: Path) -> bool:
    """Whether ``path`` is one of the files this command writes, or an interrupted atomic write of one."""
    if not path.is_file():
        return False
    name = path.name
    ours = (*CODEBOOK_FILES, MANIFEST_FILE)
    return name in ours or any(name.startswith(f".{f}.") and name.endswith(Path(f).suffix) for f in ours)


def check_ids_for(ids: SemanticIDs, ids_path: str | os.PathLike[str], num_items: int, data_dir: str | os.PathLike[str]) -> None:
    """Refuse semantic IDs that are not this dataset's: IDs for other than exactly its items 1..N, or IDs that record
    the embeddings file they were fitted on (its name and sha256) where the dataset folder holds a file of that name
    with other bytes (another catalogue of the same size, or embeddings made again since)."""
    n = num_items
    if ids.num_items != n or int(ids.item_ids[0]) != 1 or int(ids.item_ids[-1]) != n:
        raise ValueError(
            f"{ids_path}: semantic IDs for {ids.num_items:,} items (ids {int(ids.item_ids[0])}..{int(ids.item_ids[-1])}), "
            f"but the dataset {data_dir} has {n:,} items (ids 1..{n}); the IDs must be for exactly its items: fit "
            f"codebooks on this dataset's embeddings (`semid fit-codebooks --embeddings {Path(data_dir) / 'item_emb_<name>.npy'}`)"
        )
    meta = SemanticIDs.load_metadata(ids_path)
    recorded, fitted = meta.get("embeddings_sha256"), Path(str(meta.get("embeddings") or ""))
    if recorded is not None and not isinstance(recorded, str):
        raise ValueError(f"{ids_path}: `meta.embeddings_sha256` must be a string, got {recorded!r}: a damaged or "
                         "crafted file; fit codebooks again")
    here = Path(data_dir) / fitted.name
    if recorded and fitted.name and here.is_file() and (seen := file_sha256(here)) != recorded:
        raise ValueError(
            f"{ids_path}: fitted on {fitted} (sha256 {recorded[:12]}), but this dataset's {here} has sha256 {seen[:12]}: "
            "the IDs were fitted on other embeddings (another catalogue of the same size, or embeddings made again "
            f"since); fit codebooks on this dataset's (`semid fit-codebooks --embeddings {here}`)"
        )
