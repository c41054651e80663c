"""Training/evaluation examples: against a plain-loop reference, no leakage of held-out targets, batching."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from generator.t5.data import collate, eval_batches, history_examples, split_examples, training_examples
from generator.training.sampling import BucketBatchSampler, padding_stats, sample_users
from semid.data import load_dataset
from semid.layout import TokenLayout
from semid.split import leave_one_out
from tests.conftest import write_canonical
from tests.test_generator_helpers import random_ids, write_random_dataset

IDS = random_ids()
LAYOUT = IDS.layout(num_user_tokens=16)


def reference_examples(sequences, user_ids, layout: TokenLayout, max_history: int, use_user: bool):
    """One (input tokens, labels) per position t >= 1, written as plainly as possible."""
    out = []
    for seq, user in zip(sequences, user_ids, strict=True):
        for t in range(1, len(seq)):
            hist = seq[max(0, t - max_history) : t]
            tokens = [int(layout.user_tokens(np.array([user]))[0])] if use_user else []
            for item in hist:
                tokens += np.asarray(layout.codes_to_tokens(IDS.codes_of(np.array([item]))))[0].tolist()
            label = np.asarray(layout.codes_to_tokens(IDS.codes_of(np.array([seq[t]]))))[0].tolist() + [layout.eos_token_id]
            out.append((tokens, label, int(seq[t])))
    return out


def unpad(batch) -> list[tuple[list[int], list[int], int]]:
    rows = []
    for ids, mask, labels, target in zip(batch.input_ids, batch.attention_mask, batch.labels, batch.target, strict=True):
        rows.append((ids[mask.bool()].tolist(), labels.tolist(), int(target)))
    return rows


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    max_history=st.integers(1, 4),
    use_user=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_training_examples_match_reference(lengths: list[int], max_history: int, use_user: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, IDS.num_items + 1, size=n) for n in lengths]
    users = rng.integers(1, 10_000, size=len(sequences))
    ex = training_examples(sequences, users, IDS, LAYOUT, max_history=max_history, use_user_tokens=use_user)
    expected = reference_examples(sequences, users, LAYOUT, max_history, use_user)
    assert len(ex) == len(expected) == sum(n - 1 for n in lengths)
    if expected:
        got = unpad(collate(ex, torch.arange(len(ex)), LAYOUT.pad_token_id))
        assert got == expected
        assert (ex.input_lengths == [len(e[0]) for e in expected]).all()


def test_batches_are_right_padded_and_mix_rows_with_and_without_user_token() -> None:
    hists = [np.array([1, 2, 3]), np.array([4])]
    ex = history_examples(hists, np.array([5, -1]), None, IDS, LAYOUT, max_history=2)
    b = collate(ex, [0, 1], LAYOUT.pad_token_id)
    L = LAYOUT.num_levels
    assert b.input_ids.shape == (2, 2 * L)  # last 2 items of the first history
    assert b.attention_mask.tolist() == [[1] * 2 * L, [1] * L + [0] * L]
    assert (b.input_ids[1, L:] == LAYOUT.pad_token_id).all()
    assert b.labels[1].tolist() == [-100] * (L + 1)  # unknown target: nothing to learn from
    assert b.labels[0, -1] == LAYOUT.eos_token_id
    # rows with a user token next to rows without one (anonymous requests) stay left-aligned
    ex_u = history_examples(hists, np.array([5, 6]), np.array([7, 8]), IDS, LAYOUT)
    ex_mixed = dataclasses.replace(ex_u, user=torch.tensor([ex_u.user[0].item(), -1]))
    b = collate(ex_mixed, [0, 1], LAYOUT.pad_token_id)
    assert b.attention_mask.tolist() == [[1] * (1 + 3 * L), [1] * L + [0] * (1 + 2 * L)]
    assert b.input_ids[1, :L].tolist() == np.asarray(LAYOUT.codes_to_tokens(IDS.codes_of(np.array([4]))))[0].tolist()


def test_the_datamodule_and_dense_setup_train_on_the_training_prefixes_only(tmp_path: Path) -> None:
    # as above: items 31..40 appear only as validation targets, 41..50 only as test targets
    from generator.t5.datamodule import GeneratorDataModule
    from generator.t5.system import dense_setup

    ids = random_ids(num_items=50)
    layout = ids.layout(16)
    sequences = {u: [1 + (u + j) % 30 for j in range(2 + u % 5)] + [30 + u, 40 + u] for u in range(1, 11)}
    folder = write_canonical(tmp_path / "d", [(f"i{i}", []) for i in range(1, 51)], sequences)
    dataset = load_dataset(folder)
    split = leave_one_out(dataset)
    held_out = np.arange(31, 51)
    dm = GeneratorDataModule(split, ids, layout, batch_size=4, val_users=None)
    dm.setup("fit")
    ex = dm.train_examples
    assert ex is not None and len(ex) == sum(len(t) - 1 for t in split.train)  # one per training-prefix position
    assert not set(ex.target.tolist()) & set(held_out.tolist())
    assert sorted(ex.target.tolist()) == sorted(np.concatenate([t[1:] for t in split.train]).tolist())
    assert dm.val_examples is not None and sorted(dm.val_examples.target.tolist()) == list(range(31, 41))
    # the sampled-softmax popularity correction counts training targets only: held-out items get the floor
    dense = dense_setup("id", "joint", dataset, split, ids, 8, options={"loss": "sampled"})
    assert dense.log_q is not None and dense.head is not None
    floor = float(dense.log_q.min())
    held = dense.log_q[dense.head.rows_of(torch.from_numpy(held_out))]
    assert torch.all(held == floor)
    trained_rows = dense.head.rows_of(torch.from_numpy(np.concatenate([t[1:] for t in split.train])))
    assert torch.all(dense.log_q[trained_rows] > floor)


def test_no_validation_or_test_target_leaks_into_training(tmp_path: Path) -> None:
    # items 31..40 appear only as validation targets, 41..50 only as test targets
    ids = random_ids(num_items=50)
    layout = ids.layout(16)
    sequences = {u: [1 + (u + j) % 30 for j in range(2 + u % 5)] + [30 + u, 40 + u] for u in range(1, 11)}
    folder = write_canonical(tmp_path / "d", [(f"i{i}", []) for i in range(1, 51)], sequences)
    split = leave_one_out(load_dataset(folder))
    held_out = set(range(31, 51))
    ex = training_examples(split.train, split.user_ids, ids, layout)
    b = collate(ex, torch.arange(len(ex)), layout.pad_token_id)
    held_tokens = np.asarray(layout.codes_to_tokens(ids.codes_of(np.array(sorted(held_out)))))
    # a held-out item is only identified by its full code tuple: check targets and every history item
    assert not set(b.target.tolist()) & held_out
    hist_items = {int(i) for s, e in zip(ex.start.tolist(), ex.stop.tolist(), strict=True) for i in np.concatenate(split.train)[s:e]}
    assert not hist_items & held_out
    assert not any((ex.tokens == torch.from_numpy(t)).all(1).any() for t in held_tokens)
    # validation examples see the training prefix only; test examples add the validation item, never the test one
    valid = split_examples(split, ids, layout, "valid", use_user_tokens=False)
    test = split_examples(split, ids, layout, "test", use_user_tokens=False)
    assert valid.target.tolist() == list(range(31, 41)) and test.target.tolist() == list(range(41, 51))
    vb, tb = collate(valid, torch.arange(10), 0), collate(test, torch.arange(10), 0)
    for i in range(10):
        assert vb.attention_mask[i].sum() == len(split.train[i]) * layout.num_levels
        assert tb.attention_mask[i].sum() == (len(split.train[i]) + 1) * layout.num_levels
        last_test_item = tb.input_ids[i, tb.attention_mask[i].bool()][-layout.num_levels :]
        assert last_test_item.tolist() == np.asarray(layout.codes_to_tokens(ids.codes_of(np.array([30 + i + 1]))))[0].tolist()


def test_history_examples_errors() -> None:
    with pytest.raises(ValueError, match="history 1 is empty"):
        history_examples([np.array([1]), np.array([], dtype=np.int64)], np.array([1, 2]), None, IDS, LAYOUT)
    with pytest.raises(ValueError, match="unknown item id 999"):
        history_examples([np.array([999])], np.array([1]), None, IDS, LAYOUT)
    with pytest.raises(ValueError, match="`max_history` must be a positive int"):
        training_examples([np.array([1, 2])], np.array([1]), IDS, LAYOUT, max_history=0)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_bucket_sampler_covers_every_example_once_per_epoch(replicas: int) -> None:
    lengths = np.random.default_rng(0).integers(1, 80, size=1003)
    samplers = [BucketBatchSampler(lengths, 16, bucket_batches=5, num_replicas=replicas, rank=r, seed=1) for r in range(replicas)]
    served = [list(s) for s in samplers]
    assert len({len(s) for s in served}) == 1 and len(served[0]) == len(samplers[0])  # equal steps per process
    flat = [i for batches in served for b in batches for i in b]
    assert set(flat) == set(range(1003))
    assert len(flat) - 1003 < replicas * 16  # only the wrap-around to even out processes repeats examples
    first = samplers[0].batches()
    samplers[0].sampler.set_epoch(1)
    assert [b.tolist() for b in samplers[0].batches()] != [b.tolist() for b in first]  # a new order each epoch
    bucketed = padding_stats(lengths, first).padded_share
    random = padding_stats(lengths, BucketBatchSampler(lengths, 16, bucket_batches=1).batches()).padded_share
    assert bucketed < random / 2


def test_eval_batches_and_user_sample() -> None:
    lengths = np.array([5, 1, 3, 9, 2])
    shards = [eval_batches(lengths, 2, r, 2) for r in range(2)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(5))
    assert sample_users(10, None, 0).tolist() == list(range(10))
    s = sample_users(100, 7, 3)
    assert len(set(s.tolist())) == 7 and (np.diff(s) > 0).all() and (s == sample_users(100, 7, 3)).all()


def test_datamodule_counts_on_a_small_dataset(tmp_path: Path) -> None:
    split = leave_one_out(load_dataset(write_random_dataset(tmp_path / "d")))
    ex = training_examples(split.train, split.user_ids, IDS, LAYOUT)
    assert len(ex) == sum(len(s) - 1 for s in split.train)


@pytest.mark.realdata
def test_beauty_examples_build_in_seconds(beauty_dir: Path) -> None:
    split = leave_one_out(load_dataset(beauty_dir))
    ids = random_ids(num_items=12101, sizes=(256, 256, 256))
    layout = ids.layout(2000)
    start = time.perf_counter()
    ex = training_examples(split.train, split.user_ids, ids, layout)
    assert time.perf_counter() - start < 10
    assert len(ex) == sum(len(s) - 1 for s in split.train) == 131_413
    assert (ex.stop - ex.start).max() == 20
    sampler = BucketBatchSampler(ex.input_lengths, 256)
    assert padding_stats(ex.input_lengths, sampler.batches()).padded_share < 0.05
