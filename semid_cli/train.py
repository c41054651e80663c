"""`semid train --data DATA --ids IDS --out RUN`: train the generator into a run folder.

The work is done by :func:`generator.runs.train.train_run`; this module parses arguments and prints where things went.
With ``--resume`` the options stored in RUN/config.yaml are the defaults, and flags given override them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from generator.decoding import registry
from generator.models.dense import MODES
from generator.runs.folder import IDS_FILE, read_config
from generator.runs.options import DESIGN_DEFAULTS, PRESETS, TrainOptions
from generator.runs.train import train_run
from generator.training.resume import TrainingInterrupted
from semid.safe_read import yaml_value
from semid_cli.console import epoch_lines, progress_default


def _users(text: str) -> int | None:
    """A user count: a non-negative int or "all" (argparse would say "invalid _users value" for anything else)."""
    if text == "all":
        return None
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative int or 'all', got {text!r}")
    return int(text)


def _every(text: str) -> int | float:
    """``--val-every``: N epochs (int) or a fraction of an epoch."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs (2) or a fraction of one (0.5), got {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def register(subparsers: argparse._SubParsersAction) -> None:
    d = TrainOptions()
    p = subparsers.add_parser(
        "train",
        help="train the generator (default: the causal item-level design; --preset tiger: TIGER's T5) into a run folder",
        description="Train the generator on a dataset folder with semantic IDs; writes RUN/checkpoints/, "
        "RUN/config.yaml, RUN/logs/, a copy of the semantic IDs, and RUN/metrics_valid.json (the best checkpoint, "
        "chosen on validation, evaluated on all validation users).",
    )
    p.add_argument("--data", required=True, type=Path, help="dataset folder (items.jsonl, sequences.txt)")
    p.add_argument("--ids", required=True, type=Path, help=f"semantic IDs: a folder holding {IDS_FILE}, or the file")
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped (its newest "
                   "resume point); SIGINT and SIGTERM stop a training with exit status 130 / 143, resumable")
    p.add_argument("--preset", choices=PRESETS, help="design and size: causal (default: one position per item, every "
                   "target in one pass), causal-wide, tiger (TIGER's published T5), cpu (a small T5)")
    g = p.add_argument_group("budget")
    g.add_argument("--max-epochs", type=int, help=f"default {d.max_epochs}")
    g.add_argument("--max-steps", type=int, help="optimiser steps (default: no limit)")
    g.add_argument("--max-time", help="wall-clock limit HH:MM:SS (or DD:HH:MM:SS)")
    g.add_argument("--max-cpu-time", help="limit on this process's CPU time, HH:MM:SS: the same work however busy the machine is")
    g.add_argument("--patience", type=int, help=f"validations without improvement before stopping, 0 = never (default {d.patience})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help=f"user windows (causal) or examples (T5) per device {_d('batch_size')}")
    g.add_argument("--lr", type=float, help=f"peak learning rate {_d('lr')}")
    g.add_argument("--warmup-steps", type=int, help=f"linear warmup, then inverse-sqrt decay {_d('warmup_steps')}")
    g.add_argument("--weight-decay", type=float, help=f"AdamW (default {d.weight_decay})")
    g.add_argument("--schedule", choices=("inverse-sqrt", "constant"), help=f"the learning rate after the warmup (default {d.schedule})")
    g.add_argument("--label-smoothing", type=float, help=f"{_d('label_smoothing')}")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g = p.add_argument_group("examples")
    g.add_argument("--max-history", type=int, help=f"items of history per position {_d('max_history')}")
    g.add_argument("--user-tokens", type=int, help=f"hashed user-id tokens, 0 = none (T5 only) {_d('user_tokens')}")
    g = p.add_argument_group("validation")
    g.add_argument("--val-users", type=_users, help=f"validation users sampled during training, or 'all' (default {d.val_users})")
    g.add_argument("--val-every", type=_every, help="validate every N epochs (int) or fraction of an epoch (default 1)")
    g.add_argument("--final-val-users", type=_users, help="validation users for the final evaluation, 'all' (default) or 0 to skip")
    g.add_argument("--num-beams", type=int, help=f"(default {d.num_beams})")
    selects = ("auto", *(n for n, s in registry.SPECS.items() if s.selects))
    g.add_argument("--decoder", choices=selects,
                   help="the decoder the run serves with; its validation score selects the checkpoint "
                   f"(causal: beam | exact | dense; T5: auto | beam | generate | dense; title: title-beam) {_d('decoder')}")
    g.add_argument("--eval-batch-size", type=int, help=f"(default {d.eval_batch_size})")
    g.add_argument("--model-option", dest="model_options", action=ModelOptionsAction, metavar="KEY=VALUE",
                   help="causal design: a CausalConfig field over the preset's, repeatable: dropout=0.3, "
                   "head_dropout=0.2, node_dropout=0.2, node_vectors=false, num_layers=3, ...")
    g = p.add_argument_group("dense head (MIPS decoding; see generator/models/dense.py)")
    g.add_argument("--dense", choices=("none", *MODES), help="the dense head's item vectors: a learned table, content "
                   "embeddings, or both (causal: id | both, where both also feeds content to the item inputs; none: no "
                   f"head) {_d('dense')}")
    g.add_argument("--objective", choices=("joint", "dense"), help=f"train the head with the generative loss or alone (default {d.objective})")
    g.add_argument("--dense-embeddings", help=f"content embeddings DATA/item_emb_<NAME>.npy (default {d.dense_embeddings})")
    g.add_argument("--dense-option", dest="dense_options", action=DenseOptionsAction, metavar="KEY=VALUE",
                   help="a DenseHeadConfig field, repeatable: dim=128, pooling=last, loss=sampled, temperature=0.05, id_dropout=0.2, ...")
    g = p.add_argument_group("title targets (GENRE / BIGRec; see generator/models/titles.py)")
    g.add_argument("--target", choices=("ids", "title"), help="what the generator emits for the next item: its semantic "
                   "ID (default) or its title's tokens, on the same causal backbone (item-level history)")
    g.add_argument("--tokenizer", help="--target title: a local tokenizer folder (read with local_files_only; default: "
                   "a byte-level BPE trained on the catalogue's titles, saved in RUN/tokenizer)")
    g.add_argument("--encoder", help="--target title: a local sentence-encoder folder (as for `semid embed`) that the "
                   "title-grounded decoder embeds generated titles with")
    g = p.add_argument_group("hardware")
    g.add_argument("--devices", type=int, help="processes/devices; > 1 trains with DDP (default 1)")
    g.add_argument("--accelerator", help="cpu | gpu | auto (default auto)")
    g.add_argument("--strategy", help="Lightning strategy: auto | ddp | ddp_spawn | fsdp ... (default auto)")
    g.add_argument("--precision", help="32-true | bf16-mixed | 16-mixed (default 32-true)")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    g.add_argument("--threads", type=int, help=f"torch CPU threads while training (default {d.threads}: two threads "
                   "collapse on a busy 2-core machine; raise it on a machine with cores to spare)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars (default: bars on a terminal, else one line per epoch)")
    g = p.add_argument_group("resume points (checkpoints/resume.ckpt: `--resume` continues exactly from there)")
    g.add_argument("--resume-every-steps", type=int, help="write one every N optimiser steps, 0 = not by steps (default 0)")
    g.add_argument("--resume-every-seconds", type=float, help=f"write one every T seconds, 0 = not by time "
                   f"(default {d.resume_every_seconds:g}); one is also written after every validation and on SIGINT/SIGTERM")
    p.set_defaults(func=run)


class ModelOptionsAction(argparse.Action):
    """``--model-option KEY=VALUE`` (repeatable) -> a dict of CausalConfig fields, values YAML-typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object, option: object = None) -> None:
        from generator.models.causal import CausalConfig

        key, sep, text = str(value).partition("=")
        from generator.runs.options import TITLE_OPTION_KEYS

        known = (set(CausalConfig.__dataclass_fields__) - {"max_history", "dense_dim", "content_dim"}) | set(TITLE_OPTION_KEYS)
        if not sep or key not in known:
            parser.error(f"{option} must be KEY=VALUE with KEY one of {sorted(known)}, got {value!r}")
        _set_option(parser, namespace, self.dest, option, key, text)


def _d(name: str) -> str:
    causal, t5 = DESIGN_DEFAULTS["causal"][name], DESIGN_DEFAULTS["t5"][name]
    return f"(default {causal} causal, {t5} T5)" if causal != t5 else f"(default {causal})"


def ids_file(path: Path) -> Path:
    """`--ids` may name the folder `semid fit-codebooks` wrote (checked against its manifest) or the file itself."""
    if path.is_dir():
        from semid.codebooks import check_codebooks

        check_codebooks(path)
        return path / IDS_FILE
    return path


def run(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainOptions) if getattr(args, f.name, None) is not None}
    given["progress"] = progress_default(args.progress)  # a bar on a terminal, else one line per epoch
    base = read_config(args.out).get("train", {}) if args.resume else {}
    options = TrainOptions.from_dict({**base, **given})
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
    print(f"best checkpoint {result.best_checkpoint}  ({monitor} on the validation sample: {result.best_score})")
    print(f"trained         {result.epochs} epochs, {result.steps} steps, {result.seconds:.0f} s; padded share {result.padded_share:.1%}")
    if result.fusion is not None:
        print(f"hybrid fusion   {result.fusion} (chosen on validation users) -> {result.run_dir / 'hybrid.json'}")
    if result.metrics_valid:
        m = result.metrics_valid
        print(
            f"valid ({m['users_evaluated']} users): R@5 {m['recall@5']:.4f}  N@5 {m['ndcg@5']:.4f}  "
            f"R@10 {m['recall@10']:.4f}  N@10 {m['ndcg@10']:.4f}  -> {m['file']}"
        )
    return 0


class DenseOptionsAction(argparse.Action):
    """``--dense-option KEY=VALUE`` (repeatable) -> a dict of :class:`DenseHeadConfig` fields, values YAML-typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object, option: object = None) -> None:
        key, sep, text = str(value).partition("=")
        from generator.models.dense import HOST_FIELDS, DenseHeadConfig

        known = set(DenseHeadConfig.__dataclass_fields__) - {"input_dim", "mode", *HOST_FIELDS}
        if not sep or key not in known:
            parser.error(f"{option} must be KEY=VALUE with KEY one of {sorted(known)}, got {value!r}")
        _set_option(parser, namespace, self.dest, option, key, text)


def _set_option(parser: argparse.ArgumentParser, namespace: argparse.Namespace, dest: str, option: object, key: str,
                text: str) -> None:
    """Add ``key`` = the YAML-typed ``text`` to the dict option ``dest`` (a usage error names a bad value)."""
    options = dict(getattr(namespace, dest) or {})
    try:
        options[key] = yaml_value(text, f"{option} {key}")
    except ValueError as e:
        parser.error(str(e))
    setattr(namespace, dest, options)
