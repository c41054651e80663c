"""Mutation audit, round 4: tests for the mutants no earlier test killed (each fails with its mutant and passes
without it): a checkpoint's token table one past a level, the IDs' digest without item ids, a title run's backbone
and tokenizer, its training targets, validation Recall@k, a prefix tree's vocabulary bound, validation beams on a
small catalogue, and options a training or `semid choose-fusion` took and ignored."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from generator.models import checkpoint_checks as checks
from semid.layout import TokenLayout
from tests.test_generator_helpers import write_ids, write_random_dataset


# M02: a token one past a level's block (the next level's first token) is outside the level
def test_item_tokens_one_past_a_level_block_is_refused() -> None:
    layout = TokenLayout((4, 4, 2), num_user_tokens=0)
    rows = torch.tensor([[layout.level_range(level)[0] + 1 for level in range(3)]] * 2)
    table = torch.cat([torch.full((1, 3), layout.pad_token_id), rows]).long()
    assert checks.check_item_tokens(table, layout, "x.ckpt", None).shape == (2, 3)
    table[2, 0] = layout.level_range(0)[1]  # level 1's first token in level 0's column
    with pytest.raises(ValueError, match=r"item_tokens\[2, 0\]` is \d+, outside level 0's tokens"):
        checks.check_item_tokens(table, layout, "x.ckpt", None)


# M06: the IDs' digest covers which item ids the code rows belong to
def test_ids_digest_covers_the_item_ids() -> None:
    from generator.models.checkpoint import ids_digest
    from semid.ids import SemanticIDs

    codes = np.array([[0, 1, 0], [1, 0, 0], [1, 1, 0]])
    assert ids_digest(SemanticIDs(codes, np.array([1, 2, 3]), (2, 2, 1))) != \
        ids_digest(SemanticIDs(codes, np.array([1, 2, 4]), (2, 2, 1)))


# M13: a run tokenizer with more tokens than the checkpoint's title vocabulary is not the one it was trained with
def test_a_title_run_refuses_a_tokenizer_larger_than_its_vocabulary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from generator.designs import title
    from generator.models.titles import TitleConfig

    fake = SimpleNamespace(pad_id=0, eos_id=1, vocab_size=500)
    monkeypatch.setattr(title.TitleTokenizer, "load", classmethod(lambda cls, folder: fake))
    with pytest.raises(ValueError, match="is not the one best.ckpt was trained with"):
        title.extras(tmp_path, None, TitleConfig(vocab_size=400, pad_id=0, eos_id=1), None, None, tmp_path / "best.ckpt")


@pytest.fixture(scope="module")
def title_setup(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from generator.designs.base import TrainInputs
    from generator.models.checkpoint import ids_digest
    from generator.runs.options import TrainOptions
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out
    from semid.tree import PrefixTree

    root = tmp_path_factory.mktemp("title_setup")
    dataset = load_dataset(write_random_dataset(root / "data"))
    ids = SemanticIDs.load(write_ids(root / "ids.npz"))
    options = TrainOptions(target="title", model_options={"tokenizer_vocab": 300})
    layout = ids.layout(0)
    return options.plugin.setup(TrainInputs(options, dataset, leave_one_out(dataset), ids, layout, ids_digest(ids),
                                            PrefixTree.from_semantic_ids(ids, layout), root))


# M11: a title run on the default preset keeps the width-64 backbone it was measured with (causal-64's), not the
# default's width 128 (whose sampled dense head a title run lacks)
def test_a_title_run_on_the_default_preset_trains_the_width_64_backbone(title_setup) -> None:  # noqa: ANN001
    config = title_setup.config
    assert (config.d_model, config.num_heads, config.d_ff, config.dropout) == (64, 2, 256, 0.3)


# M21: a title run trains on every target row, row 0 (the first item) included; -1 alone is "no target"
def test_a_title_run_trains_on_the_first_items_title_too(title_setup) -> None:  # noqa: ANN001
    system = title_setup.system.eval()
    system.log = lambda *a, **k: None
    histories, targets = torch.tensor([[3, 5, 0]]), torch.tensor([[0, 0, -1]])
    loss = system.training_step(SimpleNamespace(histories=histories, targets=targets), 0)
    with torch.no_grad():
        h = system.model.hidden(histories)
        want = system.model.title_nll(h[0, :2], targets[0, :2], system.optim.label_smoothing).mean()
    assert torch.allclose(loss.detach(), want)


# M20: validation Recall@k counts the hits ranked within k (rank k marks a miss); it selects the best checkpoint
def test_rank_sums_count_neither_a_hit_at_rank_k_nor_a_miss_as_within_k() -> None:
    from generator.training.causal_system import RankSums

    sums = RankSums(["beam"], (1, 2), torch.device("cpu"))
    sums.add("beam", torch.tensor([[5, 6], [7, 8]]), torch.tensor([6, 9]))  # user 0 at rank 1 (0-based), user 1 missed
    assert sums.sums["beam"][:2].tolist() == [0.0, 1.0]


# M25: a token equal to the vocabulary size is outside [0, V)
def test_a_prefix_tree_refuses_a_token_equal_to_the_vocabulary_size() -> None:
    from semid.tree import PrefixTree

    with pytest.raises(ValueError, match=r"token 5 at position 1, outside \[0, 5\)"):
        PrefixTree.from_sequences([[0, 5]], [0], vocab_size=5)


# M28: validation ranks min(10, N) items: fewer beams than 10 suit a catalogue of fewer than 10 items
def test_a_small_catalogue_takes_as_many_beams_as_items() -> None:
    from generator.runs.options import TrainOptions
    from generator.runs.train_checks import check_before_writing

    check_before_writing(TrainOptions(num_beams=6, accelerator="cpu"), "unused", 6)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from generator.runs.options import TrainOptions
    from generator.runs.train import train_run

    root = tmp_path_factory.mktemp("small_run")
    data, ids = write_random_dataset(root / "data"), write_ids(root / "ids.npz")
    options = TrainOptions(preset="causal-64", max_epochs=1, batch_size=8, num_beams=10, final_val_users=5,
                           progress=False, accelerator="cpu")
    return SimpleNamespace(run=root / "run", result=train_run(data, ids, root / "run", options))


# M31: `final_val_users` samples the final evaluation's users
def test_the_final_evaluation_takes_final_val_users(small_run: SimpleNamespace) -> None:
    assert small_run.result.metrics_valid["users_evaluated"] == 5


# M19: `semid choose-fusion --seed` seeds the user sample
def test_choose_fusion_passes_its_seed(small_run: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import generator.runs.decoders as decoders
    from semid_cli import main

    seen = {}
    monkeypatch.setattr(decoders, "choose_run_fusion", lambda *a, **k: seen.update(k) or {"fusion": "blend"})
    assert main(["choose-fusion", "--run", str(small_run.run), "--seed", "3"]) == 0
    assert seen["seed"] == 3


# M36: `val_users` samples the validation users the checkpoint is selected on
def test_the_causal_data_module_validates_on_val_users(tmp_path: Path) -> None:
    from generator.training.datamodules import CausalDataModule
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out

    split = leave_one_out(load_dataset(write_random_dataset(tmp_path / "data")))
    dm = CausalDataModule(split, SemanticIDs.load(write_ids(tmp_path / "ids.npz")), max_history=50, val_users=5)
    dm.setup("fit")
    assert sum(len(b.targets) for b in dm.val) == 5 < split.num_users


# M37: `seed` seeds the order of the training batches
def test_the_causal_data_modules_batches_follow_the_seed(tmp_path: Path) -> None:
    from generator.training.datamodules import CausalDataModule
    from semid.data import load_dataset
    from semid.ids import SemanticIDs
    from semid.split import leave_one_out

    split = leave_one_out(load_dataset(write_random_dataset(tmp_path / "data")))
    ids = SemanticIDs.load(write_ids(tmp_path / "ids.npz"))
    orders = []
    for seed in (0, 1):
        dm = CausalDataModule(split, ids, max_history=50, batch_size=4, seed=seed)
        dm.setup("fit")
        orders.append([list(map(int, b)) for b in dm.train_sampler().batches()])
    assert orders[0] != orders[1]


# M38: `semid prepare --kcore K` filters users and items with fewer than K interactions
def test_prepare_cli_applies_kcore(tmp_path: Path) -> None:
    from semid_cli import main

    rows = ["user,item,timestamp", "a,1,1", "a,2,2", "a,3,3", "b,1,4", "b,2,5", "c,9,6"]
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "data"
    assert main(["prepare", "--format", "csv", "--interactions", str(tmp_path / "inter.csv"), "--out", str(out),
                 "--kcore", "2"]) == 0
    assert len((out / "items.jsonl").read_text().splitlines()) == 2  # items 1 and 2; 3 and 9 had one interaction
