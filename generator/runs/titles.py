"""Title runs (``semid train --target title``): setup for ``generator.runs.train``, loading, evaluation, recommendation.

The run folder is a causal run's (config.yaml, semantic_ids.npz for the history input, checkpoints/, logs/) plus
``RUN/tokenizer/`` (the title tokenizer: trained on the catalogue's titles, or a copy of the local ``--tokenizer``
folder's). The title tree is rebuilt from the checkpoint's title targets, so a run does not need its dataset to
recommend with ``title-beam``; ``title-grounded`` reads the catalogue's titles (to embed them once, cached in
``RUN/title_grounding_emb.npy``) and the ``--encoder`` folder named at training time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.decoding.grounding import GroundingStats, catalogue_title_embeddings
from generator.decoding.titles import TITLE_BEAM, TITLE_DECODERS, TitleDecoders, tree_from_targets
from generator.models.t5 import CHECKPOINT_KEY, STATE_PREFIX, check_vocabulary, safe_load
from generator.models.titles import BACKBONE_KEYS, TitleConfig, TitleGenerator
from generator.runs.causal import rank_split, recommend_batches
from generator.runs.folder import IDS_FILE, Run, best_checkpoint
from generator.training.causal_data import CausalDataModule
from generator.training.title_system import TARGET, TitleSystem, title_monitor  # noqa: F401 (generator.runs.train imports it from here)
from semid.data import Split, load_dataset
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.titles import TitleIndex, TitleTokenizer

log = logging.getLogger(__name__)

TARGETS = ("ids", TARGET)
TOKENIZER_DIR = "tokenizer"
# what --model-option may set for a title run (the rest come from the preset, the tokenizer and the catalogue)
TITLE_OPTION_KEYS = tuple(sorted({f.name for f in fields(TitleConfig)} - {"vocab_size", "pad_id", "eos_id", "max_history"}))


def resolve_title_decoder(name: str) -> str:
    name = TITLE_BEAM if name in ("auto", "beam") else name
    if name not in TITLE_DECODERS:
        raise ValueError(f"`decoder` must be one of {['auto', *TITLE_DECODERS]} for a title run, got {name!r}")
    return name


# ---- training ------------------------------------------------------------------------------------------------------
def check_title_options(options: Any) -> None:
    """Validate and complete a ``TrainOptions`` with ``target='title'`` (called from its ``__post_init__``)."""
    from generator.runs.options import CAUSAL_PRESETS

    set_ = lambda name, value: object.__setattr__(options, name, value)  # noqa: E731 (a frozen dataclass)
    if options.target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {options.target!r}")
    if options.preset not in CAUSAL_PRESETS:
        raise ValueError(f"`target` 'title' runs on the causal backbone: `preset` must be one of {sorted(CAUSAL_PRESETS)}, "
                         f"got {options.preset!r}")
    if options.user_tokens:
        raise ValueError(f"`user_tokens` must be 0 with `target` 'title', got {options.user_tokens}")
    if options.dense not in (None, "id"):  # "id" is the causal default; a title run has no dense head
        raise ValueError(f"`dense` must be 'none' with `target` 'title' (no dense head), got {options.dense!r}")
    set_("dense", None)
    if options.objective not in ("joint", "generative"):
        raise ValueError(f"`objective` must be 'generative' with `target` 'title', got {options.objective!r}")
    set_("objective", "generative")
    set_("decoder", resolve_title_decoder(options.decoder))
    if options.decoder != TITLE_BEAM:
        raise ValueError(f"a title run selects checkpoints with decoder {TITLE_BEAM!r}, got {options.decoder!r}")
    unknown = sorted(set(options.model_options or {}) - set(TITLE_OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown `model_options` {unknown} for `target` 'title'; known: {list(TITLE_OPTION_KEYS)}")
    for name in ("tokenizer", "encoder"):
        path = getattr(options, name)
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"`{name}` must be a local model folder, got {path!r} (not a folder)")
    TitleConfig(**(options.model_options or {}))  # validates the values


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


def title_decoders_for(run: TitleRun, name: str, *, num_beams: int = 20, length_penalty: float | None = None,
                       device: torch.device | None = None) -> TitleDecoders:
    """The run's title decoders; ``title-grounded`` loads the run's encoder and the catalogue's title embeddings."""
    from generator.decoding.titles import LENGTH_PENALTY

    device = device if device is not None else next(run.model.parameters()).device
    encoder = item_emb = None
    if name != TITLE_BEAM:
        from semid.embed import load_encoder

        enc_dir = run.config["train"].get("encoder")
        if enc_dir is None:
            raise ValueError(f"{run.path}: decoder {name!r} embeds generated titles with a sentence encoder, and this run "
                             "names none: train it with `--encoder DIR` (a local model folder, as for `semid embed`)")
        encoder = load_encoder(enc_dir, device)
        catalogue = load_dataset(run.data_dir).catalogue  # once: it parses the dataset's files
        titles = [catalogue.title_of(int(i)) for i in run.ids.item_ids]
        item_emb = torch.from_numpy(catalogue_title_embeddings(run.path, titles, encoder, enc_dir))
    return TitleDecoders(run.model, run.tree, torch.from_numpy(run.ids.item_ids), torch.from_numpy(run.ids.codes),
                         num_beams=num_beams, length_penalty=LENGTH_PENALTY if length_penalty is None else length_penalty,
                         tokenizer=run.tokenizer, encoder=encoder, item_emb=item_emb).to(device)


