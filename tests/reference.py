"""Tiny obvious references that the vectorised code is tested against."""

from __future__ import annotations

from collections.abc import Sequence


class DictTrie:
    """A plain nested-dict trie over token sequences; a sequence ends with the key `None` holding its value."""

    def __init__(self, sequences: Sequence[Sequence[int]], values: Sequence[int], end_token: int | None = None) -> None:
        self.root: dict = {}
        self.end_token = end_token
        for seq, value in zip(sequences, values, strict=True):
            node = self.root
            for tok in list(seq) + ([end_token] if end_token is not None else []):
                node = node.setdefault(tok, {})
            node[None] = value

    def node(self, prefix: Sequence[int]) -> dict | None:
        node = self.root
        for tok in prefix:
            if tok not in node:
                return None
            node = node[tok]
        return node

    def allowed(self, prefix: Sequence[int]) -> set[int]:
        node = self.node(prefix)
        return set() if node is None else {t for t in node if t is not None}

    def value(self, sequence: Sequence[int]) -> int:
        node = self.node(sequence)
        return -1 if node is None or None not in node else node[None]
