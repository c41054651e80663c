"""Pinning a run's files by digests kept outside the run folder.

The digests semid writes into a run (config.yaml's ``sha256``, a checkpoint's ``semid_integrity``) live inside the
files they protect: they find damage (a flipped byte, a truncated or half-written file), not an edit, since whoever
edits a file can recompute them. To serve exactly the run that was evaluated, keep its digests elsewhere
(:func:`run_digests`, ``semid digest --run RUN``) and check them before loading, and the files loaded after
(:func:`pin`; ``semid evaluate|recommend|serve --expect-sha256 FILE_OR_HEX``, a pinned reload the same way).

What is pinned: config.yaml (which names the best checkpoint and holds the model's config), semantic_ids.npz, the
checkpoint served (the best one, or the one given) and, where the run has one, hybrid.json (the hybrid's fusion: it
changes the hybrid's rankings) and a title run's ``tokenizer/`` files. Not pinned: title-grounded's cache of the
catalogue's title embeddings, derived data that is made again whenever it is not what its record says (the titles,
the encoder's files, the array's sha256): it finds damage and staleness, not an edit of both. The digests are of the files' bytes, as ``sha256sum`` prints
them, so ``cd RUN && sha256sum -c FILE`` checks a pin file too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from generator.runs.folder import (
    CONFIG_FILE,
    HYBRID_FILE,
    IDS_FILE,
    TOKENIZER_DIR,
    best_checkpoint,
    read_config,
)
from semid.io import file_sha256

_HEX = re.compile(r"[0-9a-f]{64}")


def is_digest(text: str) -> bool:
    """Whether ``text`` is a sha256 hex digest (64 hex digits, either case, spaces around allowed)."""
    return bool(_HEX.fullmatch(text.strip().lower()))


def pinned_files(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> list[str]:
    """The files a pin covers, relative to the run folder: config.yaml, semantic_ids.npz, the checkpoint served,
    hybrid.json where the run has one and a title run's tokenizer files."""
    run_dir = Path(run_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else best_checkpoint(run_dir, read_config(run_dir))
    if not ckpt.resolve().is_relative_to(run_dir.resolve()):
        raise ValueError(f"{ckpt}: a checkpoint outside the run folder {run_dir} cannot be pinned with the run")
    names = [CONFIG_FILE, IDS_FILE, str(ckpt.resolve().relative_to(run_dir.resolve()))]
    names += [HYBRID_FILE] if (run_dir / HYBRID_FILE).exists() else []
    tok = run_dir / TOKENIZER_DIR  # (a title run's: what its titles are read and written with)
    return names + sorted(p.relative_to(run_dir).as_posix() for p in tok.rglob("*") if p.is_file()) if tok.is_dir() else names


def run_digests(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """sha256 of each pinned file (relative path -> hex digest)."""
    run_dir = Path(run_dir)
    names = pinned_files(run_dir, checkpoint)
    for name in names:
        if (run_dir / name).is_dir():  # (e.g. --checkpoint RUN/checkpoints)
            raise ValueError(f"{run_dir / name}: a folder, not a file: name the checkpoint file itself, such as "
                             f"{run_dir / 'checkpoints' / 'best.ckpt'}")
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: missing from the run folder (its digests cover "
                                    f"{', '.join(names)}); the run is incomplete: restore the file or train again")
    return {name: file_sha256(run_dir / name) for name in names}


def file_state(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """(inode, size, mtime in ns) of ``path``: what a rename over it or a rewrite changes, seen without reading it."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def file_states(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None
                ) -> dict[str, tuple[int, int, int] | None]:
    """(inode, size, mtime in ns) of each pinned file, None where it is missing: what a rewrite (semid replaces
    files, it never edits them in place) or an edit changes, seen without reading the files again."""
    run_dir, out = Path(run_dir), {}
    for name in pinned_files(run_dir, checkpoint):  # loop over the pinned files (three or four)
        try:
            out[name] = file_state(run_dir / name)
        except FileNotFoundError:
            out[name] = None  # (run_digests names it)
    return out


def format_digests(digests: dict[str, str]) -> str:
    """``sha256sum``'s format: one ``<hex>  <path>`` line per file."""
    return "".join(f"{hexdigest}  {name}\n" for name, hexdigest in digests.items())


def combined_digest(digests: dict[str, str]) -> str:
    """One sha256 for the whole run: of :func:`format_digests`'s text, files in path order."""
    return hashlib.sha256(format_digests(dict(sorted(digests.items()))).encode()).hexdigest()


def parse_pins(text: str, source: str) -> dict[str, str]:
    """A pin file's ``<hex>  <path>`` lines (``sha256sum``'s format; blank lines and ``#`` comments skipped)."""
    pins = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        hexdigest, _, name = line.strip().partition(" ")
        name = name.strip().removeprefix("*")
        if not _HEX.fullmatch(hexdigest.lower()) or not name:
            raise ValueError(f"{source}:{lineno}: expected `<64 hex digits>  <file>` (as `semid digest` prints), got {line!r}")
        pins[name] = hexdigest.lower()
    if not pins:
        raise ValueError(f"{source}: no digests in it (write one with `semid digest --run RUN > {source}`)")
    return pins


def check_pinned(run_dir: str | os.PathLike[str], expected: str, checkpoint: str | os.PathLike[str] | None = None) -> None:
    """Raise ValueError unless the run's pinned files have the digests the caller keeps.

    Args:
        expected: the combined digest (64 hex digits, ``semid digest --run RUN --combined``), or a file of
            ``<hex>  <path>`` lines (``semid digest --run RUN``) that covers every pinned file.
    """
    run_dir = Path(run_dir)
    digests = run_digests(run_dir, checkpoint)
    if is_digest(expected):
        seen = combined_digest(digests)
        if seen != expected.strip().lower():
            raise ValueError(
                f"{run_dir}: its files do not have the digest you pinned (expected {expected.strip()[:16]}..., the run's "
                f"{', '.join(digests)} give {seen[:16]}...): one of them was changed since; do not serve this run"
            )
        return
    path = Path(expected)
    if not path.is_file():
        raise FileNotFoundError(f"{expected}: `--expect-sha256` is neither 64 hex digits nor a file of digests")
    pins = parse_pins(path.read_text(encoding="utf-8"), str(path))
    for name, hexdigest in digests.items():
        if name not in pins:
            raise ValueError(f"{path}: pins no digest for {name} (the run serves it); write the file again with "
                             f"`semid digest --run {run_dir}`")
        if pins[name] != hexdigest:
            raise ValueError(f"{run_dir / name}: sha256 {hexdigest[:16]}..., but {path} pins {pins[name][:16]}...: the file was "
                             "changed since it was pinned; do not serve this run")


def pin(run_dir: str | os.PathLike[str], expected: str | None, checkpoint: str | os.PathLike[str] | None = None,
        ) -> Callable[[], None]:
    """:func:`check_pinned` now (before the run is loaded), and the check to call once it is loaded: that the pinned
    files are still the ones checked (each file's inode, size and mtime as before the check), so a file replaced
    between the check and the load (renamed over, or edited) is refused, not served under the pin. Where ``expected``
    is None nothing is checked, then or later."""
    if expected is None:
        return lambda: None
    before = file_states(run_dir, checkpoint)  # before the hash: a rewrite while it reads is seen after too

    def loaded() -> None:
        if file_states(run_dir, checkpoint) != before:
            raise ValueError(f"{run_dir}: its pinned files changed while they were checked and loaded (what was loaded "
                             "may not be what was pinned); load it again when the run is idle")

    check_pinned(run_dir, expected, checkpoint)
    return loaded
