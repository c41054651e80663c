"""The token layout: the one place that maps codes, users and specials to token ids.

Vocabulary (V tokens), in order::

    [pad, eos, bos] | level 0 block (K_0) | level 1 block (K_1) | ... | level L-1 block (K_{L-1}) | users (U)

The last code level is usually the disambiguation level added by :class:`semid.ids.SemanticIDs`. ``bos`` is the
decoder start token. Nothing else in the code base does arithmetic on token ids: convert through this object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from semid.safe_read import int64_of, is_int

PAD, EOS, BOS = 0, 1, 2
NUM_SPECIAL = 3

# Knuth's multiplicative constant: a stable hash for user ids (Python's hash() is salted per process).
_HASH_MULT = 2654435761


@dataclass(frozen=True)
class TokenLayout:
    """Token ids for special tokens, per-level code blocks and hashed user tokens.

    Args:
        codebook_sizes: K_l for each code level l (the disambiguation level included), each >= 1.
        num_user_tokens: U buckets for hashed user ids; 0 disables user tokens.
    """

    codebook_sizes: tuple[int, ...]
    num_user_tokens: int = 2000

    def __post_init__(self) -> None:
        sizes = tuple(self.codebook_sizes)
        if len(sizes) == 0:
            raise ValueError("`codebook_sizes` must name at least one level, got ()")
        for level, k in enumerate(sizes):
            if not is_int(k) or k < 1:
                raise ValueError(f"`codebook_sizes[{level}]` must be a positive int, got {k!r}")
        if not is_int(self.num_user_tokens) or self.num_user_tokens < 0:
            raise ValueError(f"`num_user_tokens` must be a non-negative int, got {self.num_user_tokens!r}")
        object.__setattr__(self, "codebook_sizes", tuple(int(k) for k in sizes))
        object.__setattr__(self, "num_user_tokens", int(self.num_user_tokens))

    # ---- sizes and offsets -------------------------------------------------------------------------------------
    pad_token_id = PAD
    eos_token_id = EOS
    bos_token_id = BOS

    @property
    def num_levels(self) -> int:
        """L, the number of code levels (the disambiguation level included)."""
        return len(self.codebook_sizes)

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Token id of code 0 at each level."""
        offsets, start = [], NUM_SPECIAL
        for k in self.codebook_sizes:
            offsets.append(start)
            start += k
        return tuple(offsets)

    @property
    def user_offset(self) -> int:
        return NUM_SPECIAL + sum(self.codebook_sizes)

    @property
    def vocab_size(self) -> int:
        """V, the number of tokens."""
        return self.user_offset + self.num_user_tokens

    def level_range(self, level: int) -> tuple[int, int]:
        """[start, stop) token ids of level ``level``'s block."""
        if not is_int(level) or not 0 <= level < self.num_levels:
            raise ValueError(f"`level` must be in [0, {self.num_levels}), got {level!r}")
        start = self.level_offsets[level]
        return start, start + self.codebook_sizes[level]

    # ---- conversions -------------------------------------------------------------------------------------------
    def codes_to_tokens(self, codes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Code tuples to token ids.

        Args:
            codes: int array (..., L) with codes[..., l] in [0, K_l).
        Returns:
            tokens of the same shape and kind (numpy or torch), int64.
        """
        codes = int64_of("codes", codes)
        offsets, sizes = self._offsets_like(codes), self._sizes_like(codes)
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"`codes` must have {self.num_levels} levels in its last dimension, got shape {tuple(codes.shape)}")
        bad = (codes < 0) | (codes >= sizes)
        if bad.any():
            idx = tuple(int(i) for i in _first_true(bad))
            raise ValueError(
                f"`codes` out of range at index {idx}: level {idx[-1]} takes codes in [0, {self.codebook_sizes[idx[-1]]}), "
                f"got {int(codes[idx])}"
            )
        return codes + offsets

    def tokens_to_codes(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Inverse of :meth:`codes_to_tokens`; raises if a token is not in its level's block.

        Args:
            tokens: int array (..., L), tokens[..., l] in level l's block.
        """
        tokens = int64_of("tokens", tokens)
        if tokens.shape[-1] != self.num_levels:
            raise ValueError(f"`tokens` must have {self.num_levels} levels in its last dimension, got shape {tuple(tokens.shape)}")
        codes = tokens - self._offsets_like(tokens)
        bad = (codes < 0) | (codes >= self._sizes_like(tokens))
        if bad.any():
            idx = tuple(int(i) for i in _first_true(bad))
            lo, hi = self.level_range(idx[-1])
            raise ValueError(f"token at index {idx} is {int(tokens[idx])}, not in level {idx[-1]}'s block [{lo}, {hi})")
        return codes

    def user_tokens(self, user_ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Hash user ids (any non-negative ints) into the U user tokens; stable across processes and machines."""
        if self.num_user_tokens == 0:
            raise ValueError("this layout has no user tokens (`num_user_tokens=0`)")
        user_ids = int64_of("user_ids", user_ids)
        if (user_ids < 0).any():
            raise ValueError(f"`user_ids` must be non-negative, got {int(user_ids[user_ids < 0].reshape(-1)[0])}")
        # hashed in 64 bits whatever the ids' dtype (in int32 the multiplier overflowed and 2^32 was 0)
        bucket = (user_ids * _HASH_MULT) % (2**32) % self.num_user_tokens
        return bucket + self.user_offset

    # ---- persistence ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"codebook_sizes": list(self.codebook_sizes), "num_user_tokens": self.num_user_tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenLayout:
        return cls(codebook_sizes=tuple(d["codebook_sizes"]), num_user_tokens=int(d["num_user_tokens"]))

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def _offsets_like(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return _like(self.level_offsets, x)

    def _sizes_like(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return _like(self.codebook_sizes, x)


def _like(values: Sequence[int], x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return torch.tensor(values, dtype=torch.long, device=x.device)
    return np.asarray(values, dtype=np.int64)


def _first_true(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.nonzero()[0].cpu().numpy()
    return np.argwhere(mask)[0]
