"""What every typed config of the generator shares: field checks that name the field, reading a dict that refuses
unknown keys, and the transformer backbone's size (the causal and title designs read histories with one backbone)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

C = TypeVar("C")


def is_plain_int(v: object) -> bool:
    """A Python int, never a bool (nor numpy's: what a saved config holds is plain YAML and JSON)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(config: object, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 unit: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming the first field of ``config`` that is not: a positive int (``positive``), a
    non-negative int (``non_negative``), a number in [0, 1) (``unit``: rates and dropouts), a bool (``flags``)."""
    for name in positive:
        if not is_plain_int(v := getattr(config, name)) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    for name in non_negative:
        if not is_plain_int(v := getattr(config, name)) or v < 0:
            raise ValueError(f"`{name}` must be a non-negative int, got {v!r}")
    for name in unit:
        if not isinstance(v := getattr(config, name), (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {v!r}")
    for name in flags:
        if not isinstance(v := getattr(config, name), bool):
            raise ValueError(f"`{name}` must be a bool, got {v!r}")


def from_known(cls: type[C], d: dict[str, Any], what: str, *, ignore: tuple[str, ...] = ()) -> C:
    """``cls(**d)``, refusing keys ``cls`` has no field for (a typo, or an option of another version, would otherwise
    be dropped silently), naming them, what they were meant for (``what``) and the known ones; ``ignore``: keys
    that are recorded beside the fields and skipped (a config's ``design``)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known - set(ignore))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class BackboneConfig:
    """The causal transformer's size: width, depth, heads, feed-forward width, dropout, history length."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.2
    max_history: int = 50

    def __post_init__(self) -> None:
        check_fields(self, positive=("d_model", "num_layers", "num_heads", "d_ff", "max_history"), unit=("dropout",))
        if self.d_model % self.num_heads:
            raise ValueError(f"`d_model` ({self.d_model}) must be a multiple of `num_heads` ({self.num_heads})")


BACKBONE_KEYS = tuple(f.name for f in fields(BackboneConfig))
