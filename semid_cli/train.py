"""`semid train --data DATA --ids IDS --out RUN`: train the generator into a run folder.

The work is done by :func:`generator.runs.train.train_run`; this module parses arguments and prints where things went.
With ``--resume`` the options stored in RUN/config.yaml are the defaults, and flags given override them.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields
from pathlib import Path

from generator.runs.folder import IDS_FILE, read_config
from generator.runs.options import GROUPS, TrainOptions, default_text, stored_options, value_types
from generator.runs.train import check_resumable, train_run
from generator.training.resume import TrainingInterrupted
from semid.safe_read import yaml_value
from semid_cli.args import add_dataset
from semid_cli.console import epoch_lines, progress_default, quiet_lightning

DESCRIPTION = (
    "Train the generator on a dataset folder with semantic IDs; writes RUN/checkpoints/, "
    "RUN/config.yaml, RUN/logs/, a copy of the semantic IDs, and RUN/metrics_valid.json (the best checkpoint, "
    "chosen on validation, evaluated on all validation users)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset(p)
    p.add_argument("--ids", required=True, type=Path, help=f"semantic IDs: a folder holding {IDS_FILE}, or the file")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped (its newest "
                   "resume point); SIGINT and SIGTERM stop a training with exit status 130 / 143, resumable")
    add_option_flags(p)


def _valued(name: str) -> bool:
    """Whether option ``name``'s flag takes a value (not a switch, not KEY=VALUE)."""
    f = TrainOptions.__dataclass_fields__[name]
    return not f.metadata["keys"] and bool not in value_types(name)


_VALUED = frozenset(f.name for f in fields(TrainOptions) if _valued(f.name))


def add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainOptions` field, from its metadata (``generator.runs.options.option``): the flag,
    group, help (with the default), parser and choices. A flag not given leaves the option to ``TrainOptions`` (or,
    with ``--resume``, to the run's config.yaml): a valued flag is then absent from the namespace (``--val-users all``
    is None, given), a switch or KEY=VALUE flag None."""
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in fields(TrainOptions):
        m = f.metadata
        g = groups.get(m["group"], p)
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        text = m["help"].replace("{default}", default_text(f.name))
        if m["keys"]:  # KEY=VALUE, repeatable
            g.add_argument(flag, dest=f.name, action=MappingAction, metavar="KEY=VALUE", help=text)
        elif not _valued(f.name):  # --no-progress
            g.add_argument(flag, dest=f.name, action="store_false", default=None, help=text)
        else:
            g.add_argument(flag, dest=f.name, type=m["parse"] or _parser(f.name), choices=m["choices"], help=text,
                           default=argparse.SUPPRESS)  # (absent when not given: "all" parses to None, a value)


def as_flags(message: str) -> str:
    """``message`` with each `field` of :class:`TrainOptions` named as its flag (`--max-steps`)."""
    flags = {f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in fields(TrainOptions)}
    return re.sub(r"`([a-z_]+)`", lambda m: f"`{flags[m[1]]}`" if m[1] in flags else m[0], message)


def _parser(name: str) -> type | None:
    kinds = value_types(name)
    return None if str in kinds else kinds[0]


class MappingAction(argparse.Action):
    """``--model-option`` / ``--dense-option KEY=VALUE`` (repeatable) -> a dict of config fields, values YAML-typed;
    KEY one of the option's ``keys`` (its metadata)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object, option: object = None) -> None:
        key, sep, text = str(value).partition("=")
        known = TrainOptions.__dataclass_fields__[self.dest].metadata["keys"]
        if not sep or key not in known:
            parser.error(f"{option} must be KEY=VALUE with KEY one of {sorted(known)}, got {value!r}")
        mapping = dict(getattr(namespace, self.dest) or {})
        try:
            mapping[key] = yaml_value(text, f"{option} {key}")
        except ValueError as e:
            parser.error(str(e))
        setattr(namespace, self.dest, mapping)


def ids_file(path: Path) -> Path:
    """`--ids` may name the folder `semid fit-codebooks` wrote (checked against its manifest) or the file itself."""
    if path.is_dir():
        from semid.codebooks import check_codebooks

        check_codebooks(path)
        return path / IDS_FILE
    return path


def run(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainOptions)  # (`--val-users all` was dropped as "not given")
             if hasattr(args, f.name) and (getattr(args, f.name) is not None or f.name in _VALUED)}
    given["progress"] = progress_default(args.progress)  # a bar on a terminal, else one line per epoch
    if args.resume:
        check_resumable(args.out)
    base = stored_options(read_config(args.out).get("train", {})) if args.resume else {}
    try:
        options = TrainOptions.from_dict({**base, **given})
    except ValueError as e:  # the options' messages name fields (`max_steps`); the user typed flags
        raise ValueError(as_flags(str(e))) from None
    quiet_lightning()  # Lightning is imported with the training code, after logging was set up: one handler
    try:
        result = train_run(args.data, ids_file(args.ids), args.out, options, resume=args.resume,
                           callbacks=[] if options.progress else [epoch_lines()])
    except TrainingInterrupted as e:  # the folder holds a resume point: say how to continue, exit 128 + signal
        print(f"semid train: {e}", file=sys.stderr)
        return e.exit_code
    if result.metrics_valid is None and result.best_score is None:
        return 0
    print(f"run folder      {result.run_dir}")
    monitor = read_config(result.run_dir).get("monitor", "val/ndcg@10")
    chosen_on = "all validation users" if options.val_users is None else f"up to {options.val_users} validation users, seeded"
    print(f"best checkpoint {result.best_checkpoint}  ({monitor} on {chosen_on}: {result.best_score})")
    print(f"trained         {result.epochs} epochs, {result.steps} steps, {result.train_seconds:.0f} s (config.yaml's "
          f"train_seconds; {result.seconds:.0f} s with the validation and fusion below); padded share {result.padded_share:.1%}")
    if result.fusion is not None:
        print(f"hybrid fusion   {result.fusion} (chosen on validation users) -> {result.run_dir / 'hybrid.json'}")
    if result.metrics_valid:
        m = result.metrics_valid
        print(
            f"valid ({m['users_evaluated']} users): R@5 {m['recall@5']:.4f}  N@5 {m['ndcg@5']:.4f}  "
            f"R@10 {m['recall@10']:.4f}  N@10 {m['ndcg@10']:.4f}  -> {m['file']}"
        )
    return 0
