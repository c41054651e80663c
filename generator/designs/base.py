"""What a design registers (:class:`Design`), and what its parts take and give.

A design is a plug-in: the layers below it (models, decoding, training) know nothing of the others, and the run
layer above reads every design-specific thing through the design's entry (``generator.designs.registry``), never
by branching on its name. Featurisation is Lightning-free, so a run loaded to serve never imports Lightning; a
design's ``setup`` imports its Lightning system and data module when it is called (training only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from generator.decoding.protocol import Histories
from semid.ids import SemanticIDs
from semid.layout import TokenLayout
from semid.split import Split
from semid.tree import PrefixTree


class Labelled(NamedTuple):
    """One batch of evaluation users: their histories and held-out items (LongTensor (B,) item ids); ``rows``:
    where they are in the rows the batches were made from (int (B,); designs batch users in their own order)."""

    histories: Histories
    targets: torch.Tensor
    rows: np.ndarray | None = None


class Setup(NamedTuple):
    """What a design trains with: the model config, the Lightning data module and system, and the metric that
    selects the best checkpoint."""

    config: Any
    datamodule: Any
    system: Any
    monitor: str


class TrainInputs(NamedTuple):
    """What ``generator.runs.train`` hands a design's ``setup``."""

    options: Any  # generator.runs.options.TrainOptions
    dataset: Any  # semid.data.Dataset
    split: Split
    ids: SemanticIDs
    layout: TokenLayout
    digest: str  # the IDs' digest (generator.models.checkpoint.ids_digest)
    tree: PrefixTree
    out: Path  # the run folder
    resumed_members: int | None = None  # a resumed run's member count (config.yaml's model): what its model keeps


class Extras(NamedTuple):
    """What a loaded run of a design holds beside its model: the tree its decoders walk, and a title run's tokenizer."""

    tree: Any
    tokenizer: Any = None


def item_tree(run_dir: Path, model: torch.nn.Module, config: Any, ids: SemanticIDs, layout: TokenLayout, ckpt: Path) -> Extras:
    """The semantic-ID designs' extras: the prefix tree of the items' IDs."""
    return Extras(PrefixTree.from_semantic_ids(ids, layout))


@dataclass(frozen=True)
class Design:
    """One design, registered once.

    name: the run's ``design`` (config.yaml, ``Run.design``, the decoder registry's backbone). config: the model
    config class (``from_dict``, ``to_dict``). target: what it emits ("ids" or "title", ``TrainOptions.target``).
    presets: model configs by preset name. defaults: what ``TrainOptions`` fields left at None take;
    preset_defaults: per preset, over those. check_options(options): the design's checks of a ``TrainOptions``
    (it may complete the frozen options). build(config, layout, state, path, ids): the checkpoint's model, its state
    checked against its config first (errors name ``path``). extras(run_dir, model, config, ids, layout, ckpt): the
    rest of a loaded run. split_batches(run, split, which, rows, batch_size) -> [Labelled] and
    history_batches(run, histories, user_ids, batch_size) -> [Histories]: the featurisation. setup(TrainInputs) ->
    Setup: training (imports Lightning). served: the decoders a ``Recommender`` builds by default. backbone: the
    design config.yaml records for it, where not ``name``. dense_head(run): for a design that keeps its dense head
    beside the model (T5: in the checkpoint), the loaded run's head on the model's device, or a ValueError naming the
    run where it has none; None where the model holds its own head or has none.
    """

    name: str
    config: type
    target: str
    presets: Mapping[str, Any]
    defaults: Mapping[str, Any]
    check_options: Callable[[Any], None]
    build: Callable[..., torch.nn.Module]
    split_batches: Callable[..., list[Labelled]]
    history_batches: Callable[..., list[Histories]]
    setup: Callable[[TrainInputs], Setup]
    served: tuple[str, ...]
    extras: Callable[..., Extras] = item_tree
    preset_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    option_keys: tuple[str, ...] = ()  # what `--model-option KEY=VALUE` may set
    backbone: str | None = None  # what config.yaml's `design` records, where not ``name`` (a title run: causal)
    dense_head: Callable[[Any], Any] | None = None  # the dense head kept beside the model, loaded from a run
    maps_weights: bool = False  # its models take a memory-mapped checkpoint's tensors as they are (no tied weights;
    # N-row tables made on the meta device inside generator.models.dense.deferred_tables): load_checkpoint(mmap=True)

    def defaults_for(self, preset: str) -> dict[str, Any]:
        return {**self.defaults, **self.preset_defaults.get(preset, {})}


def refuse_title_fields(options: Any) -> None:
    """The semantic-ID designs take no title tokenizer or encoder."""
    if options.tokenizer is not None or options.encoder is not None:
        raise ValueError("`tokenizer` and `encoder` are for `target` 'title'")


def refuse_workers(options: Any) -> None:
    """The causal backbone's designs assemble their batches in the training process: no DataLoader workers."""
    if options.num_workers:
        raise ValueError(f"`num_workers` is for the T5 presets' data loader (tiger, cpu, item-t5): preset "
                         f"{options.preset!r} assembles its batches in the training process; leave it 0, got "
                         f"{options.num_workers!r}")


def positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < lengths[:, None]  # (B, S) True at real positions

