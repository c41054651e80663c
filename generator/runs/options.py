"""What a run trains: the presets, the per-design defaults and :class:`TrainOptions` (validated when made).

``generator.runs.train`` trains a run folder from these options.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from generator.decoding.registry import TITLE, resolve
from generator.decoding.titles import TITLE_BEAM
from generator.models.causal import CausalConfig
from generator.models.t5 import PRESETS as T5_PRESETS
from generator.models.titles import TitleConfig
from generator.training.t5_system import OptimConfig
from generator.training.title_system import TARGET

MONITOR = "val/ndcg@10"  # the T5 design's selection metric (the causal design's: val/<decoder>/ndcg@10)

CAUSAL_PRESETS: dict[str, CausalConfig] = {
    # the default: 2 causal layers of width 64 (the best measured on this CPU; width 128 was worse at equal time),
    # the item's ID embedding (tied to the dense table) beside its codes at the input, and dropout 0.3: the quality
    # study's winners (experiments/results/study.md: +14% beam and +17% dense test R@10 at 15 CPU-minutes)
    "causal": CausalConfig(id_input=True, dropout=0.3),
    "causal-wide": CausalConfig(d_model=128, num_heads=4, d_ff=512, dense_dim=128),
}
PRESETS = (*CAUSAL_PRESETS, *T5_PRESETS)


def preset(name: str) -> Any:
    """The model config of preset ``name``: a :class:`CausalConfig` or a T5 :class:`GeneratorConfig`."""
    if name in CAUSAL_PRESETS:
        return CAUSAL_PRESETS[name]
    if name in T5_PRESETS:
        return T5_PRESETS[name]
    raise ValueError(f"`preset` must be one of {sorted(PRESETS)}, got {name!r}")


def is_causal(name: str) -> bool:
    return name in CAUSAL_PRESETS


# what an option left at None means, per design
DESIGN_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal": {"batch_size": 128, "lr": 2e-3, "warmup_steps": 100, "label_smoothing": 0.1, "max_history": 50,
               "user_tokens": 0, "dense": "id", "decoder": "auto"},
    "t5": {"batch_size": 256, "lr": 2e-3, "warmup_steps": 500, "label_smoothing": 0.1, "max_history": 20,
           "user_tokens": 2000, "dense": None, "decoder": "auto"},
}
# options that change what is trained: a resumed run must keep them
# (val_users, num_beams and decoder define the validation score that selects best.ckpt: changing them mid-run
# would compare checkpoints scored differently)
_FIXED_ON_RESUME = (
    "preset", "user_tokens", "max_history", "batch_size", "seed", "dense", "dense_options", "model_options", "val_users",
    "num_beams", "decoder",
    "objective", "target", "tokenizer",
)
_NO_DENSE = "none"  # `dense="none"`: no dense head (None means the design's default)


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``semid train`` takes. ``max_time`` is "HH:MM:SS" (or "DD:HH:MM:SS").

    Options left at None are filled with the design's defaults (:data:`DESIGN_DEFAULTS`) when the options are made,
    so a run's config.yaml records concrete values.
    """

    preset: str = "causal"
    max_epochs: int | None = 50
    max_steps: int = -1
    max_time: str | None = None
    max_cpu_time: str | None = None  # "HH:MM:SS" of this process's CPU time (the same work on a busy machine)
    seed: int = 0
    devices: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    batch_size: int | None = None  # examples (T5) or user windows (causal) per batch
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    schedule: str = "inverse-sqrt"  # after the warmup: "inverse-sqrt" decay or "constant"
    label_smoothing: float | None = None
    max_history: int | None = None
    user_tokens: int | None = None  # hashed user-id buckets (TIGER); 0 for none
    val_users: int | None = 1000  # validation users sampled for validation during training; None for all
    val_every: int | float = 1.0  # validate every N epochs (int) or fraction of an epoch (float < 1)
    final_val_users: int | None = None  # validation users for the final evaluation of the best checkpoint; 0 skips it
    num_beams: int = 20
    decoder: str | None = None  # the decoder the run serves with (its validation score selects the checkpoint)
    patience: int = 5  # validations without improvement before early stopping; 0 disables it
    eval_batch_size: int = 128
    num_workers: int = 0
    progress: bool = True
    # the dense head: "none", or its item vectors' mode "id" | "content" | "both" (causal: "id" | "both", where
    # "both" also adds the content embeddings to the item inputs); None for the design's default
    dense: str | None = None
    objective: str = "joint"  # with a head: "joint" (generative + dense) or "dense" (encoder and head only)
    dense_embeddings: str = "minilm"  # the dataset's item_emb_<name>.npy for content vectors
    dense_options: dict[str, Any] | None = None  # more DenseHeadConfig fields: dim, pooling, loss, temperature, ...
    model_options: dict[str, Any] | None = None  # causal design: CausalConfig fields over the preset's (dropout=0.3, ...)
    threads: int = 1  # torch CPU threads while training (2 threads collapse on a busy 2-core machine; README)
    target: str = "ids"  # what the generator emits: "ids" (semantic IDs) or "title" (title tokens, generator.models.titles)
    tokenizer: str | None = None  # target "title": a local tokenizer folder (default: BPE trained on the titles)
    encoder: str | None = None  # target "title": the sentence-encoder folder that grounds free titles (title-grounded)
    # a point to resume from exactly (checkpoints/resume.ckpt) every N optimiser steps and every T seconds (0: not
    # on that trigger); one is also written after every validation and when SIGINT or SIGTERM stops the training
    resume_every_steps: int = 0
    resume_every_seconds: float = 60.0

    def __post_init__(self) -> None:
        preset(self.preset)  # validates the name
        if self.preset == "item-t5" and self.user_tokens is None:
            object.__setattr__(self, "user_tokens", 0)  # one position per item: no user token
        for name, value in DESIGN_DEFAULTS[self.design].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.dense == _NO_DENSE:
            object.__setattr__(self, "dense", None)
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise ValueError(f"`threads` must be a positive int, got {self.threads!r}")
        if self.target != "ids":  # a title run's options are checked and completed here
            check_title_options(self)
        elif self.tokenizer is not None or self.encoder is not None:
            raise ValueError("`tokenizer` and `encoder` are for `target` 'title'")
        elif self.design == "causal":
            self._check_causal()
        elif self.model_options:
            raise ValueError(f"`model_options` are for the causal design; preset {self.preset!r} takes none, got {self.model_options!r}")
        for name in ("batch_size", "num_beams", "devices", "eval_batch_size", "max_history"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`{name}` must be a positive int, got {v!r}")
        if self.max_epochs is not None and (not isinstance(self.max_epochs, int) or self.max_epochs < 1):
            raise ValueError(f"`max_epochs` must be a positive int or None, got {self.max_epochs!r}")
        if not isinstance(self.user_tokens, int) or self.user_tokens < 0:
            raise ValueError(f"`user_tokens` must be a non-negative int, got {self.user_tokens!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"`patience` must be a non-negative int, got {self.patience!r}")
        if isinstance(self.val_every, float) and not 0 < self.val_every <= 1:
            raise ValueError(f"`val_every` must be an int number of epochs or a fraction in (0, 1], got {self.val_every!r}")
        parse_max_time(self.max_time)
        parse_max_time(self.max_cpu_time, "max_cpu_time")
        if not isinstance(self.resume_every_steps, int) or isinstance(self.resume_every_steps, bool) or self.resume_every_steps < 0:
            raise ValueError(f"`resume_every_steps` must be a non-negative int, got {self.resume_every_steps!r}")
        if isinstance(self.resume_every_seconds, bool) or not isinstance(self.resume_every_seconds, (int, float)) or not self.resume_every_seconds >= 0:
            raise ValueError(f"`resume_every_seconds` must be a non-negative number, got {self.resume_every_seconds!r}")

    @property
    def design(self) -> str:
        return "causal" if is_causal(self.preset) else "t5"

    def _check_causal(self) -> None:
        if self.user_tokens:
            raise ValueError(f"`user_tokens` must be 0 with the causal preset {self.preset!r} (it has no user token), got {self.user_tokens}")
        if self.dense not in (None, "id", "both"):
            raise ValueError(f"`dense` must be 'none', 'id' or 'both' with the causal preset {self.preset!r}, got {self.dense!r}")
        if self.dense is None and self.objective == "dense":
            raise ValueError("`objective` 'dense' needs a dense head: pass `dense` 'id' or 'both'")
        if self.dense is None:
            object.__setattr__(self, "objective", "generative")  # what "joint" means without a head
        allowed = ("dense",) if self.objective == "dense" and self.dense else ("beam", "exact", "dense") if self.dense else ("beam", "exact")
        if self.decoder == "auto":
            object.__setattr__(self, "decoder", allowed[0])
        if self.decoder not in allowed:
            raise ValueError(f"`decoder` must be one of {list(allowed)} for this causal run (objective {self.objective!r}), got {self.decoder!r}")
        if self.dense_options:
            raise ValueError(f"`dense_options` are for the T5 design's dense head; the causal design takes none, got {self.dense_options!r}")
        known = set(CausalConfig.__dataclass_fields__) - {"max_history", "dense_dim", "content_dim"}
        unknown = sorted(set(self.model_options or {}) - known)
        if unknown:
            raise ValueError(f"unknown `model_options` {unknown}; known: {sorted(known)}")
        causal_config(self)  # validates the values

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
                           schedule=self.schedule)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:  # a typo or an option of another version would otherwise be dropped silently
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**d)


