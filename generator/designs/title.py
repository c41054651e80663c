"""The title design (``semid train --target title``): the causal backbone reading one position per history item,
emitting the next item's title tokens (``generator.models.titles``), trained by ``generator.training.title_system``.

Its run folder is a causal run's (config.yaml records the backbone's design, ``causal``, and ``train.target: title``)
plus ``RUN/tokenizer/`` (the title tokenizer: trained on the catalogue's titles, or a copy of the local
``--tokenizer`` folder's). The title tree is rebuilt from the checkpoint's title targets, so a run does not need its
dataset to recommend with ``title-beam``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding.registry import TITLE, resolve
from generator.decoding.titles import TITLE_BEAM, tree_from_targets
from generator.designs import causal
from generator.designs.base import Design, Extras, Setup, TrainInputs, refuse_workers
from generator.models.config import BACKBONE_KEYS
from generator.models.titles import DESIGN, TitleConfig, TitleGenerator
from semid.titles import TitleIndex, TitleTokenizer

TARGET = DESIGN  # `--target title`
TOKENIZER_DIR = "tokenizer"  # RUN/tokenizer/: the run's title tokenizer
# what --model-option may set for a title run (the rest come from the preset, the tokenizer and the catalogue)
OPTION_KEYS = tuple(sorted({f.name for f in fields(TitleConfig)} - {"vocab_size", "pad_id", "eos_id", "max_history"}))


def check_options(options: Any) -> None:
    """Validate and complete a ``TrainOptions`` with ``target='title'``."""
    set_ = lambda name, value: object.__setattr__(options, name, value)  # noqa: E731 (a frozen dataclass)
    if options.preset not in causal.PRESETS:
        raise ValueError(f"`target` 'title' runs on the causal backbone: `preset` must be one of {sorted(causal.PRESETS)}, "
                         f"got {options.preset!r}")
    refuse_workers(options)
    if options.user_tokens:
        raise ValueError(f"`user_tokens` must be 0 with `target` 'title', got {options.user_tokens}")
    if options.dense not in (None, "id"):  # "id" is the causal default; a title run has no dense head
        raise ValueError(f"`dense` must be 'none' with `target` 'title' (no dense head), got {options.dense!r}")
    set_("dense", None)
    if options.objective not in ("joint", "generative"):
        raise ValueError(f"`objective` must be 'generative' with `target` 'title', got {options.objective!r}")
    set_("objective", "generative")
    if options.dense_options:
        raise ValueError(f"`dense_options` configure a dense head, and a title run has none: leave them out, got "
                         f"{options.dense_options!r}")
    set_("decoder", resolve(TITLE, options.decoder))  # "auto" and "beam" mean title-beam
    if options.decoder != TITLE_BEAM:
        raise ValueError(f"a title run selects checkpoints with decoder {TITLE_BEAM!r}, got {options.decoder!r}")
    unknown = sorted(set(options.model_options or {}) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown `model_options` {unknown} for `target` 'title'; known: {list(OPTION_KEYS)}")
    for name, needs in (("tokenizer", None), ("encoder", "config.json")):
        path = getattr(options, name)
        if path is None:
            continue
        if not Path(path).is_dir():
            raise ValueError(f"`{name}` must be a local model folder, got {path!r} (not a folder)")
        if needs is not None and not (Path(path) / needs).is_file():  # (an empty folder failed only at evaluate)
            raise ValueError(f"`{name}` must be a local model folder, got {path!r}: it has no {needs}")
        set_(name, str(Path(path).resolve()))  # (recorded as given, a relative path was read from any other directory)
    TitleConfig(**(options.model_options or {}))  # validates the values


def build(config: TitleConfig, layout: Any, state: dict[str, torch.Tensor], path: Any, ids: Any) -> TitleGenerator:
    return TitleGenerator(config, layout, state["backbone.item_tokens"][1:], state["title_targets"])


def extras(run_dir: Path, model: TitleGenerator, config: TitleConfig, ids: Any, layout: Any, ckpt: Path) -> Extras:
    """The title tokenizer (checked against the checkpoint) and the title tree of the checkpoint's title targets."""
    tokenizer = TitleTokenizer.load(run_dir / TOKENIZER_DIR)
    if (tokenizer.pad_id, tokenizer.eos_id) != (config.pad_id, config.eos_id) or config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{run_dir / TOKENIZER_DIR}: this tokenizer (pad {tokenizer.pad_id}, eos {tokenizer.eos_id}, "
                         f"{tokenizer.vocab_size} tokens) is not the one {ckpt.name} was trained with")
    tree = tree_from_targets(model.title_targets.numpy(), ids.item_ids, config.vocab_size, config.pad_id, config.eos_id)
    return Extras(tree, tokenizer)


def setup(t: TrainInputs) -> Setup:
    """The config, data module and Lightning system of a title run; writes ``RUN/tokenizer/``."""
    from generator.training.datamodules import CausalDataModule
    from generator.training.title_system import TitleSystem, title_monitor

    options, ids = t.options, t.ids
    # the default preset's backbone is width 128 because its sampled dense head pays for it; a title run has no dense
    # head, so it keeps the width-64 backbone it was measured with (experiments/results/titles_vs_ids.md)
    base = causal.PRESETS["causal-64" if options.preset == "causal" else options.preset]
    backbone = {k: getattr(base, k) for k in BACKBONE_KEYS if k != "max_history"}  # the preset's, under the options
    config = TitleConfig(**{**backbone, **(options.model_options or {})}, max_history=options.max_history)
    titles = [t.dataset.catalogue.title_of(int(i)) for i in ids.item_ids]
    if options.tokenizer is not None:
        tokenizer = TitleTokenizer.from_pretrained(options.tokenizer)
    else:
        tokenizer = TitleTokenizer.train(titles, vocab_size=config.tokenizer_vocab)
    tokenizer.save(t.out / TOKENIZER_DIR)
    index = TitleIndex.build(tokenizer, titles, ids.item_ids, max_tokens=config.max_title_tokens)
    config = replace(config, vocab_size=index.vocab_size, pad_id=index.pad_id, eos_id=index.eos_id)
    dm = CausalDataModule(t.split, ids, max_history=options.max_history, batch_size=options.batch_size,
                          eval_batch_size=options.eval_batch_size, val_users=options.val_users, seed=options.seed)
    item_tokens = torch.as_tensor(np.asarray(t.layout.codes_to_tokens(ids.codes)), dtype=torch.long)
    system = TitleSystem(config, t.layout, item_tokens, torch.from_numpy(index.padded_targets()), torch.from_numpy(ids.item_ids),
                         torch.from_numpy(ids.codes), t.digest, index.tree, optim=options.optim(), num_beams=options.num_beams)
    return Setup(config, dm, system, title_monitor())


# label smoothing spreads a title token's target over the whole title vocabulary (`title_nll`); the title runs were
# measured without it, so a title run's default is 0 (the code head's sibling smoothing, 0.1, is the causal default)
DEFAULTS = {**causal.DEFAULTS, "label_smoothing": 0.0}
TITLE_DESIGN = Design(DESIGN, TitleConfig, TARGET, causal.PRESETS, DEFAULTS, check_options, build,
                      causal.split_batches, causal.history_batches, setup, served=(TITLE_BEAM,), extras=extras,
                      option_keys=OPTION_KEYS, backbone=causal.CAUSAL.name)
