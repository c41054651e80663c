"""The structure of a checkpoint checked against its own config before a model is built from it.

A checkpoint's digest (``generator.models.checkpoint.with_integrity``) lives inside the file, so it finds damage,
not an edit. What is checked here holds for any file, re-signed or not, so that a crafted checkpoint can neither
allocate more than its tensors hold nor index outside a table:

- every size in the config is the size of a tensor in the file: the model the config describes is built on the
  ``meta`` device (no memory) and each of its tensors must be in the file with that shape, and nothing else may be
  (``d_model: 1000000`` with a 64-wide embedding is refused before anything is allocated);
- a causal checkpoint's ``item_tokens`` are the layout's tokens (row 0 padding, column l in level l's block) and,
  with the semantic IDs at hand, exactly their tokens; its prefix-tree tables (``parent_keys_l``, ``child_codes_l``,
  ``child_index_l``) are exactly the ones its ``item_tokens`` give (no index out of range, no negative index other
  than the -1 padding, no edge the catalogue lacks).

Every error is a ValueError naming the file and the tensor.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

import torch

from semid.ids import SemanticIDs
from semid.layout import TokenLayout

_TREE_TABLE = re.compile(r"(parent_keys|child_codes|child_index|node_vec)_\d+")
_MEMBER = re.compile(r"members\.(0|[1-9]\d*)\.(.+)")
_LAYER = re.compile(r"backbone\.h\.(0|[1-9]\d*)\.")  # a causal model's GPT-2 blocks
DAMAGED = "the checkpoint is damaged or was edited; use another checkpoint or train again"


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def check_shapes(expected: dict[str, torch.Tensor], state: dict[str, Any], path: str | os.PathLike[str],
                 skip: re.Pattern[str] | None = None) -> None:
    """Every tensor of ``expected`` (a skeleton's state dict) is in ``state`` with its shape, and ``state`` holds
    nothing else (keys matching ``skip`` aside)."""
    for key, t in expected.items():
        if key not in state:
            raise ValueError(f"{path}: no tensor `{key}`, which the model its config describes has; {DAMAGED}")
        if _shape(state[key]) != tuple(t.shape):
            raise ValueError(
                f"{path}: tensor `{key}` has shape {_shape(state[key])}, but the model its config describes needs "
                f"{tuple(t.shape)} (the config's sizes must be those of the weights in the file); {DAMAGED}"
            )
    extra = sorted(k for k in state if k not in expected and not (skip is not None and skip.fullmatch(k)))
    if extra:
        raise ValueError(f"{path}: tensors {extra[:5]} are not part of the model its config describes; {DAMAGED}")


def check_item_tokens(item_tokens: Any, layout: TokenLayout, path: str | os.PathLike[str], ids: SemanticIDs | None) -> torch.Tensor:
    """A causal checkpoint's ``item_tokens`` (N + 1, L): integers, row 0 the padding item, column l in level l's
    token block; with ``ids``, exactly their tokens. Returns rows 1.. (N, L)."""
    L = layout.num_levels
    if not isinstance(item_tokens, torch.Tensor) or item_tokens.dtype != torch.long or item_tokens.ndim != 2 \
            or item_tokens.shape[1] != L or item_tokens.shape[0] < 2:
        raise ValueError(f"{path}: tensor `item_tokens` must be int64 (N + 1, {L}), got "
                         f"{getattr(item_tokens, 'dtype', type(item_tokens).__name__)} {_shape(item_tokens)}; {DAMAGED}")
    if not bool((item_tokens[0] == layout.pad_token_id).all()):
        raise ValueError(f"{path}: tensor `item_tokens` row 0 must be the padding item (all {layout.pad_token_id}), "
                         f"got {item_tokens[0].tolist()}; {DAMAGED}")
    rows = item_tokens[1:]
    lo = torch.tensor([layout.level_range(level)[0] for level in range(L)])
    hi = torch.tensor([layout.level_range(level)[1] for level in range(L)])
    bad = (rows < lo) | (rows >= hi)
    if bool(bad.any()):
        r, level = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{path}: tensor `item_tokens[{r + 1}, {level}]` is {int(rows[r, level])}, outside level "
                         f"{level}'s tokens [{int(lo[level])}, {int(hi[level])}); {DAMAGED}")
    if ids is not None:
        want = torch.from_numpy(layout.codes_to_tokens(ids.codes)).long()
        if want.shape != rows.shape or not torch.equal(want, rows):
            raise ValueError(f"{path}: tensor `item_tokens` is not the token table of the semantic IDs it was trained with "
                             f"(the digest in the file matches them, the table does not); {DAMAGED}")
    return rows


def check_causal(meta_config: Any, layout: TokenLayout, state: dict[str, Any], path: str | os.PathLike[str],
                 ids: SemanticIDs | None) -> None:
    """Before a causal model is built: ``item_tokens``, ``content`` and every size of the config against the file."""
    from generator.models.causal import CausalGenerator, rename_dense_weights

    rows = check_item_tokens(state.get("item_tokens"), layout, path, ids)
    content = state.get("content")
    if meta_config.content_dim and _shape(content) != (rows.shape[0] + 1, meta_config.content_dim):
        raise ValueError(f"{path}: tensor `content` must be ({rows.shape[0] + 1}, {meta_config.content_dim}), got "
                         f"{_shape(content)}; {DAMAGED}")
    layers = {int(m.group(1)) for key in state if (m := _LAYER.match(key))}
    if len(layers) != meta_config.num_layers:  # (before the skeleton: 100,000 layers took minutes and GBs to build)
        raise ValueError(f"{path}: the config says {meta_config.num_layers} layers, the file holds tensors of "
                         f"{len(layers)}; {DAMAGED}")
    with torch.device("meta"):  # the config's model, without memory; the tree tables depend on data: checked after
        skeleton = CausalGenerator(replace(meta_config, node_vectors=False, distill=0.0), layout, rows.to("meta"),
                                   content[1:].to("meta") if meta_config.content_dim else None)
    check_shapes(skeleton.state_dict(), rename_dense_weights(dict(state)), path, _TREE_TABLE if meta_config.node_vectors else None)


def member_states(state: dict[str, Any], members: int, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """An ensemble checkpoint's state split into its members' (``members.<k>.<name>`` -> ``<name>``), refusing a key
    that belongs to none of the config's ``members``."""
    parts: list[dict[str, Any]] = [{} for _ in range(members)]
    for key, value in state.items():
        m = _MEMBER.fullmatch(key)
        if m is None or int(m.group(1)) >= members:
            raise ValueError(f"{path}: tensor `{key}` belongs to none of the ensemble's {members} members "
                             f"(`members.0.` .. `members.{members - 1}.`); {DAMAGED}")
        parts[int(m.group(1))][m.group(2)] = value
    return parts


def check_tree_tables(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A causal model's prefix-tree tables (built from its ``item_tokens``) are exactly the file's."""
    if not model.config.node_vectors:
        return
    for level in range(model.layout.num_levels):
        for name in ("parent_keys", "child_codes", "child_index"):
            key = f"{name}_{level}"
            ours, theirs = getattr(model, key), state.get(key)
            if not isinstance(theirs, torch.Tensor) or theirs.dtype != ours.dtype or theirs.shape != ours.shape \
                    or not torch.equal(theirs, ours):
                raise ValueError(
                    f"{path}: tensor `{key}` is not the prefix-tree table the checkpoint's own `item_tokens` give (an "
                    f"index out of range, a negative index other than the -1 padding, or an edge no item has); {DAMAGED}"
                )
