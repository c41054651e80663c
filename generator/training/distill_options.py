"""What `semid distill` does (:class:`DistillOptions`), apart from the distillation itself
(:mod:`generator.training.distill`), so that the command line builds its flags without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from generator.models.config import check_fields


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
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"`weight` (the teacher's share of each level's target) must be in (0, 1], got {self.weight!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"`lr` must be > 0 and `weight_decay` >= 0, got {self.lr!r} and {self.weight_decay!r}")