def causal_config(options: TrainOptions, content_dim: int = 0) -> CausalConfig:
    """The causal model config a run trains: the preset under ``model_options``, ``max_history`` from the options.

    The ID input is tied to the dense head's table, so the table follows ``d_model`` when the input uses it; without
    a dense head (``dense`` "none") the preset's ID input and distillation are off, and asking for them is an error.
    """
    given = options.model_options or {}
    base = replace(preset(options.preset), **given)
    if not options.dense:
        asked = [k for k in ("id_input", "distill") if given.get(k)]
        if asked:
            raise ValueError(f"`model_options` {asked} need the dense head; drop them or pass `dense` 'id' or 'both'")
        return replace(base, max_history=options.max_history, dense_dim=0, id_input=False, distill=0.0, content_dim=content_dim)
    dense_dim = base.d_model if base.id_input else base.dense_dim
    return replace(base, max_history=options.max_history, dense_dim=dense_dim, content_dim=content_dim)


def parse_max_time(text: str | None, name: str = "max_time") -> timedelta | None:
    """"HH:MM:SS" or "DD:HH:MM:SS" -> timedelta (``name``: the option, for the error)."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (3, 4) or any(n < 0 for n in nums):
        raise ValueError(f"`{name}` must be HH:MM:SS or DD:HH:MM:SS, got {text!r}")
    d, h, m, s = ([0] * (4 - len(nums))) + nums
    if m >= 60 or s >= 60:
        raise ValueError(f"`{name}` must be HH:MM:SS or DD:HH:MM:SS, got {text!r}")
    return timedelta(days=d, hours=h, minutes=m, seconds=s)


# ---- title runs (generator.runs.titles) ----------------------------------------------------------------------
TARGETS = ("ids", TARGET)
# what --model-option may set for a title run (the rest come from the preset, the tokenizer and the catalogue)
TITLE_OPTION_KEYS = tuple(sorted({f.name for f in fields(TitleConfig)} - {"vocab_size", "pad_id", "eos_id", "max_history"}))


def resolve_title_decoder(name: str) -> str:
    """A title run's decoder ("auto" and "beam" mean title-beam)."""
    return resolve(TITLE, name)


