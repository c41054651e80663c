"""semid: generative retrieval with semantic IDs.

The semantic-ID layer: datasets and splits, `SemanticIDs`, the token layout, the prefix tree, the logits
processor and ranking metrics. See docs/architecture.md.
"""

from semid.ids import CollisionStats, SemanticIDs
from semid.layout import TokenLayout

__all__ = ["CollisionStats", "SemanticIDs", "TokenLayout"]
__version__ = "0.1.0"
