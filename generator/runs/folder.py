"""The run folder: everything needed to evaluate and recommend, written atomically.

::

    RUN/config.yaml          what was trained: data folder, options, model config, layout, best checkpoint
    RUN/semantic_ids.npz     a copy of the semantic IDs the model was trained with
    RUN/checkpoints/         best.ckpt (highest val/ndcg@10), last.ckpt (the end), resume.ckpt (while training)
    RUN/train.lock           while a training or add-items writes the folder (generator.runs.train, .catalogue)
    RUN/logs/                CSV logs (metrics.csv per version)
    RUN/metrics_<split>.json written by evaluation
    RUN/hybrid.json          the hybrid's fusion, chosen on validation users (generator.runs.fusion_store)
    RUN/semantic_ids.v<k>.npz  earlier versions of the IDs after `semid add-items` (generator.runs.catalogue)
    RUN/tokenizer/           title runs: the title tokenizer (generator.runs.titles)
    RUN/title_grounding_emb.npy(.json)  title runs: the catalogue's titles embedded for title-grounded

Every file name is defined here, once.

Loading a run (:func:`load_run`) rebuilds the model from its checkpoint alone and refuses a checkpoint whose
vocabulary does not match the run's semantic IDs, a config.yaml whose checksum, schema or layout is wrong (errors
name the file and the key), and a best checkpoint outside the run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from generator.designs import registry as designs
from generator.designs.base import Extras, item_tree
from generator.designs.title import TOKENIZER_DIR
from generator.models.checkpoint import RESUME
from generator.runs.lineage import load_model
from generator.runs.options import KINDS, train_schema
from semid.ids import SemanticIDs
from semid.io import atomic_open, file_sha256, folder_lock, not_utf8
from semid.layout import TokenLayout
from semid.safe_read import load_yaml

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
IDS_FILE = "semantic_ids.npz"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
BEST = "best.ckpt"
LAST = "last.ckpt"
RESUME = RESUME  # checkpoints/resume.ckpt, written while training (generator.training.resume)
LOCK_FILE = "train.lock"  # held while a training or add-items writes the folder
HYBRID_FILE = "hybrid.json"  # the hybrid's fusion chosen on validation users (generator.runs.fusion_store)
DISTILL_FILE = "distill.json"  # `semid distill`: where the run came from and the epochs it chose between
COMBINE_FILE = "combine.json"  # `semid combine`: the runs whose members the run holds
TOKENIZER_DIR = TOKENIZER_DIR  # a title run's tokenizer (generator.designs.title)
TITLE_EMB_FILE = "title_grounding_emb.npy"  # a title run's catalogue titles embedded for title-grounded (+ .json)
RUN_FORMAT = "semid.run"


def metrics_file(run_dir: str | os.PathLike[str], split: str, sample: int | None = None, *, unseen: bool = False,
                 variant: str | None = None) -> Path:
    """``RUN/metrics_<split>.json`` (all users), or ``RUN/metrics_<split>_sample<N>.json`` for a sample of N users,
    which never replaces the all-users file; ``unseen`` (rankings without the users' histories): ``metrics_<split>_unseen``
    before the sample's part, beside the protocol's file, never over it; ``variant``: another decoder than the run's
    default, or another checkpoint than its best (``metrics_<split>_<variant>``, e.g. ``_dense``, ``_beam_last``),
    whose metrics never replace the protocol's."""
    name = (f"metrics_{split}" + ("" if not variant else f"_{variant}") + ("_unseen" if unseen else "")
            + ("" if sample is None else f"_sample{sample}"))
    return Path(run_dir) / f"{name}.json"


def check_writable(target: str | os.PathLike[str], what: str) -> None:
    """Raise ValueError naming ``target`` unless a file can be written there now (a file made and removed in its
    folder), so that work whose result goes there is not done first and lost."""
    import tempfile

    target = Path(target)
    if target.is_dir():
        raise ValueError(f"{target}: is a folder, so {what} cannot be written there; move it away and try again")
    folder = next(p for p in target.parents if p.exists())  # a folder not made yet is made in its nearest ancestor
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.probe-")
    except OSError as e:
        raise ValueError(f"{folder}: cannot write {what} into this folder ({e.strerror or e}); make it writable "
                         "(or copy the run to a writable folder) and try again") from None
    os.close(fd)
    os.unlink(probe)


def data_fingerprint(path: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of a dataset folder's items.jsonl and sequences.txt (what a run's model and metrics depend on), so a
    run can tell the data it was trained on from other data: another catalogue, or the same item count with other
    items or users."""
    from semid.data import ITEMS_FILE, SEQUENCES_FILE

    out = {}
    for name in (ITEMS_FILE, SEQUENCES_FILE):
        file = Path(path) / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (a dataset folder needs it; `semid prepare` makes one)")
        out[name] = file_sha256(file)
    return out


def check_same_data(config: dict[str, Any], run_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> None:
    """Refuse a dataset folder other than the one the run was trained on (the fingerprint in config.yaml, or in the
    IDs after `semid add-items`), naming both fingerprints and folders; a run trained before semid recorded one gets
    a warning only."""
    expected = config.get("data_fingerprint")
    if expected is None:
        log.warning("%s: the run records no fingerprint of its data (trained before semid kept one): %s cannot be checked "
                    "to be the data it was trained on", run_dir, data_dir)
        return
    seen = data_fingerprint(data_dir)
    if seen != expected:
        diff = ", ".join(f"{k} {seen.get(k, '-')[:12]} (trained: {str(v)[:12]})" for k, v in expected.items() if seen.get(k) != v)
        raise ValueError(
            f"{data_dir}: not the data the run {run_dir} was trained on ({config.get('data')}): sha256 of {diff}; "
            "metrics on other items or users mean nothing: give the data the run was trained on (--data; its files "
            "unchanged since)"
        )


def check_same_items(config: dict[str, Any], run_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str]) -> Path:
    """``data_dir`` where its items.jsonl is the one the run recorded (a moved copy of its dataset folder), else a
    ValueError naming both digests: titles and asins read from it would name other items. A run that recorded no
    fingerprint is not checked."""
    from semid.data import ITEMS_FILE

    expected = (config.get("data_fingerprint") or {}).get(ITEMS_FILE)
    seen = file_sha256(Path(data_dir) / ITEMS_FILE) if expected and (Path(data_dir) / ITEMS_FILE).is_file() else expected
    if seen != expected:
        raise ValueError(f"{data_dir}: its {ITEMS_FILE} (sha256 {seen[:12]}) is not the run {run_dir}'s ({expected[:12]}, "
                         f"from {config.get('data')}): its titles and asins would name other items; give the run's dataset folder (after "
                         "`semid add-items`: the folder the items were added from)")
    return Path(data_dir)


CONFIG_VERSION = 1


def _content_sha256(config: dict[str, Any]) -> str:
    """sha256 of a config's content as YAML parses it (key order and formatting aside), ``sha256`` left out."""
    body = {k: v for k, v in config.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def reading_lock(run_dir: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Any]:
    """The run's lock for a command that only reads it as one version (config, IDs, checkpoint): held while it reads,
    so a training, add-items or choose-fusion is not half-written then; none for a folder no one can write (nothing
    to wait for, and no lock file can be made). Shared: readers of one source (`semid distill` sweeps, `combine`)
    run together; a writer excludes them."""
    if not os.access(run_dir, os.W_OK):
        return contextlib.nullcontext()
    return folder_lock(run_dir, LOCK_FILE, what="a training, add-items or choose-fusion", shared=True)


def write_config(run_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """Write ``RUN/config.yaml`` atomically, with its format, version and the sha256 of its content."""
    body = {k: v for k, v in config.items() if k not in ("format", "version", "sha256")}
    doc = {"format": RUN_FORMAT, "version": CONFIG_VERSION, **body}
    parsed = yaml.safe_load(yaml.safe_dump(doc, sort_keys=False))  # the checksum is of what a reader will see
    with atomic_open(Path(run_dir) / CONFIG_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump({"format": RUN_FORMAT, "version": CONFIG_VERSION, "sha256": _content_sha256(parsed), **body}, f, sort_keys=False)


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``RUN/config.yaml``: YAML (safe: no tags that build objects, no anchors or aliases, a size
    cap), format, version, checksum and the
    keys semid reads, each error naming the file and the key. A config without ``sha256`` (written before semid
    recorded one, or whose line was removed to accept a hand edit) is checked by its schema only."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder (no {CONFIG_FILE}; make one with `semid train`)")
    try:
        config = load_yaml(path)  # safe tags only, no anchors or aliases, at most MAX_YAML_BYTES
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); restore the config.yaml semid wrote (or fix that line)") from None
    except ValueError as e:  # (the parser's own, e.g. an int of more than 4,300 digits)
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a config.yaml semid reads ({str(e)[:120]}); restore the one semid wrote") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: not a semid run config (format {config.get('format') if isinstance(config, dict) else None!r})")
    version = config.get("version", 0)
    if version not in (0, CONFIG_VERSION):
        raise ValueError(f"{path}: run config version {version!r}; this semid reads versions 0 and {CONFIG_VERSION}: use the semid that wrote it")
    if "sha256" in config and config["sha256"] != _content_sha256(config):
        raise ValueError(
            f"{path}: checksum mismatch: the content differs from what semid wrote (the file was corrupted or edited "
            "by hand); restore it, or, to accept an edit made on purpose, delete its `sha256:` line"
        )
    check_config_schema(config, path)
    return config


# key -> (kind, required); what evaluate, recommend and resume read
_SCHEMA: dict[str, tuple[str, bool]] = {
    "data": ("str", True), "ids_digest": ("str", True), "design": ("str", True), "model": ("dict", True),
    "layout": ("dict", True), "train": ("dict", True), "monitor": ("str", False), "best_checkpoint": ("str?", True),
    "steps": ("int>=0", False), "epochs": ("num", False), "ids_source": ("str", False),
    "selected_on_validation": ("bool", False), "best_score": ("dict", False), "sha256": ("str", False),
    "data_fingerprint": ("dict", False),
}
_LAYOUT_SCHEMA = {"codebook_sizes": ("list[int>0]", True), "num_user_tokens": ("int>=0", True)}
_TRAIN_SCHEMA = train_schema()  # derived from TrainOptions' fields (generator.runs.options)


def _check_keys(section: dict[str, Any], schema: dict[str, tuple[str, bool]], path: Path, prefix: str) -> None:
    for key, (kind, required) in schema.items():
        if key not in section:
            if required:
                raise ValueError(f"{path}: no `{prefix}{key}` key; restore the config.yaml semid wrote")
            continue
        what, ok = KINDS[kind]
        if not ok(section[key]):
            raise ValueError(f"{path}: key `{prefix}{key}` must be {what}, got {section[key]!r}; fix it or restore the config.yaml semid wrote")


def check_config_schema(config: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Raise ValueError naming ``path`` and the key for a config.yaml that lacks a key semid reads or has a value
    of the wrong kind."""
    path = Path(path)
    _check_keys(config, _SCHEMA, path, "")
    known = designs.names(recordable=True)
    if config["design"] not in known:
        raise ValueError(f"{path}: key `design` must be {' or '.join(map(repr, known))}, got {config['design']!r}")
    _check_keys(config["layout"], _LAYOUT_SCHEMA, path, "layout.")
    _check_keys(config["train"], _TRAIN_SCHEMA, path, "train.")


@dataclass
class Run:
    """A loaded run of any design: the model (eval mode), its semantic IDs, layout and tree (the title tree for a
    title run), its config, and a title run's tokenizer."""

    path: Path
    config: dict[str, Any]
    checkpoint: Path
    model: torch.nn.Module  # the design's model (generator.designs.registry)
    model_config: Any  # its config (CausalConfig, GeneratorConfig, TitleConfig)
    layout: TokenLayout
    ids: SemanticIDs
    tree: Any  # PrefixTree, or a title run's title tree
    tokenizer: Any = None  # a title run's TitleTokenizer

    @property
    def design(self) -> str:
        return designs.of_model_config(self.model_config).name

    @property
    def max_history(self) -> int:
        return int(self.config["train"]["max_history"])

    @property
    def use_user_tokens(self) -> bool:
        return self.layout.num_user_tokens > 0

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data"])


def best_checkpoint(run_dir: str | os.PathLike[str], config: dict[str, Any] | None = None) -> Path:
    """The checkpoint config.yaml names as best; FileNotFoundError naming it if it is missing (no silent fallback)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir) if config is None else config
    rel = config.get("best_checkpoint")
    if not rel:
        raise FileNotFoundError(
            f"{run_dir / 'config.yaml'}: names no best checkpoint (training has not finished); "
            f"pass a checkpoint file explicitly, e.g. {run_dir / CHECKPOINT_DIR / LAST}"
        )
    path = run_dir / rel
    inside = not Path(rel).is_absolute() and path.resolve().is_relative_to(run_dir.resolve())
    if not inside:
        raise ValueError(
            f"{run_dir / CONFIG_FILE}: key `best_checkpoint` is {rel!r}, which points outside the run folder {run_dir}; "
            f"a run serves only its own checkpoints: name one under {CHECKPOINT_DIR}/ (e.g. {CHECKPOINT_DIR}/{BEST})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's best checkpoint (named in config.yaml) is missing")
    return path


def load_run(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None, *,
             mmap: bool = False, tree: bool = True) -> Run:
    """Load a run folder of any design for evaluation or recommendation (CPU; move ``run.model`` yourself for a GPU).

    Args:
        checkpoint: a checkpoint file to use instead of the run's best one (it must match the run's semantic IDs).
        mmap: map the checkpoint (``generator.designs.registry.load_checkpoint``): a causal model's tensors are then
            the file's pages until ``generator.models.checkpoint.own_tensors`` (what a ``Recommender`` does).
        tree: build a semantic-ID run's prefix tree (False: ``run.tree`` None, for a caller that builds it only where
            it is read: ``Recommender.from_run``; a title run always gets its title tree).
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    stored = SemanticIDs.read(run_dir / IDS_FILE)  # once: IDs, metadata and added items come from one read
    ids = stored.ids
    ckpt = Path(checkpoint) if checkpoint is not None else best_checkpoint(run_dir, config)
    # refuses IDs that are neither the checkpoint's own nor a version extending them (generator.runs.lineage)
    loaded = load_model(ckpt, ids, run_dir / IDS_FILE, stored, mmap=mmap)
    design, expected = designs.of_model_config(loaded.config), designs.for_config(config)
    if design is not expected:
        raise ValueError(f"{ckpt}: a checkpoint of the {design.name} design, but {run_dir / CONFIG_FILE} describes a run of the "
                         f"{expected.name} design; use the run's own checkpoint")
    added = stored.meta.get("data")
    if added:  # items were added from this dataset folder: its titles and users are the run's now
        config = {**config, "data": added, "data_fingerprint": stored.meta.get("data_fingerprint")}
    check_config_matches(config, run_dir / CONFIG_FILE, loaded.layout, loaded.config, ckpt)
    lean = not tree and design.extras is item_tree
    extras = Extras(None) if lean else design.extras(run_dir, loaded.model, loaded.config, ids, loaded.layout, ckpt)
    log.info("loaded %s run %s (checkpoint %s, %d items)", design.name, run_dir, ckpt.name, ids.num_items)
    return Run(run_dir, config, ckpt, loaded.model, loaded.config, loaded.layout, ids, extras.tree, extras.tokenizer)


def check_config_matches(config: dict[str, Any], path: Path, layout: TokenLayout, model_config: Any, checkpoint: Path) -> None:
    """Raise ValueError naming config.yaml and the key where it disagrees with the checkpoint it serves with (the
    checkpoint holds the truth the model was trained with; an edited config.yaml would mislead evaluation)."""
    pairs = [(f"layout.{k}", config["layout"].get(k), v) for k, v in layout.to_dict().items()]
    theirs = model_config.to_dict()
    pairs += [(f"model.{k}", config["model"][k], theirs[k]) for k in config["model"] if k in theirs]
    if "user_tokens" in config["train"]:
        pairs.append(("train.user_tokens", config["train"]["user_tokens"], layout.num_user_tokens))
    for key, ours, truth in pairs:
        if (list(ours) if isinstance(ours, tuple) else ours) != (list(truth) if isinstance(truth, tuple) else truth):
            raise ValueError(
                f"{path}: key `{key}` is {ours!r}, but the checkpoint {checkpoint} was trained with {truth!r}; "
                "config.yaml must describe the run's checkpoint: restore the config.yaml semid wrote"
            )