def check_title_options(options: Any) -> None:
    """Validate and complete a ``TrainOptions`` with ``target='title'`` (called from its ``__post_init__``)."""
    set_ = lambda name, value: object.__setattr__(options, name, value)  # noqa: E731 (a frozen dataclass)
    if options.target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {options.target!r}")
    if options.preset not in CAUSAL_PRESETS:
        raise ValueError(f"`target` 'title' runs on the causal backbone: `preset` must be one of {sorted(CAUSAL_PRESETS)}, "
                         f"got {options.preset!r}")
    if options.user_tokens:
        raise ValueError(f"`user_tokens` must be 0 with `target` 'title', got {options.user_tokens}")
    if options.dense not in (None, "id"):  # "id" is the causal default; a title run has no dense head
        raise ValueError(f"`dense` must be 'none' with `target` 'title' (no dense head), got {options.dense!r}")
    set_("dense", None)
    if options.objective not in ("joint", "generative"):
        raise ValueError(f"`objective` must be 'generative' with `target` 'title', got {options.objective!r}")
    set_("objective", "generative")
    set_("decoder", resolve_title_decoder(options.decoder))
    if options.decoder != TITLE_BEAM:
        raise ValueError(f"a title run selects checkpoints with decoder {TITLE_BEAM!r}, got {options.decoder!r}")
    unknown = sorted(set(options.model_options or {}) - set(TITLE_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown `model_options` {unknown} for `target` 'title'; known: {list(TITLE_OPTION_KEYS)}")
    for name in ("tokenizer", "encoder"):
        path = getattr(options, name)
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"`{name}` must be a local model folder, got {path!r} (not a folder)")
    TitleConfig(**(options.model_options or {}))  # validates the values
