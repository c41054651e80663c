"""The T5 design's entry (the plug-in's one registration of its design, which ``generator.designs.registry`` imports):
TIGER's encoder-decoder over code tokens (``generator.t5.model``; presets tiger, cpu, item-t5), its encoder-token
featurisation (``generator.t5.data``), its decoders (``generator.t5.decoders``, registered by importing it), its
dense head kept in the checkpoint beside the model, and its Lightning system (``generator.t5.system``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from generator.decoding.protocol import Histories
from generator.decoding.registry import resolve
from generator.designs.base import Design, Labelled, Setup, TrainInputs, refuse_title_fields
from generator.models import checkpoint_checks as checks
from generator.models.checkpoint import safe_load
from generator.models.dense import DenseHead, load_dense_head
from generator.t5.data import collate, eval_batches, history_examples, split_examples
from generator.t5.decoders import T5 as NAME
from generator.t5.model import PRESETS, GeneratorConfig, build_model
from semid.split import Split

MONITOR = "val/ndcg@10"  # the T5 design's selection metric
DEFAULTS = {"batch_size": 256, "lr": 2e-3, "warmup_steps": 500, "label_smoothing": 0.1, "max_history": 20,
            "user_tokens": 2000, "dense": None, "decoder": "auto", "ema": 0.0}


def check_options(options: Any) -> None:
    refuse_title_fields(options)
    if options.model_options:
        raise ValueError(f"`model_options` are for the causal design; preset {options.preset!r} takes none, got {options.model_options!r}")
    if options.dense is None:  # what needs a dense head, refused before the run folder is written (they were ignored)
        if options.objective == "dense":
            raise ValueError("`objective` 'dense' needs a dense head: pass `dense` ('content' or 'both')")
        if options.dense_options:
            raise ValueError(f"`dense_options` configure the dense head, and this run trains none: pass `dense` or "
                             f"leave them out, got {options.dense_options!r}")
    try:  # (a name T5 does not serve, such as 'exact': said before the folder, with the choices training has)
        decoder, why = resolve(NAME, options.decoder), ""
    except ValueError as e:
        decoder, why = None, f" ({str(e).split(';')[0]})"
    if decoder not in ("beam", "generate", "dense"):  # (a hybrid's fusion is chosen after training; no cold items yet)
        raise ValueError(f"a T5 run selects checkpoints with decoder 'beam', 'generate' or (with a dense head) 'dense', "
                         f"got {options.decoder!r}{why}")
    if decoder == "dense" and options.dense is None:
        raise ValueError("`decoder` 'dense' validates the dense head, and this run trains none: pass `dense`")
    if options.objective == "dense" and decoder != "dense" and options.decoder != "auto":  # (recorded, not used)
        raise ValueError(f"`objective` 'dense' trains the dense head alone, which validates with `decoder` 'dense' (or "
                         f"'auto'), got {options.decoder!r}")
    if PRESETS[options.preset].item_level and options.user_tokens:  # (refused by the model, after the folder was made)
        raise ValueError(f"`user_tokens` must be 0 with preset {options.preset!r} (an item-level T5 has no user token), "
                         f"got {options.user_tokens}")


def build(config: GeneratorConfig, layout: Any, state: dict[str, torch.Tensor], path: Any, ids: Any) -> torch.nn.Module:
    with torch.device("meta"):  # every size of the config against the file's tensors, before the model is built
        skeleton = build_model(config, layout)
    checks.check_shapes(skeleton.state_dict(), state, path)
    return build_model(config, layout)


def dense_head(run: Any) -> DenseHead:
    """The dense head of a T5 run's checkpoint, on the model's device, in eval mode."""
    head = load_dense_head(safe_load(run.checkpoint))
    if head is None:
        raise ValueError(f"{run.checkpoint}: this run has no dense head (train it with `semid train --dense both ...`)")
    return head.to(next(run.model.parameters()).device)


# ---- featurisation: encoder tokens (user token, code tokens of each history item) ---------------------------------
def split_batches(run: Any, split: Split, which: str, rows: np.ndarray, batch_size: int) -> list[Labelled]:
    ex = split_examples(split, run.ids, run.layout, which, rows=rows, max_history=run.max_history,
                        use_user_tokens=run.use_user_tokens)
    out = []
    for index in eval_batches(ex.input_lengths, batch_size):  # loop over batches of users
        b = collate(ex, index, run.layout.pad_token_id)
        out.append(Labelled(Histories(b.input_ids, b.attention_mask.bool()), b.target, np.asarray(index)))
    return out


def history_batches(run: Any, histories: list[np.ndarray], user_ids: np.ndarray | None, batch_size: int) -> list[Histories]:
    ex = history_examples(histories, np.full(len(histories), -1), user_ids, run.ids, run.layout, max_history=run.max_history)
    out = []
    for lo in range(0, len(histories), batch_size):  # loop over batches of histories
        b = collate(ex, torch.arange(lo, min(lo + batch_size, len(histories))), run.layout.pad_token_id)
        out.append(Histories(b.input_ids, b.attention_mask.bool()))
    return out


def setup(t: TrainInputs) -> Setup:
    from generator.t5.datamodule import GeneratorDataModule
    from generator.t5.system import GeneratorSystem, dense_setup

    options = t.options
    config = PRESETS[options.preset]
    dm = GeneratorDataModule(
        t.split, t.ids, t.layout, batch_size=options.batch_size, eval_batch_size=options.eval_batch_size,
        max_history=options.max_history, val_users=options.val_users, seed=options.seed, num_workers=options.num_workers,
    )
    dense = dense_setup(
        options.dense, options.objective if options.dense else "generative", t.dataset, t.split, t.ids, config.d_model,
        embeddings=options.dense_embeddings, options=options.dense_options,
    )
    system = GeneratorSystem(
        config, t.layout, t.digest, t.tree, optim=options.optim(), num_beams=options.num_beams,
        decoder="dense" if dense.objective == "dense" else options.decoder,
        dense_head=dense.head, objective=dense.objective, log_q=dense.log_q, ids=t.ids,
    )
    return Setup(config, dm, system, MONITOR)


T5 = Design(NAME, GeneratorConfig, "ids", PRESETS, DEFAULTS, check_options, build, split_batches, history_batches, setup,
            served=("beam", "generate", "dense", "hybrid"), dense_head=dense_head,
            preset_defaults={"item-t5": {"user_tokens": 0}})  # one position per item: no user token
