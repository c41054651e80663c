"""semid: generative retrieval with semantic IDs.

The semantic-ID layer: datasets and splits, `SemanticIDs`, the token layout, the prefix tree, the logits
processor and ranking metrics. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CollisionStats", "SemanticIDs", "TokenLayout"]
__version__ = "0.1.0"

_LAZY = {"CollisionStats": "semid.ids", "SemanticIDs": "semid.ids", "TokenLayout": "semid.layout"}


def __getattr__(name: str) -> Any:  # imported on first use: `semid prepare` needs no torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semid' has no attribute {name!r}")
