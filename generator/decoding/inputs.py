"""What a served causal model reads for a history's items, set up once by the decoders' build (``CausalDecoders.refresh``
with ``release``): the ID input read back from the decoders' item vectors on a large catalogue (:func:`read_inputs_from`:
the model's N-row item table freed), or every item's input vector in one table on a small one (:func:`freeze_inputs`:
a single user's call then gathers its inputs instead of summing each member's code embeddings and ID rows).
"""

from __future__ import annotations

import torch

from generator.models.causal import CausalGenerator
from generator.models.ensemble import EnsembleGenerator, member_models

INPUT_TABLE_MAX_BYTES = 1 << 26  # the largest input table frozen (Beauty's four members: 24.8 MB)
INPUT_CHUNK = 1 << 14  # items' inputs computed at a time for it


def serving_inputs(model: CausalGenerator | EnsembleGenerator, vectors: torch.Tensor | None, from_vectors: bool) -> None:
    """Set up a released ``model``'s inputs for serving: with no ID input (and a dense head) its item table is freed;
    ``from_vectors``: its ID input reads ``vectors`` (N, K * dense_dim, the decoders' item vectors, members side by
    side) and the table is freed; else, within :data:`INPUT_TABLE_MAX_BYTES`, its inputs are frozen."""
    if model.has_dense and not model.config.id_input:
        model.release_tables([], item_table=True)
    elif vectors is not None and from_vectors:
        D = model.config.dense_dim
        for k, m in enumerate(member_models(model)):  # loop over members
            read_inputs_from(m, vectors[:, k * D:(k + 1) * D])
    if not from_vectors and freeze_inputs(model) and vectors is not None:  # nothing reads the item table now: the
        for m in member_models(model):  # inputs are frozen, the decoders hold the item vectors (24.8 MB at Beauty's
            _release_item_table(m)  # four members); loop over members


@torch.no_grad()
def freeze_inputs(model: CausalGenerator | EnsembleGenerator, max_bytes: int | None = None) -> bool:
    """Every item's input vector (row 0: the padding's) computed once, as ``item_inputs`` computes it for a history,
    into one float table the model then gathers from: (N + 1, D), an ensemble's (K, N + 1, D) (its members' inputs in
    one gather: ~0.3 ms of a single user's call over Beauty's four members). Only for a released model in eval mode
    (serving only: never trained again, no items added; in training mode the inputs would carry item dropout) whose
    table fits ``max_bytes`` (default :data:`INPUT_TABLE_MAX_BYTES`); whether it was made. The same inputs bit for
    bit where they are code embeddings and ID rows; a content part's projection may round differently."""
    members = member_models(model)
    N1, D = model.num_items + 1, model.config.d_model
    max_bytes = INPUT_TABLE_MAX_BYTES if max_bytes is None else max_bytes
    if not model.released or any(m.training or m._input_vectors is not None for m in members):
        return False
    if len(members) * N1 * D * 4 > max_bytes:
        return False
    rows = torch.arange(N1, device=model.item_tokens.device)
    table = torch.stack([torch.cat([m.item_inputs(rows[a:a + INPUT_CHUNK]) for a in range(0, N1, INPUT_CHUNK)])
                         for m in members])  # loop over members, and chunks of items
    model._input_table = table if isinstance(model, EnsembleGenerator) else table[0]
    return True


def inputs_readable_from_vectors(model: CausalGenerator) -> bool:
    """Whether ``model``'s ID input's table rows follow from its item vectors: ``item_vectors`` is the table plus the
    projected code embeddings, nothing else (no content part, no normalisation)."""
    c = model.dense_head.config if model.has_dense else None
    return bool(model.config.id_input and c is not None and c.mode == "id" and not c.normalize and c.code_dim)


@torch.no_grad()
def read_inputs_from(model: CausalGenerator, vectors: torch.Tensor) -> None:
    """Serving: ``model``'s ID input reads each history item's table row as ``vectors[row] - code_proj(codes)``
    from ``vectors`` (N, dense_dim), the decoders' copy of its item vectors, and its item table (N x d: the largest
    table a served run keeps besides the decoders' own, 4.9 GB at 10M items in float32) is freed. The inputs equal
    the table's up to the rounding of that subtraction (float32: ~1e-7 of the vector; 16-bit vectors: their
    rounding). ``vectors`` must stay alive and unchanged (the decoders hold them); the model is then for serving only,
    like a released one (``CausalGenerator.release_tables``)."""
    if not inputs_readable_from_vectors(model):
        raise ValueError("the model's ID input cannot be read from its item vectors (no ID input, or item vectors "
                         "with a content part or normalised)")
    if tuple(vectors.shape) != (model.num_items, model.config.dense_dim):
        raise ValueError(f"`vectors` must be ({model.num_items}, {model.config.dense_dim}), got {tuple(vectors.shape)}")
    model._input_vectors = vectors
    _release_item_table(model)


def _release_item_table(model: CausalGenerator) -> None:
    """Free ``model``'s dense item table where its inputs no longer read it (what would read it then raises a
    ValueError: ``CausalGenerator._check_held``)."""
    if model.has_dense and "item_table" not in model.released:
        head = model.dense_head
        head.item_table = torch.nn.Parameter(head.item_table.new_empty(0, head.item_table.shape[1]), requires_grad=False)
        model.released.add("item_table")
