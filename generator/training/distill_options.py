"""What `semid distill` does (:class:`DistillOptions`), apart from the distillation itself
(:mod:`generator.training.distill`), so that the command line builds its flags without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from generator.models.config import check_fields

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: torch's tensors and AdamW's state hold larger numbers as inf


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class DistillOptions:
    """What `semid distill` does; each field's help is its flag's (``--val-users`` for ``val_users``)."""

    epochs: int = _help(2, "passes over the training windows")
    temperature: float = _help(3.0, "the teacher's softmax temperature")
    weight: float = _help(0.5, "the teacher's share of each level's target")
    label_smoothing: float = _help(0.1, "the true code's target spread over its siblings, as in training")
    lr: float = _help(5e-4, "AdamW learning rate of the code heads")
    weight_decay: float = _help(0.05, "AdamW weight decay")
    batch_size: int = _help(128, "training windows a step (the teacher of a batch is positions x items floats: lower "
                            "it for large catalogues)")
    val_users: int = _help(5000, "validation users that choose the epoch")
    seed: int = _help(0, "seeds the order of the windows and the validation users")

    def __post_init__(self) -> None:
        check_fields(self, positive=("epochs", "batch_size", "val_users"), unit=("label_smoothing",))
        for name, strict in (("temperature", True), ("lr", True), ("weight_decay", False)):  # loop over 3 fields
            v = getattr(self, name)
            number = isinstance(v, Real) and not isinstance(v, bool)  # (numpy's floats too)
            if not number or not math.isfinite(v) or not (v > 0 if strict else v >= 0) or v > FLOAT32_MAX:
                raise ValueError(f"`{name}` must be {'>' if strict else '>='} 0, finite and at most "
                                 f"{FLOAT32_MAX:.4g} (float32's largest), got {v!r}: give --{name.replace('_', '-')} "
                                 "such a number")
            object.__setattr__(self, name, float(v))  # (frozen: as a float, numpy's too)
        if self.lr * self.weight_decay >= 1:  # AdamW scales the weights by 1 - lr x weight_decay each step
            raise ValueError(f"`lr` x `weight_decay` must be < 1 (AdamW multiplies the weights by 1 - lr x weight_decay "
                             f"each step), got {self.lr:g} x {self.weight_decay:g}: lower --lr or --weight-decay")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"`weight` (the teacher's share of each level's target) must be in (0, 1], got {self.weight!r}")
