"""What a run trains: :class:`TrainOptions`, the one typed config of ``semid train`` (validated when made).

Each field carries its own metadata (:func:`option`): help text, command-line parser, choices, group, the kind
config.yaml's ``train:`` section is checked against, and whether a resume must keep it. ``semid train``'s flags
(``semid_cli/train.py``) and the run folder's schema (``generator.runs.folder``) are derived from these fields, and
config.yaml stores the options once (``train:``). What an option left at None means is the design's
(``generator.designs``). ``generator.runs.train`` trains a run folder from these options.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from generator.decoding.registry import SPECS
from generator.designs import registry as designs
from generator.designs.base import Design
from generator.models.config import from_known, is_plain_int
from generator.models.dense import HOST_FIELDS, MODES, DenseHeadConfig
from generator.training.optim import parse_max_time  # noqa: F401 (re-exported: the run layer's budgets)

PRESETS = designs.PRESETS


# what a value of each kind must be (config.yaml's schema, TrainOptions' checks): kind -> (what, test)
KINDS: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "str?": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
    "int>0": ("a positive int", lambda v: is_plain_int(v) and v > 0),
    "int>0?": ("a positive int or null", lambda v: v is None or (is_plain_int(v) and v > 0)),
    "int>=0": ("a non-negative int", lambda v: is_plain_int(v) and v >= 0),
    "int>=0?": ("a non-negative int or null", lambda v: v is None or (is_plain_int(v) and v >= 0)),
    "int": ("an int", is_plain_int),
    "num": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "num>=0": ("a non-negative number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0),
    "frac<1": ("a number in [0, 1)", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1),
    "num?": ("a number or null", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list[int>0]": ("a list of positive ints", lambda v: isinstance(v, list) and bool(v) and all(is_plain_int(x) and x > 0 for x in v)),
    "dict?": ("a mapping or null", lambda v: v is None or isinstance(v, dict)),
}


def preset(name: str) -> Any:
    """The model config of preset ``name`` (its design's config class)."""
    return designs.for_options(name, "ids").presets[name]


def parse_users(text: str) -> int | None:
    """A user count: a non-negative int or "all" (argparse would say "invalid _users value" for anything else)."""
    if text == "all":
        return None
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative int or 'all', got {text!r}")
    return int(text)


def parse_every(text: str) -> int | float:
    """``--val-every``: N epochs (int) or a fraction of an epoch."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs (2) or a fraction of one (0.5), got {text!r}") from None
    return int(value) if value >= 1 and value.is_integer() else value


def option(default: Any, help: str, group: str, *, kind: str | None = None, parse: Any = None, choices: Any = None,
           fixed: bool = False, flag: str | None = None, keys: frozenset[str] = frozenset(), check: bool = False) -> Any:
    """A :class:`TrainOptions` field. help: its ``--flag`` help, where ``{default}`` becomes the default (the designs'
    where the field's is None); group: its flag group; kind: the config.yaml schema kind (``generator.runs.folder``;
    default: from the field's type); parse: the flag's parser (default: from the type); fixed: a resume must keep
    it; flag: the flag, where not ``--field-name``; keys: a mapping option's keys (``--flag KEY=VALUE``, repeatable);
    check: ``TrainOptions`` checks the value against ``kind`` when made (after the design's defaults)."""
    meta = {"help": help, "group": group, "kind": kind, "parse": parse, "choices": choices, "fixed": fixed, "flag": flag,
            "keys": keys, "check": check}
    return field(default=default, metadata=meta)


_DECODERS = ("auto", *(n for n, s in SPECS.items() if s.selects))
BUDGET, OPTIM, EXAMPLES, VALID, DENSE, TITLE, HARDWARE, RESUME = (  # the flag groups, in the order of `semid train -h`
    "budget", "optimisation", "examples", "validation", "dense head (MIPS decoding; see generator/models/dense.py)",
    "title targets (GENRE / BIGRec; see generator/models/titles.py)", "hardware",
    "resume points (checkpoints/resume.ckpt: `--resume` continues exactly from there)")
GROUPS = (BUDGET, OPTIM, EXAMPLES, VALID, DENSE, TITLE, HARDWARE, RESUME)


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``semid train`` takes. ``max_time`` is "HH:MM:SS" (or "DD:HH:MM:SS").

    Options left at None are filled with the design's defaults (``Design.defaults``) when the options are made,
    so a run's config.yaml records concrete values.
    """

    preset: str = option("causal", "design and size: causal (default: one position per item, every target in one pass; "
                         "width 128, sampled dense softmax; one model per 7.5 minutes of a time budget, 1 to 4, beyond an "
                         "hour one per 15, at most 8, trained side by side as one ensemble), causal-64 (the default before: width 64, full softmax), "
                         "causal-wide, tiger (TIGER's published T5), cpu (a small T5)", "", choices=PRESETS, fixed=True)
    max_epochs: int | None = option(50, "{default}", BUDGET, check=True, kind="int>0?")
    max_steps: int = option(-1, "optimiser steps (default: no limit)", BUDGET)
    max_time: str | None = option(None, "wall-clock limit HH:MM:SS (or DD:HH:MM:SS)", BUDGET)
    max_cpu_time: str | None = option(None, "limit on this process's CPU time, HH:MM:SS: the same work however busy the machine is", BUDGET)
    seed: int = option(0, "{default}", OPTIM, fixed=True, check=True, kind="int>=0")
    devices: int = option(1, "processes/devices; > 1 trains with DDP {default}", HARDWARE, check=True, kind="int>0")
    accelerator: str = option("auto", "cpu | gpu | auto {default}", HARDWARE)
    strategy: str = option("auto", "Lightning strategy: auto | ddp | ddp_spawn | fsdp ... {default}", HARDWARE)
    precision: str = option("32-true", "32-true | bf16-mixed | 16-mixed {default}", HARDWARE)
    batch_size: int | None = option(None, "user windows (causal) or examples (T5) per device {default}", OPTIM, check=True, kind="int>0", fixed=True)
    lr: float | None = option(None, "peak learning rate {default}", OPTIM, kind="num", fixed=True)  # (a resume restores the
    # optimiser's and the schedule's learning rates and weight decay: other values were recorded and not applied)
    warmup_steps: int | None = option(None, "linear warmup, then inverse-sqrt decay {default}", OPTIM, kind="int>=0")
    weight_decay: float = option(0.05, "AdamW {default}", OPTIM, fixed=True)
    schedule: str = option("inverse-sqrt", "the learning rate after the warmup; cosine falls to 0 over the budget (the first of "
                           "max-steps, max-epochs, max-time, max-cpu-time to end) {default}", OPTIM,
                           choices=("inverse-sqrt", "constant", "cosine"))
    cooldown: float = option(0.0, "the budget's last share (0..1) over which the learning rate falls linearly to 0, "
                             "after any schedule {default}", OPTIM, kind="num>=0", check=True)
    ema: float | None = option(None, "validate, select and serve an exponential moving average of the weights with this decay "
                               "per optimiser step (the trained weights stay in the checkpoint for a resume); 0 = off {default}",
                               OPTIM, kind="frac<1", check=True, fixed=True)
    label_smoothing: float | None = option(None, "the target's share spread over the other choices (causal: the code's "
                                           "siblings; T5: its vocabulary; a title run: the title vocabulary) {default}", OPTIM, kind="num")
    max_history: int | None = option(None, "items of history per position {default}", EXAMPLES, check=True, kind="int>0", fixed=True)
    user_tokens: int | None = option(None, "hashed user-id tokens, 0 = none (T5 only) {default}", EXAMPLES, check=True, kind="int>=0", fixed=True)
    val_users: int | None = option(1000, "validation users sampled during training, or 'all' {default}", VALID, kind="int>0?",
                                   parse=parse_users, fixed=True, check=True)
    val_every: int | float = option(1.0, "validate every N epochs (int) or fraction of an epoch (default 1)", VALID, parse=parse_every)
    final_val_users: int | None = option(None, "validation users for the final evaluation, 'all' (default) or 0 to skip", VALID,
                                         kind="int>=0?", parse=parse_users)
    num_beams: int = option(20, "{default}", VALID, check=True, kind="int>0", fixed=True)
    decoder: str | None = option(None, "the decoder the run serves with; its validation score selects the checkpoint (causal: "
                                 "beam | exact | dense; T5: auto | beam | generate | dense; title: title-beam) {default}", VALID,
                                 choices=_DECODERS, fixed=True)
    patience: int | None = option(None, "validations without improvement before stopping, 0 = never (default: never with a "
                                  "time budget, whose best checkpoint on validation is kept anyway; else 5)", BUDGET,
                                  check=True, kind="int>=0?")
    eval_batch_size: int = option(128, "{default}", VALID, check=True, kind="int>0")
    num_workers: int = option(0, "DataLoader worker processes of the T5 presets (tiger, cpu, item-t5) {default}", HARDWARE,
                              kind="int>=0", check=True)
    progress: bool = option(True, "no progress bars (default: bars on a terminal, else one line per epoch)", HARDWARE, flag="--no-progress")
    dense: str | None = option(None, "the dense head's item vectors: a learned table, content embeddings, or both (causal: id | "
                               "both, where both also feeds content to the item inputs; none: no head) {default}", DENSE,
                               choices=("none", *MODES), fixed=True)
    objective: str = option("joint", "train the head with the generative loss or alone {default}", DENSE, choices=("joint", "dense"), fixed=True)
    dense_embeddings: str = option("minilm", "content embeddings DATA/item_emb_<NAME>.npy {default}", DENSE, fixed=True)
    dense_options: dict[str, Any] | None = option(None, "a DenseHeadConfig field, repeatable: dim=128, pooling=last, loss=sampled, "
                                                  "temperature=0.05, id_dropout=0.2, ...", DENSE, fixed=True, flag="--dense-option",
                                                  keys=frozenset(DenseHeadConfig.__dataclass_fields__) - {"input_dim", "mode", *HOST_FIELDS})
    model_options: dict[str, Any] | None = option(None, "causal design: a CausalConfig field over the preset's, repeatable: dropout=0.3, "
                                                  "head_dropout=0.2, node_dropout=0.2, node_vectors=false, num_layers=3, ...", VALID,
                                                  fixed=True, flag="--model-option",
                                                  keys=frozenset(k for d in designs.DESIGNS.values() for k in d.option_keys))
    threads: int = option(1, "torch CPU threads while training {default}: two threads collapse on a busy 2-core machine; raise it "
                          "on a machine with cores to spare", HARDWARE, check=True, kind="int>0")
    target: str = option("ids", "what the generator emits for the next item: its semantic ID (default) or its title's tokens, on "
                         "the same causal backbone (item-level history)", TITLE, choices=designs.TARGETS, fixed=True)
    tokenizer: str | None = option(None, "--target title: a local tokenizer folder (read with local_files_only; default: a "
                                   "byte-level BPE trained on the catalogue's titles, saved in RUN/tokenizer)", TITLE, fixed=True)
    encoder: str | None = option(None, "--target title: a local sentence-encoder folder (as for `semid embed`) that the "
                                 "title-grounded decoder embeds generated titles with", TITLE)
    resume_every_steps: int = option(0, "write one every N optimiser steps, 0 = not by steps {default}", RESUME, kind="int>=0",
                                     check=True)
    resume_every_seconds: float = option(60.0, "write one every T seconds, 0 = not by time {default}; one is also written after "
                                         "every validation and on SIGINT/SIGTERM", RESUME, kind="num>=0", check=True)

    def __post_init__(self) -> None:
        design = self.plugin  # validates `preset` and `target`
        for name, value in design.defaults_for(self.preset).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.dense == "none":  # no dense head (None means the design's default)
            object.__setattr__(self, "dense", None)
        design.check_options(self)
        if self.dense not in ("content", "both") and self.dense_embeddings != type(self).__dataclass_fields__["dense_embeddings"].default:
            raise ValueError(f"`dense_embeddings` names the dense head's content vectors, read only with `dense` 'content' or "
                             f"'both' (this run's: {self.dense or 'none'}): leave it out, got {self.dense_embeddings!r}")
        for f in fields(self):
            what, ok = KINDS[f.metadata["kind"] or "int"]
            if f.metadata["check"] and not ok(getattr(self, f.name)):
                raise ValueError(f"`{f.name}` must be {what.replace('null', 'None')}, got {getattr(self, f.name)!r}")
        if isinstance(self.val_every, float) and not 0 < self.val_every <= 1:
            raise ValueError(f"`val_every` must be an int number of epochs or a fraction in (0, 1], got {self.val_every!r}")
        for name in ("max_time", "max_cpu_time"):  # (a run trained for no time ends without a checkpoint)
            if (t := parse_max_time(getattr(self, name), name)) is not None and t.total_seconds() <= 0:
                raise ValueError(f"`{name}` must be a positive duration, got {getattr(self, name)!r}")
        if not is_plain_int(self.max_steps) or not (self.max_steps == -1 or self.max_steps > 0):
            raise ValueError(f"`max_steps` must be a positive int, or -1 (no limit), got {self.max_steps!r}")
        optim = self.optim()  # validates the schedule's fields
        budgets = (self.max_epochs, self.max_steps > 0 or None, self.max_time, self.max_cpu_time)
        if optim.needs_budget and all(b is None for b in budgets):
            raise ValueError(f"schedule {self.schedule!r} with cooldown {self.cooldown!r} follows the budget's progress, and "
                             "this run has none: give --max-epochs, --max-steps, --max-time or --max-cpu-time, or --schedule inverse-sqrt")

    @property
    def plugin(self) -> Design:
        """The design these options train (``generator.designs``)."""
        return designs.for_options(self.preset, self.target)

    @property
    def design(self) -> str:
        """What config.yaml records as the run's ``design`` (a title run: its backbone's)."""
        return designs.recorded(self.plugin)

    def optim(self) -> Any:
        """The optimiser's config (``generator.training.optim.OptimConfig``; imported here, so that reading options
        never imports Lightning)."""
        from generator.training.optim import OptimConfig

        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
                           schedule=self.schedule, cooldown=self.cooldown)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        return from_known(cls, d, "training options")


# options that change what is trained: a resumed run must keep them (val_users, num_beams and decoder define the
# validation score that selects best.ckpt: changing them mid-run would compare checkpoints scored differently)
FIXED_ON_RESUME = tuple(f.name for f in fields(TrainOptions) if f.metadata["fixed"])
# what a run trained before one of them existed had (its config.yaml lacks the key)
BEFORE_OPTION = {"ema": 0.0}


def effective_patience(options: TrainOptions) -> int:
    """Early stopping's patience (0: none): the option, else none with a time budget (the budget is spent, and the
    best checkpoint on validation is kept either way; on MovieLens-100K at 8 minutes, seed 2 stopped after 21 of 32
    epochs at 2.19x popularity, 2.45x without, ``experiments/results/movielens_full_seed2_patience0.md``), else 5."""
    if options.patience is not None:
        return options.patience
    return 0 if options.max_time or options.max_cpu_time else 5


def stored_options(train: dict[str, Any]) -> dict[str, Any]:
    """A run's stored ``train`` options (config.yaml), with ``BEFORE_OPTION`` for the keys a run from before an
    option lacks: a resume keeps what the run trained with, not today's default."""
    out = {**BEFORE_OPTION, **train}
    design = designs.for_options(out.get("preset", "causal"), out.get("target", "ids"))
    if out.get("num_workers") and design is not designs.T5:
        out["num_workers"] = 0  # (a causal run stored what it ignored before `num_workers` was refused for it)
    return out
