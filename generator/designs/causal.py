"""The causal design (the default): one position per history item, every next-item target in one pass
(``generator.models.causal``), trained by ``generator.training.causal_system``. Its item-level featurisation (item
rows + 1, right-padded) is the title design's too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from generator.decoding.protocol import Histories
from generator.designs.base import (
    Design,
    Labelled,
    Setup,
    TrainInputs,
    positions,
    refuse_title_fields,
    refuse_workers,
)
from generator.models import checkpoint_checks as checks
from generator.models.causal import DESIGN, CausalConfig, CausalGenerator
from generator.models.ensemble import EnsembleGenerator
from generator.training import causal_data
from generator.training.optim import parse_max_time
from semid.split import Split

PRESETS: dict[str, CausalConfig] = {
    # the default, the quality study's winners (experiments/results/study.md): 2 causal layers of width 128, the
    # item's ID embedding (tied to the dense table) beside its codes at the input, dropout 0.3, and the dense head's
    # sampled softmax (1,024 uniform negatives + the batch's targets, log-Q corrected), whose cheaper step pays for
    # the width; its number of members follows the time budget (auto_members)
    "causal": CausalConfig(d_model=128, num_heads=4, d_ff=512, dense_dim=128, id_input=True, dropout=0.3,
                           dense_loss="sampled"),
    # the default before width 128 and the sampled head (width 64, full softmax)
    "causal-64": CausalConfig(id_input=True, dropout=0.3),
    "causal-wide": CausalConfig(d_model=128, num_heads=4, d_ff=512, dense_dim=128),
}
# label_smoothing 0.1: sibling smoothing on the code head (each level's target spreads 10% over the true parent's
# children), the study's winner at 15 CPU-minutes (+4% beam R@10)
DEFAULTS = {"batch_size": 128, "lr": 2e-3, "warmup_steps": 100, "label_smoothing": 0.1, "max_history": 50,
            "user_tokens": 0, "dense": "id", "decoder": "auto", "ema": 0.0}
# the default serves a moving average of its weights (decay 0.999: about the last 1,000 steps), the study's winner at
# 15, 30 and 60 CPU-minutes (beam R@10 0.0733 / N@10 0.0451 at 60 against 0.0720 / 0.0441 without it)
PRESET_DEFAULTS = {"causal": {"ema": 0.999}}
# The default's members (generator.models.ensemble: models trained side by side, an item scoring the sum of their
# log-likelihoods) follow the run's time budget: one per MEMBER_MINUTES of it up to MAX_AUTO_MEMBERS (reached at 30
# minutes), then, from LONG_MINUTES on, one per LONG_MEMBER_MINUTES, at most MAX_LONG_MEMBERS; one without a time
# budget. The default alone reaches its test plateau in ~15 CPU-minutes on Beauty, so a longer budget buys more
# members rather than longer ones. At every budget measured the best member count was this rule's (study.md, beam
# R@10: 8 minutes 0.0698 with one against 0.0678 with two; 15: 0.0767 with two against 0.0725 with one and 0.0670
# with four; 30: 0.0799 with four against 0.0783 and 0.0723; 60: 0.0820 with four against 0.0784 and 0.0733; 120:
# eight (two 60-minute runs combined, members8.md) 0.0837 against four resumed to 90 minutes 0.0812; twelve at 180
# added nothing to the beam once distilled, 0.0850 against eight's 0.0854). `--model-option members=K` sets it; a
# resumed run keeps the count it was trained with, whatever the budget it is resumed to.
MEMBER_MINUTES = 7.5
MAX_AUTO_MEMBERS = 4
LONG_MINUTES = 60
LONG_MEMBER_MINUTES = 15
MAX_LONG_MEMBERS = 8
AUTO_MEMBERS = ("causal",)  # the presets whose members follow the budget
# what --model-option may set (the rest come from the options and the data)
OPTION_KEYS = tuple(sorted(set(CausalConfig.__dataclass_fields__) - {"max_history", "dense_dim", "content_dim"}))


def check_options(options: Any) -> None:
    refuse_title_fields(options)
    refuse_workers(options)
    set_ = lambda name, value: object.__setattr__(options, name, value)  # noqa: E731 (a frozen dataclass)
    if options.user_tokens:
        raise ValueError(f"`user_tokens` must be 0 with the causal preset {options.preset!r} (it has no user token), got {options.user_tokens}")
    if options.dense not in (None, "id", "both"):
        raise ValueError(f"`dense` must be 'none', 'id' or 'both' with the causal preset {options.preset!r}, got {options.dense!r}")
    if options.dense is None and options.objective == "dense":
        raise ValueError("`objective` 'dense' needs a dense head: pass `dense` 'id' or 'both'")
    if options.dense is None:
        set_("objective", "generative")  # what "joint" means without a head
    allowed = ("dense",) if options.objective == "dense" and options.dense else ("beam", "exact", "dense") if options.dense else ("beam", "exact")
    if options.decoder == "auto":
        set_("decoder", allowed[0])
    if options.decoder not in allowed:
        raise ValueError(f"`decoder` must be one of {list(allowed)} for this causal run (objective {options.objective!r}), got {options.decoder!r}")
    if options.dense_options:
        raise ValueError(f"`dense_options` are for the T5 design's dense head; the causal design takes none, got {options.dense_options!r}")
    unknown = sorted(set(options.model_options or {}) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown `model_options` {unknown}; known: {sorted(OPTION_KEYS)}")
    if causal_config(options).sparse_tables and (options.devices > 1 or options.strategy != "auto"):  # also validates
        raise ValueError(f"`sparse_tables` trains on one process: DDP's reducer expects dense gradients for the item and "
                         f"node tables; drop it, or train with devices 1 and strategy auto (got devices {options.devices}, "
                         f"strategy {options.strategy!r})")


def auto_members(options: Any) -> int:
    """The default's member count for a run's time budget (``max_cpu_time``, else ``max_time``): one per
    :data:`MEMBER_MINUTES`, 1 to :data:`MAX_AUTO_MEMBERS`; beyond :data:`LONG_MINUTES`, one per
    :data:`LONG_MEMBER_MINUTES`, at most :data:`MAX_LONG_MEMBERS`; 1 without a time budget."""
    budget = parse_max_time(options.max_cpu_time, "max_cpu_time") or parse_max_time(options.max_time, "max_time")
    if budget is None:
        return 1
    minutes = budget.total_seconds() / 60
    short = max(1, min(MAX_AUTO_MEMBERS, int(minutes // MEMBER_MINUTES)))
    return max(short, min(MAX_LONG_MEMBERS, int(minutes // LONG_MEMBER_MINUTES))) if minutes > LONG_MINUTES else short


def causal_config(options: Any, content_dim: int = 0, resumed_members: int | None = None) -> CausalConfig:
    """The causal model config a run trains: the preset under ``model_options``, ``max_history`` from the options.

    The ID input is tied to the dense head's table, so the table follows ``d_model`` when the input uses it; without
    a dense head (``dense`` "none") the preset's ID input and distillation are off, and asking for them is an error.
    """
    given = options.model_options or {}
    preset = PRESETS[options.preset]
    if options.preset in AUTO_MEMBERS and "members" not in given:  # a resumed run keeps its own (a budget changes it not)
        preset = replace(preset, members=resumed_members or auto_members(options))
    if not options.dense:
        asked = [k for k in ("id_input", "distill") if given.get(k)]
        if asked:
            raise ValueError(f"`model_options` {asked} need the dense head; drop them or pass `dense` 'id' or 'both'")
        # no dense head: no dense loss either (the preset's sampled one would ask for the targets' log Q)
        return replace(preset, **{**given, "max_history": options.max_history, "dense_dim": 0, "id_input": False,
                                  "distill": 0.0, "content_dim": content_dim, "dense_loss": "full"})
    # the tied table follows the width in the same step (a width alone in `model_options` must not trip the tie check)
    id_input, d_model = given.get("id_input", preset.id_input), given.get("d_model", preset.d_model)
    dense_dim = d_model if id_input else preset.dense_dim
    return replace(preset, **{**given, "max_history": options.max_history, "dense_dim": dense_dim, "content_dim": content_dim})


def build(config: CausalConfig, layout: Any, state: dict[str, torch.Tensor], path: Any,
          ids: Any) -> CausalGenerator | EnsembleGenerator:
    """The model a checkpoint's config describes, every tensor checked against it first (an ensemble's members each
    as a causal model of their own, under ``members.<k>.``)."""
    if config.members == 1:
        checks.check_causal(config, layout, state, path, ids)
        content = state["content"][1:] if config.content_dim else None
        model = CausalGenerator(config, layout, state["item_tokens"][1:], content)
        checks.check_tree_tables(model, state, path)
        return model
    parts = checks.member_states(state, config.members, path)
    one = replace(config, members=1)
    first = parts[0]
    for k, part in enumerate(parts):  # loop over members: each a causal checkpoint of its own, one catalogue for all
        checks.check_causal(one, layout, part, path, ids)
        for name in ("item_tokens", "content") if config.content_dim else ("item_tokens",):
            if not torch.equal(part[name], first[name]):
                raise ValueError(f"{path}: tensor `members.{k}.{name}` differs from member 0's (an ensemble's members "
                                 f"share one catalogue); {checks.DAMAGED}")
    model = EnsembleGenerator(config, layout, first["item_tokens"][1:], first["content"][1:] if config.content_dim else None)
    for member, part in zip(model.members, parts, strict=True):
        checks.check_tree_tables(member, part, path)
    return model


# ---- featurisation: one position per history item (item rows + 1) ----------------------------------------------
def split_batches(run: Any, split: Split, which: str, rows: np.ndarray, batch_size: int) -> list[Labelled]:
    hist, targets = causal_data.split_histories(split, which, rows)
    order = causal_data.eval_order(hist, run.max_history)
    return [Labelled(Histories(b.histories, positions(b.lengths, b.histories.shape[1])), b.targets, order[lo : lo + batch_size])
            for lo, b in zip(range(0, len(order), batch_size),
                             causal_data.eval_batches(hist, targets, run.ids, run.max_history, batch_size), strict=True)]


def history_batches(run: Any, histories: list[np.ndarray], user_ids: np.ndarray | None, batch_size: int) -> list[Histories]:
    out = []
    for lo in range(0, len(histories), batch_size):  # loop over batches of histories
        part: Sequence[np.ndarray] = histories[lo : lo + batch_size]
        b = causal_data.history_batch(part, np.full(len(part), -1), run.ids, run.max_history)
        out.append(Histories(b.histories, positions(b.lengths, b.histories.shape[1])))
    return out


def setup(t: TrainInputs) -> Setup:
    from generator.models.dense_loss import log_popularity
    from generator.training.causal_system import CausalSystem, monitor_name
    from generator.training.datamodules import CausalDataModule

    options, ids = t.options, t.ids
    content = None
    if options.dense == "both":
        if int(ids.item_ids.max()) > t.dataset.num_items:
            raise ValueError(f"the semantic IDs have items above {t.dataset.num_items}, the dataset's last: no content for them")
        content = torch.from_numpy(t.dataset.embeddings(options.dense_embeddings)[ids.item_ids - 1]).float()
    config = causal_config(options, 0 if content is None else int(content.shape[1]), t.resumed_members)
    dm = CausalDataModule(t.split, ids, max_history=options.max_history, batch_size=options.batch_size,
                          eval_batch_size=options.eval_batch_size, val_users=options.val_users, seed=options.seed)
    item_tokens = torch.as_tensor(np.asarray(t.layout.codes_to_tokens(ids.codes)), dtype=torch.long)
    log_q = None
    if config.dense_dim and config.dense_loss == "sampled":
        targets = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in t.split.train])  # every training target
        log_q = log_popularity(torch.from_numpy(ids.rows_of(targets)), len(ids.item_ids))
    system = CausalSystem(config, t.layout, item_tokens, torch.from_numpy(ids.item_ids), t.digest, t.tree, content=content,
                          optim=options.optim(), objective=options.objective, serve=options.decoder, num_beams=options.num_beams,
                          log_q=log_q)
    return Setup(config, dm, system, monitor_name(options.decoder))


CAUSAL = Design(DESIGN, CausalConfig, "ids", PRESETS, DEFAULTS, check_options, build, split_batches, history_batches, setup,
                served=("beam", "exact", "dense", "hybrid", "cold-beam"), option_keys=OPTION_KEYS, preset_defaults=PRESET_DEFAULTS,
                maps_weights=True)
