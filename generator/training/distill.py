"""Distil a trained causal model's dense head into its code heads (``semid distill``).

The code head is trained on the one-hot next item; the dense head, a softmax over every item, ranks better once
members are combined (the four-member default at 60 CPU-minutes: test R@10 0.0855 dense against 0.0820 beam). Here
each member's code head is fine-tuned on the model's own dense softmax: each level's target becomes ``(1 - weight)``
x the true code + ``weight`` x the teacher's mass on each child of the true parent (``code_loss(teacher=...)``), over
the training windows only. The teacher is the whole model's dense softmax (an ensemble's: the sum of its members'
logits) at temperature ``temperature``: on training positions the dense head has nearly learned the targets, and a
softer teacher passes on more than the target. What is trained: per member the level projections, the head's layer
norm, the prefix MLPs, the code biases and the node vectors; the backbone, the code embeddings (also the input) and
the dense head stay as trained, so the states (eval mode) and the teacher are fixed. The epoch is chosen on seeded
validation users by the exact log-likelihood's NDCG@10 (the beam's ranking; measured equal on Beauty's runs).

Shapes: P trained positions of a batch, N items, K members, D d_model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from generator.decoding.causal import CausalDecoders
from generator.models.causal_loss import child_counts, code_loss, pair_counts
from generator.models.ensemble import EnsembleGenerator, member_models
from generator.training.causal_data import collate_windows, eval_batches, split_histories
from generator.training.datamodules import CausalDataModule
from generator.training.distill_options import DistillOptions
from semid.ids import SemanticIDs
from semid.metrics import ndcg_at_k, recall_at_k
from semid.split import Split
from semid.tree import PrefixTree

MAX_TEACHER_BYTES = 4 << 30  # a batch's (positions x items) teacher: its logits, softmax and copy
HEAD = ("level_proj", "head_norm", "prefix_mlp", "code_bias", "node_vec_")  # a member's code head, by parameter name


def head_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The code heads' parameters of a causal model or of each member of an ensemble."""
    return [p for m in member_models(model) for name, p in m.named_parameters() if name.startswith(HEAD)]


def teacher_softmax(model: Any, h: torch.Tensor, temperature: float) -> torch.Tensor:
    """The dense head's softmax over the trained items at ``temperature``: h (P, D or K * D) -> (P, N)."""
    return (model.dense_queries(h) @ model.item_vectors().T / temperature).softmax(-1)[:, : model.trained_items]


def check_finite(model: Any, row: dict[str, Any], options: DistillOptions) -> None:
    """Refuse an epoch (its ``history`` row) whose code-head weights, loss or validation scores are NaN or infinite
    (the learning rate too high): such an epoch must not be kept, and no fusion can be fitted on it."""
    what = ("weights" if not all(bool(torch.isfinite(p).all()) for p in head_parameters(model))
            else "loss" if not math.isfinite(row["loss"])
            else "validation scores" if not math.isfinite(row["ndcg@10"]) else None)
    if what:
        d = DistillOptions()
        others = ((options.weight_decay > d.weight_decay) * f", lower --weight-decay (default {d.weight_decay:g})"
                  + (options.temperature < d.temperature) * f", raise --temperature (default {d.temperature:g})")
        raise ValueError(f"distillation diverged at epoch {row['epoch']}: the code heads' {what} became NaN or infinite "
                         f"(--lr {options.lr:g}, --weight-decay {options.weight_decay:g}, --temperature "
                         f"{options.temperature:g}); lower --lr (default {d.lr:g}){others}, then distil again")


def validation_ndcg(model: Any, tree: PrefixTree, ids: SemanticIDs, batches: list[Any], users: int) -> dict[str, float]:
    """Recall@10 and NDCG@10 of the exact decoder's top 10 over ``batches`` (targets: item ids); both NaN where a
    score is NaN or infinite (diverged weights: :func:`check_finite`)."""
    dec = CausalDecoders(model, tree, torch.as_tensor(ids.item_ids)).refresh()
    recall = ndcg = 0.0
    finite = True
    with torch.inference_mode():
        for b in batches:  # loop over batches of users
            top = dec.decode("exact", model.last_hidden(b.histories, b.lengths), k=10)
            ranked, finite = top.items, finite and bool(torch.isfinite(top.scores).all())
            recall += float(recall_at_k(ranked, b.targets, 10).sum())
            ndcg += float(ndcg_at_k(ranked, b.targets, 10).sum())
    if not finite:
        return {"recall@10": math.nan, "ndcg@10": math.nan}
    return {"recall@10": recall / users, "ndcg@10": ndcg / users}