_HINTS = typing.get_type_hints(TrainOptions)
_KIND_OF_TYPE = {str: "str", int: "int", float: "num", bool: "bool", dict: "dict"}


def value_types(name: str) -> tuple[type, ...]:
    """The types a field's annotation names, None aside (``int | None`` -> (int,))."""
    hint = _HINTS[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args if a is not type(None))


def schema_kind(name: str) -> str:
    """The config.yaml kind of option ``name``: its metadata's, else its type's (``?`` where it may be null)."""
    f = TrainOptions.__dataclass_fields__[name]
    if f.metadata["kind"]:
        return f.metadata["kind"]
    nullable = type(None) in typing.get_args(_HINTS[name])
    kinds = {_KIND_OF_TYPE[t] for t in value_types(name)}
    kind = "num" if kinds == {"int", "num"} else kinds.pop()
    return kind + ("?" if nullable else "")


def train_schema() -> dict[str, tuple[str, bool]]:
    """config.yaml's ``train:`` schema, derived from the fields: key -> (kind, required). ``preset`` and
    ``max_history`` are required (every run since the first recorded them); the rest may be missing in folders
    written by an older semid (their defaults apply)."""
    return {f.name: (schema_kind(f.name), f.name in ("preset", "max_history")) for f in fields(TrainOptions)}


def default_text(name: str) -> str:
    """"(default X)", or the designs' defaults where the field's own is None: "(default 128 causal, 256 T5)"."""
    own = TrainOptions.__dataclass_fields__[name].default
    ids_designs = [d for d in designs.DESIGNS.values() if d.target == "ids"]
    per = {d.name: d.defaults[name] for d in ids_designs if name in d.defaults}
    if own is not None or not per:
        return f"(default {own:g})" if isinstance(own, float) else f"(default {own})"
    values = list(per.values())
    text = str(values[0]) if all(v == values[0] for v in values) else ", ".join(f"{v} {'T5' if n == 't5' else n}" for n, v in per.items())
    first = TrainOptions.__dataclass_fields__["preset"].default  # the default preset's own value leads
    over = {p: v[name] for d in ids_designs for p, v in d.preset_defaults.items() if name in v}
    rest = "".join(f"; {v} with the preset {p}" for p, v in over.items() if p != first)
    rest += "".join(f"; {d.defaults[name]} with --target {d.target}" for d in designs.DESIGNS.values()
                    if d.target != "ids" and d.defaults.get(name, values[0]) not in values)
    if first in over:
        return f"(default {over[first]} with the default preset {first}, else {text}{rest})"
    return f"(default {text}{rest})"
