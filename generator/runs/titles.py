"""Title runs (``semid train --target title``): setup for ``generator.runs.train``, loading, evaluation, recommendation.

The run folder is a causal run's (config.yaml, semantic_ids.npz for the history input, checkpoints/, logs/) plus
``RUN/tokenizer/`` (the title tokenizer: trained on the catalogue's titles, or a copy of the local ``--tokenizer``
folder's). The title tree is rebuilt from the checkpoint's title targets, so a run does not need its dataset to
recommend with ``title-beam``; ``title-grounded`` reads the catalogue's titles (to embed them once, cached in
``RUN/title_grounding_emb.npy``) and the ``--encoder`` folder named at training time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding.grounding import GROUND_MAX_LENGTH
from generator.decoding.titles import tree_from_targets
from generator.models.checkpoint import (
    CHECKPOINT_KEY,
    STATE_PREFIX,
    check_finite,
    check_vocabulary,
    safe_load,
)
from generator.models.titles import BACKBONE_KEYS, TitleConfig, TitleGenerator
from generator.runs.folder import IDS_FILE, TITLE_EMB_FILE, TOKENIZER_DIR, Run, best_checkpoint
from generator.training.causal_data import CausalDataModule
from generator.training.title_system import TARGET, TitleSystem, title_monitor  # noqa: F401 (generator.runs.train imports it from here)
from semid.data import read_npy
from semid.ids import SemanticIDs
from semid.io import atomic_path, write_json
from semid.layout import TokenLayout
from semid.split import Split
from semid.titles import TitleIndex, TitleTokenizer

log = logging.getLogger(__name__)

def title_setup(options: Any, dataset: Any, split: Split, ids: SemanticIDs, layout: TokenLayout, digest: str,
                out: Path) -> tuple[TitleConfig, CausalDataModule, TitleSystem]:
    """The config, data module and Lightning system of a title run; writes ``RUN/tokenizer/``."""
    from generator.runs.options import preset

    base = preset(options.preset)
    backbone = {k: getattr(base, k) for k in BACKBONE_KEYS if k != "max_history"}  # the preset's, under the options
    config = TitleConfig(**{**backbone, **(options.model_options or {})}, max_history=options.max_history)
    titles = [dataset.catalogue.title_of(int(i)) for i in ids.item_ids]
    if options.tokenizer is not None:
        tokenizer = TitleTokenizer.from_pretrained(options.tokenizer)
    else:
        tokenizer = TitleTokenizer.train(titles, vocab_size=config.tokenizer_vocab)
    tokenizer.save(out / TOKENIZER_DIR)
    index = TitleIndex.build(tokenizer, titles, ids.item_ids, max_tokens=config.max_title_tokens)
    config = replace(config, vocab_size=index.vocab_size, pad_id=index.pad_id, eos_id=index.eos_id)
    dm = CausalDataModule(split, ids, max_history=options.max_history, batch_size=options.batch_size,
                          eval_batch_size=options.eval_batch_size, val_users=options.val_users, seed=options.seed)
    item_tokens = torch.as_tensor(np.asarray(layout.codes_to_tokens(ids.codes)), dtype=torch.long)
    system = TitleSystem(config, layout, item_tokens, torch.from_numpy(index.padded_targets()), torch.from_numpy(ids.item_ids),
                         torch.from_numpy(ids.codes), digest, index.tree, optim=options.optim(), num_beams=options.num_beams)
    return config, dm, system


# ---- the loaded run ------------------------------------------------------------------------------------------------
@dataclass
class TitleRun(Run):
    """A loaded title run: a :class:`generator.runs.folder.Run` whose model is a ``TitleGenerator`` and whose tree is the
    title tree, with the title tokenizer."""

    tokenizer: TitleTokenizer

    @property
    def design(self) -> str:
        return TARGET


def is_title_config(config: dict[str, Any]) -> bool:
    return (config.get("train") or {}).get("target") == TARGET


def load_title_run(run_dir: Path, config: dict[str, Any], checkpoint: Any = None) -> TitleRun:
    """Load a title run folder (CPU, eval mode); refuses a checkpoint of other semantic IDs or another design."""
    ids = SemanticIDs.load(run_dir / IDS_FILE)
    ckpt = Path(checkpoint) if checkpoint is not None else best_checkpoint(run_dir, config)
    raw = safe_load(ckpt)
    meta = raw.get(CHECKPOINT_KEY) if isinstance(raw, dict) else None
    if meta is None or meta.get("target") != TARGET:
        raise ValueError(f"{ckpt}: not a title-run checkpoint (its run folder {run_dir} was trained with --target title)")
    layout = TokenLayout.from_dict(meta["layout"])
    check_vocabulary(layout, meta["ids_digest"], ids, source=str(ckpt))
    state = {k[len(STATE_PREFIX):]: v for k, v in raw["state_dict"].items() if k.startswith(STATE_PREFIX)}
    check_finite(state, ckpt)  # as a causal run's: NaN weights are named, not met later as a beam failure
    mcfg = TitleConfig.from_dict(meta["config"])
    model = TitleGenerator(mcfg, layout, state["backbone.item_tokens"][1:], state["title_targets"])
    model.load_state_dict(state)
    model.eval()
    tokenizer = TitleTokenizer.load(run_dir / TOKENIZER_DIR)
    if (tokenizer.pad_id, tokenizer.eos_id) != (mcfg.pad_id, mcfg.eos_id) or mcfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{run_dir / TOKENIZER_DIR}: this tokenizer (pad {tokenizer.pad_id}, eos {tokenizer.eos_id}, "
                         f"{tokenizer.vocab_size} tokens) is not the one {ckpt.name} was trained with")
    tree = tree_from_targets(model.title_targets.numpy(), ids.item_ids, mcfg.vocab_size, mcfg.pad_id, mcfg.eos_id)
    log.info("loaded title run %s (checkpoint %s, %d items)", run_dir, ckpt.name, ids.num_items)
    return TitleRun(run_dir, config, ckpt, model, mcfg, layout, ids, tree, tokenizer)


# ---- the catalogue's title embeddings for title-grounded (cached in the run folder) ------------------------------
def titles_digest(titles: list[str], encoder_dir: str | os.PathLike[str]) -> str:
    h = hashlib.sha256(str(Path(encoder_dir).resolve().name).encode())
    for t in titles:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def catalogue_title_embeddings(run_dir: Path, titles: list[str], encoder: object, encoder_dir: str | os.PathLike[str],
                               batch_size: int = 128) -> np.ndarray:
    """(N, D_e) float32 embeddings of the catalogue's titles, cached in ``RUN/title_grounding_emb.npy``."""
    from semid.embed import embed_texts

    digest = titles_digest(titles, encoder_dir)
    path, meta = run_dir / TITLE_EMB_FILE, run_dir / (TITLE_EMB_FILE + ".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("digest") == digest:
        return read_npy(path)  # header checked against the file size first
    t0 = time.perf_counter()
    emb = embed_texts(titles, encoder, batch_size=batch_size, max_length=GROUND_MAX_LENGTH, progress=False)
    with atomic_path(path) as tmp:
        np.save(tmp, emb)
    write_json(meta, {"digest": digest, "encoder": str(Path(encoder_dir).resolve()), "items": len(titles),
                      "seconds": round(time.perf_counter() - t0, 1)})
    log.info("embedded %d catalogue titles for grounding in %.0f s -> %s", len(titles), time.perf_counter() - t0, path)
    return emb