# ---- evaluation and recommendation ---------------------------------------------------------------------------------
def evaluate_title(run: TitleRun, split: Split, which: str, *, ks: Sequence[int], num_beams: int, max_users: int | None,
                   seed: int, batch_size: int, decoder: str, device: torch.device, length_penalty: float | None = None,
                   ) -> tuple[str, dict[str, float], int, int, int, float, GroundingStats]:
    """(decoder name, metrics, users, invalid items, duplicate items, seconds, grounding stats) over the split's users."""
    name = resolve_title_decoder(decoder)
    run.model.to(device).eval()
    dec = title_decoders_for(run, name, num_beams=num_beams, length_penalty=length_penalty, device=device)
    ranked = rank_split(run, split, which, lambda h: dec.decode(name, h, k=ks[-1]).items, ks=ks, max_users=max_users,
                        seed=seed, batch_size=batch_size, device=device)
    return f"title.{name}", *ranked, dec.stats


def recommend_title(run: TitleRun, histories: list[np.ndarray], *, k: int, num_beams: int, decoder: str,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(items (B, k), scores (B, k)) for histories of known item ids."""
    name = resolve_title_decoder(decoder)
    dec = title_decoders_for(run, name, num_beams=num_beams)
    return recommend_batches(run, histories, lambda h: dec.decode(name, h, k=k), k=k, batch_size=batch_size)


# ---- the entry points generator.runs.evaluate / generator.runs.recommend / the CLI call ------------------------------------------
GENERATED = (*TITLE_DECODERS, "codes-grounded")


def handles(run: Run, decoder: str) -> bool:
    """Whether this module decodes for ``run`` with ``decoder``: every title run, and codes-grounded anywhere."""
    return run.design == TARGET or decoder == "codes-grounded"


def load_any_run(run_dir: Any, checkpoint: Any = None) -> Run:
    """``generator.runs.folder.load_run``, or :func:`load_title_run` for a title run's folder."""
    from generator.runs.folder import load_run, read_config

    config = read_config(run_dir)
    if is_title_config(config):
        return load_title_run(Path(run_dir), config, checkpoint)
    return load_run(run_dir, checkpoint)


def _check_codes_run(run: Run) -> None:
    if run.design != "causal":
        raise ValueError(f"{run.path}: decoder 'codes-grounded' needs a causal semantic-ID run (the default preset); this "
                         f"is a {run.design} run")


def evaluate_generated(run: Run, split: Split, which: str, **kwargs: Any) -> tuple[str, dict[str, float], int, int, int, float, GroundingStats]:
    """Title decoders of a title run, or codes-grounded of a causal run (keyword arguments as :func:`evaluate_title`)."""
    if run.design == TARGET:
        return evaluate_title(run, split, which, **kwargs)
    _check_codes_run(run)
    from generator.runs.grounded import evaluate_grounded_codes

    kwargs.pop("decoder")
    kwargs.pop("length_penalty", None)
    return evaluate_grounded_codes(run, split, which, **kwargs)


def recommend_generated(run: Run, histories: list[np.ndarray], *, k: int, num_beams: int, decoder: str, batch_size: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    if run.design == TARGET:
        return recommend_title(run, histories, k=k, num_beams=num_beams, decoder=decoder, batch_size=batch_size)
    _check_codes_run(run)
    from generator.runs.grounded import recommend_grounded_codes

    return recommend_grounded_codes(run, histories, k=k, num_beams=num_beams, batch_size=batch_size)
