"""Which folders a run may be written into or replaced, so that a wrong ``--out`` never loses anyone's files.

    check_train_out(out)          # before `semid train` writes anything into `out`
    check_resume_folder(out, data)       # before `semid train --resume` writes anything into `out`
    point = resume_point(out / "checkpoints", ids_digest)   # the checkpoint a resume continues from
    refusal = replace_refusal(run_dir)   # None when `semid demo` may delete `run_dir`, else why not

A run folder holds only the names in :data:`RUN_ENTRIES` (``generator.runs.folder``), the temporary files of their
atomic writes, and nothing else. A training writes, before its ``config.yaml``, only :data:`EARLY_ENTRIES`; a folder
holding nothing else (or nothing) is one a new training may write into. Anything else -- a codebooks folder, a
dataset folder, someone's files -- is refused by name, as ``semid fit-codebooks`` refuses a foreign ``--out``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from generator.models.checkpoint import CHECKPOINT_KEY, ids_digest, safe_load
from generator.runs.folder import (
    CHECKPOINT_DIR,
    COMBINE_FILE,
    CONFIG_FILE,
    DISTILL_FILE,
    HYBRID_FILE,
    IDS_FILE,
    LAST,
    LOCK_FILE,
    LOG_DIR,
    TITLE_EMB_FILE,
    TOKENIZER_DIR,
    check_same_data,
    read_config,
)
from semid.ids import SemanticIDs
from semid.io import atomic_target_name

# what a training writes before config.yaml (the lock, the IDs copy, a title run's tokenizer)
EARLY_ENTRIES = (LOCK_FILE, IDS_FILE, TOKENIZER_DIR)
RUN_ENTRIES = (*EARLY_ENTRIES, CONFIG_FILE, CHECKPOINT_DIR, LOG_DIR, HYBRID_FILE, DISTILL_FILE, COMBINE_FILE, TITLE_EMB_FILE, f"{TITLE_EMB_FILE}.json")
_RUN_PATTERNS = (re.compile(r"^metrics_[A-Za-z0-9_.-]+\.json$"), re.compile(r"^semantic_ids\.v[0-9]+\.npz$"))


def _is_ours(name: str, names: tuple[str, ...], patterns: tuple[re.Pattern[str], ...]) -> bool:
    name = atomic_target_name(name) or name  # an atomic write's temporary file is its target's
    return name in names or any(p.match(name) for p in patterns)


def foreign_entries(folder: Path, names: tuple[str, ...] = RUN_ENTRIES) -> list[str]:
    """The entries of ``folder`` that a run does not write (sorted; folders end in "/"); ``names``: what counts as ours
    (:data:`RUN_ENTRIES`, or :data:`EARLY_ENTRIES` for a folder without config.yaml). Symbolic links are never ours."""
    patterns = _RUN_PATTERNS if names == RUN_ENTRIES else ()
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                  if p.is_symlink() or not _is_ours(p.name, names, patterns))


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def check_train_out(out: Path) -> None:
    """Raise FileExistsError unless ``out`` is missing, a folder, and holds a run (``semid train`` decides what may
    happen to it), or nothing but what a training writes before its config.yaml."""
    if os.path.lexists(out) and not out.is_dir():
        kind = "a symbolic link to something that is not a folder" if out.is_symlink() else "a file"
        raise FileExistsError(f"{out}: exists and is {kind}; give --out a new folder (or a run folder to --resume)")
    if not out.is_dir() or (out / CONFIG_FILE).exists() or (out / CHECKPOINT_DIR).exists():
        return
    foreign = foreign_entries(out, EARLY_ENTRIES)
    if foreign:
        raise FileExistsError(
            f"{out}: not empty and not a run folder (it holds {_shown(foreign)}, which `semid train` does not write); "
            "choose a new or empty folder for --out"
        )


def replace_refusal(run_dir: Path) -> str | None:
    """Why ``run_dir`` may not be deleted to train a new run there, or None when it may: it is missing, or a run
    folder semid wrote (config.yaml of a semid run, or a training stopped before writing it) holding nothing else.
    Whether a training holds its lock is checked by taking the lock (``semid.io.folder_lock``)."""
    if not os.path.lexists(run_dir):
        return None
    if run_dir.is_symlink() or not run_dir.is_dir():
        return "is not a folder (a file or a symbolic link)"
    has_config = (run_dir / CONFIG_FILE).exists()
    foreign = foreign_entries(run_dir, RUN_ENTRIES if has_config else EARLY_ENTRIES)
    if foreign:
        return f"holds {_shown(foreign)}, which semid does not write in a run folder"
    if has_config:
        try:
            read_config(run_dir)
        except (ValueError, FileNotFoundError) as e:
            return f"its config.yaml is not one semid wrote ({e})"
    return None


def check_resume_folder(out: Path, data_dir: str | os.PathLike[str]) -> None:
    """Before a resume writes anything: its checkpoints and logs folders must be the run's own (a symbolic link there
    had best.ckpt and last.ckpt written outside the run, refused only at the end), ``data_dir`` the data it was
    trained on (other users were trained on, and their validation scores compared with the old data's), and its copy
    of the semantic IDs the ones it was trained with."""
    for name in (CHECKPOINT_DIR, LOG_DIR):
        if (out / name).is_symlink():
            raise ValueError(f"{out / name}: a symbolic link ({os.readlink(out / name)}); a run's {name} folder is "
                             "its own: a resume would write through it, outside the run. Replace it with the folder")
    config = read_config(out)
    check_same_data(config, out, data_dir)
    if (out / IDS_FILE).is_file():  # the run's own copy (swapped, the run trained and was refused at the end only);
        copy = SemanticIDs.read(out / IDS_FILE)  # after add-items its extension, whose lineage names the IDs trained with
        lineage = copy.meta.get("lineage") if isinstance(copy.meta.get("lineage"), list) else []
        if config.get("ids_digest") not in [ids_digest(copy.ids), *(e.get("digest") for e in lineage if isinstance(e, dict))]:
            raise ValueError(f"{out / IDS_FILE}: not the semantic IDs this run was trained with (config.yaml's "
                             "ids_digest); put the run's own copy back (the --ids it was trained with)")


def resume_point(ckpt_dir: Path, digest: str | None = None) -> Path | None:
    """The checkpoint a resume continues from: the newest (most optimiser steps, then the later written) of
    ``resume.ckpt`` (written during training) and ``last.ckpt`` (written at validations and at the end); each must
    have been trained with the IDs of ``digest`` (:func:`generator.models.checkpoint.ids_digest`; another run's
    checkpoint of the same shapes was continued, or crashed mid-epoch)."""
    from generator.training.resume import RESUME  # (Lightning: imported by the resume that needs it)

    found = []
    for name in (RESUME, LAST):
        path = ckpt_dir / name
        if path.is_file():
            ckpt = safe_load(path)  # an error naming the file if it is damaged
            _check_parameter_order(ckpt, path)
            meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
            if digest is not None and (not isinstance(meta, dict) or meta.get("ids_digest") != digest):
                raise ValueError(f"{path}: trained with other semantic IDs than this run's ({IDS_FILE}): a checkpoint "
                                 "of another run; put this run's own checkpoint back, or start a new run")
            step = ckpt.get("global_step", 0) if isinstance(ckpt, dict) else 0
            found.append((int(step), path.stat().st_mtime_ns, path))
    return max(found)[2] if found else None


def _check_parameter_order(ckpt: object, path: Path) -> None:
    """Refuse a resume point of a causal model written before its dense head was shared: its optimiser state lists
    the parameters in the order of then, so restoring it would give each parameter another's moments."""
    from generator.models.causal import OLD_DENSE_NAMES

    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if isinstance(state, dict) and any(f"model.{name}" in state for name in OLD_DENSE_NAMES):
        raise ValueError(f"{path}: a resume point written by an earlier semid (before the dense head was shared): its "
                         "optimiser state does not map onto this version's parameters, so it cannot be resumed exactly; "
                         "start a new run (the run's best checkpoint still loads for evaluate, recommend and serve)")
