"""Mutation audit, round 5: gaps found by planting bugs in the dense head, title config, the T5 plug-in and `semid serve`."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from generator.models.dense import DenseHead, DenseHeadConfig
from tests.test_dense_decoders import world  # noqa: F401 (a fixture)


def test_id_dropout_of_one_is_refused() -> None:  # 1.0 would zero every table row while training
    with pytest.raises(ValueError, match=r"`id_dropout` must be in \[0, 1\)"):
        DenseHeadConfig(input_dim=4, id_dropout=1.0)


def test_dense_head_refuses_duplicate_item_ids() -> None:
    config = DenseHeadConfig(input_dim=4, dim=4, mode="id")
    with pytest.raises(ValueError, match="strictly ascending"):
        DenseHead(config, torch.tensor([1, 2, 2, 3]))


def test_dense_head_refuses_non_finite_content() -> None:
    content = torch.randn(3, 5)
    content[1, 2] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        DenseHead(DenseHeadConfig(input_dim=4, dim=4, mode="content"), torch.tensor([1, 2, 3]), content)


def test_title_tokenizer_vocab_below_260_is_refused() -> None:
    from generator.models.titles import TitleConfig

    with pytest.raises(ValueError, match="at least 260"):
        TitleConfig(tokenizer_vocab=258)


def test_t5_hybrid_on_a_catalogue_smaller_than_its_default_candidates(world) -> None:  # noqa: F811
    from generator.decoding import registry
    from generator.decoding.protocol import Histories
    from generator.decoding.registry import Ingredients
    from semid.tree import PrefixTree

    model, ids, layout, head, x, mask = world  # 12 items, Ingredients' default num_candidates is 50
    ing = Ingredients("t5", model, PrefixTree.from_semantic_ids(ids, layout), layout, ids, num_beams=4,
                      dense_head=head, fusion=("blend", {"alpha": 0.5}))
    res = registry.build(ing, "hybrid")(Histories(x, mask.bool()), 5)
    assert res.items.shape == (3, 5) and bool((res.items > 0).all())


def test_t5_validation_recall_counts_a_miss_as_a_miss(world) -> None:  # noqa: F811
    from generator.models.checkpoint import ids_digest
    from generator.t5.data import Batch
    from generator.t5.model import GeneratorConfig
    from generator.t5.system import GeneratorSystem
    from semid.tree import PrefixTree

    _, ids, layout, head, x, mask = world
    config = GeneratorConfig(num_encoder_layers=1, num_decoder_layers=1, d_model=16, num_heads=2, d_kv=8, d_ff=32, dropout=0.0)
    system = GeneratorSystem(config, layout, ids_digest(ids), PrefixTree.from_semantic_ids(ids, layout), num_beams=12,
                             decoder="beam", ids=ids).eval()
    system.on_validation_epoch_start()
    from generator.decoding.protocol import Histories
    top = system._decoder(Histories(x, mask.bool()), 10).items
    target = torch.tensor([next(int(i) for i in ids.item_ids if i not in row.tolist()) for row in top])  # all misses
    labels = torch.cat([torch.from_numpy(np.asarray(layout.codes_to_tokens(ids.codes_of(target.numpy())))),
                        torch.full((3, 1), layout.eos_token_id)], 1)
    with torch.no_grad():
        system.validation_step(Batch(x, mask, labels, target), 0)
    assert system._val_sums[:4].tolist() == [0.0, 0.0, 0.0, 0.0] and system._val_sums[-2] == 3  # recall@5,10, ndcg@5,10


def test_dense_setup_log_q_counts_exactly_the_training_targets(tmp_path: Path) -> None:
    from generator.models.dense_loss import log_popularity
    from generator.t5.system import dense_setup
    from semid.data import load_dataset
    from semid.split import leave_one_out
    from tests.conftest import write_canonical
    from tests.test_generator_helpers import random_ids

    ids = random_ids(num_items=20)
    sequences = {u: [1 + (3 * u + j) % 20 for j in range(3 + u % 4)] for u in range(1, 9)}
    dataset = load_dataset(write_canonical(tmp_path / "d", [(f"i{i}", []) for i in range(1, 21)], sequences))
    split = leave_one_out(dataset)
    dense = dense_setup("id", "joint", dataset, split, ids, 8, options={"loss": "sampled"})
    targets = torch.from_numpy(np.concatenate([s[1:] for s in split.train]))
    torch.testing.assert_close(dense.log_q, log_popularity(dense.head.rows_of(targets), dense.head.num_items))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_passes_max_body_bytes_to_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from generator.runs.recommender import Recommender
    from generator.serving import app, holder
    from semid_cli import main

    rec = SimpleNamespace(version="v", decoders={"beam": None}, resolve=lambda name: "beam")
    seen: dict = {}
    monkeypatch.setattr(Recommender, "from_run", classmethod(lambda cls, *a, **k: rec))
    monkeypatch.setattr(holder, "Holder", lambda load, run, served, pinned: SimpleNamespace(current=SimpleNamespace(rec=rec)))
    monkeypatch.setattr(holder.Served, "build", staticmethod(lambda r: None))
    monkeypatch.setattr(holder, "settle_heap", lambda: None)
    monkeypatch.setattr(app, "create_app", lambda h, **k: seen.update(k))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", "--run", str(tmp_path), "--port", str(_free_port()), "--max-body-bytes", "1234"]) == 0
    assert seen["limits"].max_body_bytes == 1234


def test_serve_refuses_watching_a_pinned_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from semid_cli import main

    assert main(["serve", "--run", str(tmp_path), "--watch-seconds", "5", "--expect-sha256", "0" * 64]) == 2
    assert "cannot reload a pinned run" in capsys.readouterr().err