def distill_code_heads(model: Any, tree: PrefixTree, ids: SemanticIDs, split: Split, options: DistillOptions = DistillOptions(),  # noqa: B008 (frozen)
                       log: Callable[[dict[str, Any]], None] = lambda row: None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Fine-tune ``model``'s code heads on its dense softmax (module docstring). Returns the state dict of the
    epoch best on validation (epoch 0 is the model as given: kept when no epoch beats it) and one row per epoch,
    each also passed to ``log``. ``model`` is left holding the last epoch's weights."""
    members = member_models(model)
    if not members[0].has_dense or not members[0].config.node_vectors:
        raise ValueError("distillation needs a causal model with a dense head (dense_dim > 0) and node vectors: train "
                         "the run with a dense head (e.g. the default `--dense id`) and node vectors (the default)")
    if model.trained_items != model.num_items:
        raise ValueError(f"the model holds {model.num_items - model.trained_items} items added after training (their "
                         "codes have no training windows): distil a copy of the run with the IDs it was trained with "
                         "(RUN/semantic_ids.v1.npz as its semantic_ids.npz), then `semid add-items` to the distilled run")
    worst = options.batch_size * model.config.max_history * model.num_items * 4 * 3  # logits, softmax, their copy
    if worst > MAX_TEACHER_BYTES:
        raise ValueError(f"a batch of {options.batch_size} windows of up to {model.config.max_history} positions would hold "
                         f"teacher distributions over {model.num_items:,} items of up to {worst / 2**30:.1f} GiB (limit "
                         f"{MAX_TEACHER_BYTES / 2**30:.0f} GiB): pass a smaller batch size")
    torch.manual_seed(options.seed)
    model.eval()
    dm = CausalDataModule(split, ids, max_history=model.config.max_history, batch_size=options.batch_size, val_users=1,
                          seed=options.seed)
    dm.setup()
    users = min(options.val_users, split.num_users)
    rows = np.sort(np.random.default_rng(options.seed).choice(split.num_users, users, replace=False))
    histories, targets = split_histories(split, "valid", rows)
    val = eval_batches(histories, targets, ids, model.config.max_history, 256)
    counts = child_counts(members[0])
    opt = torch.optim.AdamW(head_parameters(model), lr=options.lr, weight_decay=options.weight_decay)
    history = [{"epoch": 0, **validation_ndcg(model, tree, ids, val, users), "loss": None}]
    log(history[-1])
    best = (history[0]["ndcg@10"], copy.deepcopy(model.state_dict()))
    for epoch in range(1, options.epochs + 1):
        total, steps = 0.0, 0
        for index in dm.train_sampler().batches():  # loop over batches
            b = collate_windows(dm.windows, index)
            real = torch.nonzero(b.targets.flatten() >= 0).squeeze(1)
            target_rows = b.targets.flatten()[real]
            with torch.inference_mode():  # fixed: the backbone and dense head are not trained
                h = model.hidden(b.histories).flatten(0, 1)[real]  # (P, D or K * D)
                teacher = teacher_softmax(model, h, options.temperature)
            h, teacher = h.clone(), teacher.clone()  # out of inference mode, for autograd
            parts = model._split(h) if isinstance(model, EnsembleGenerator) else (h,)
            pairs = pair_counts(counts, target_rows)
            loss = sum(code_loss(m, m.level_queries(x), m.item_tokens[target_rows + 1], teacher=teacher,
                                 distill=options.weight, label_smoothing=options.label_smoothing, pairs=pairs)
                       for m, x in zip(members, parts, strict=True))  # loop over members
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        history.append({"epoch": epoch, **validation_ndcg(model, tree, ids, val, users), "loss": total / steps})
        check_finite(model, history[-1], options)
        log(history[-1])
        if history[-1]["ndcg@10"] > best[0]:
            best = (history[-1]["ndcg@10"], copy.deepcopy(model.state_dict()))
    return best[1], history
