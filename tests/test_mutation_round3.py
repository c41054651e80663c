"""Assertions a third mutation audit found missing: each fails on one planted bug that the rest of the suite let
through (ids in the comments: the audit's mutant ids; December 2026, 57 planted, 20 survived)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from generator.decoding.protocol import LOG_LIKELIHOOD, Ranking, check_alpha
from generator.runs.folder import CHECKPOINT_DIR, IDS_FILE, best_checkpoint, load_run
from generator.runs.out_folder import (
    EARLY_ENTRIES,
    check_train_out,
    foreign_entries,
    replace_refusal,
    resume_point,
)
from generator.runs.pinning import combined_digest, run_digests
from generator.runs.recommender import Recommender
from generator.serving.holder import Holder, Served
from generator.serving.requests import ApiError, Limits
from generator.t5.step import score_codes
from generator.training import distill
from generator.training.distill_options import DistillOptions
from generator.training.optim import OptimConfig, adamw_schedule, parse_max_time
from rqvae._checks import standardization
from semid.codebooks import CODEBOOK_FILES, STATS_FILE, check_codebooks, write_codebooks_folder
from semid.data import load_dataset
from semid.safe_read import read_npy
from semid.split import leave_one_out
from semid.titles import META_FILE, TitleTokenizer
from semid.tree import PrefixTree
from semid_cli import main
from tests.serve_helpers import app_for
from tests.test_causal import CFG, make
from tests.test_dense_decoders import world  # noqa: F401 (the fixture: a tiny T5, its IDs and histories)
from tests.test_generator_helpers import NUM_ITEMS, write_random_dataset


def test_a_history_of_exactly_max_history_items_is_served(serve_world: dict[str, Path]) -> None:  # M03
    with TestClient(app_for(serve_world["v1"], limits=Limits(max_history=30))) as c:
        r = c.post("/recommend", json={"history": [1] * 30})
        assert r.status_code == 200, r.text


def test_k_plus_the_excluded_history_may_fill_the_catalogue(serve_world: dict[str, Path]) -> None:  # M02
    with TestClient(app_for(serve_world["v1"])) as c:
        r = c.post("/recommend", json={"history": list(range(1, 11)), "k": NUM_ITEMS - 10})
        assert r.status_code == 200, r.text
        assert sorted(i["item_id"] for i in r.json()["items"]) == list(range(11, NUM_ITEMS + 1))


def test_a_pinned_reload_refuses_files_replaced_while_they_load(serve_world: dict[str, Path], tmp_path: Path) -> None:  # M05
    live = Path(shutil.copytree(serve_world["v1"], tmp_path / "live"))

    def swapping() -> Recommender:  # the checkpoint renamed over (same bytes, another file) once it was read
        rec = Recommender.from_run(live)
        ckpt = best_checkpoint(live)
        (live / "new.ckpt").write_bytes(ckpt.read_bytes())
        os.replace(live / "new.ckpt", ckpt)
        return rec

    holder = Holder(swapping, live, served=Served.build(Recommender.from_run(live)), pinned=True)
    before = holder.current
    with pytest.raises(ApiError, match="pinned files changed while they were checked and loaded") as e:
        asyncio.run(holder.reload(combined_digest(run_digests(live))))
    assert e.value.status == 500 and holder.current is before


def test_semid_serve_pinned_at_start_keeps_reloads_pinned(serve_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:  # M56
    import uvicorn

    apps: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setattr("generator.serving.holder.settle_heap", lambda: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    digest = combined_digest(run_digests(serve_world["v1"]))
    assert main(["serve", "--run", str(serve_world["v1"]), "--expect-sha256", digest, "--port", str(port)]) == 0
    assert apps[0].state.holder.pinned is True  # a reload without the new version's digest is refused (409)


def test_evaluate_refuses_a_decoder_that_returns_an_item_twice_apart(serve_world: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # M14
    import generator.runs.evaluate as ev

    class Repeating:  # item 1 at ranks 1 and 3: valid items, one of them twice (not side by side)
        name, score, leaves, num_beams = "beam", LOG_LIKELIHOOD, True, 10

        def __call__(self, histories, k: int) -> Ranking:  # noqa: ANN001
            items = torch.tensor([1, 2, 1, 3, 4, 5, 6, 7, 8, 9][:k]).expand(histories.tokens.shape[0], k)
            return Ranking(items, torch.zeros(items.shape), torch.zeros(*items.shape, 1, dtype=torch.long), LOG_LIKELIHOOD, True)

    monkeypatch.setattr(ev, "decoders_for", lambda run, names, **kw: {n: Repeating() for n in names})
    run = load_run(serve_world["v1"])
    split = leave_one_out(load_dataset(run.data_dir))
    with pytest.raises(ev.DecoderError, match="duplicate"):
        ev.evaluate(run, split, "test", ks=(5,), num_beams=10)


def test_resume_continues_from_the_point_with_the_most_steps(tmp_path: Path) -> None:  # M18
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    torch.save({"global_step": 12, "state_dict": {}}, ckpt_dir / "resume.ckpt")
    torch.save({"global_step": 8, "state_dict": {}}, ckpt_dir / "last.ckpt")
    assert resume_point(ckpt_dir) == ckpt_dir / "resume.ckpt"
    torch.save({"global_step": 20, "state_dict": {}}, ckpt_dir / "last.ckpt")
    assert resume_point(ckpt_dir) == ckpt_dir / "last.ckpt"


def test_a_symlink_with_a_run_entrys_name_is_foreign(tmp_path: Path) -> None:  # M19
    victim, out = tmp_path / "victim", tmp_path / "out"
    victim.mkdir()
    out.mkdir()
    (out / "tokenizer").symlink_to(victim)  # a title run's tokenizer would be written into someone's folder
    assert foreign_entries(out, EARLY_ENTRIES) == ["tokenizer/"]
    with pytest.raises(FileExistsError, match="tokenizer/"):
        check_train_out(out)
    assert replace_refusal(out) is not None


def test_a_derived_run_folder_is_synced_before_its_rename_and_its_parent_after(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # M21
    import generator.runs.derive as derive

    synced, real = [], derive.fsync_path
    monkeypatch.setattr(derive, "fsync_path", lambda p, folder=False: (synced.append(Path(p).name), real(p, folder=folder)))
    with derive.new_run_folder(tmp_path / "out", "combine") as tmp:
        (tmp / IDS_FILE).write_bytes(b"ids")
        (tmp / CHECKPOINT_DIR).mkdir()
        (tmp / CHECKPOINT_DIR / "best.ckpt").write_bytes(b"ckpt")
    assert synced == [IDS_FILE, CHECKPOINT_DIR, tmp.name, tmp_path.name] and (tmp_path / "out" / IDS_FILE).is_file()


def test_distill_returns_the_kept_epochs_weights_not_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # M22
    model, ids, tree = make(num_items=NUM_ITEMS)
    split = leave_one_out(load_dataset(write_random_dataset(tmp_path / "data")))
    scores, real = iter([0.1, 0.5, 0.2]), distill.validation_ndcg  # epoch 1 best, epoch 2 worse
    monkeypatch.setattr(distill, "validation_ndcg", lambda *a: {**real(*a), "ndcg@10": next(scores)})
    seen = {}

    def log(row: dict) -> None:
        seen[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    best, _ = distill.distill_code_heads(model, tree, ids, split, DistillOptions(epochs=2, val_users=10, lr=1e-2), log=log)
    assert all(torch.equal(best[k], seen[1][k]) for k in best)
    assert not all(torch.equal(best[k], seen[2][k]) for k in best)


def test_the_teacher_is_the_dense_softmax_at_the_temperature() -> None:  # M23
    model, _, _ = make()
    h = torch.randn(5, CFG.d_model)
    with torch.no_grad():
        logits = model.dense_queries(h) @ model.item_vectors().T
        got = distill.teacher_softmax(model, h, 2.0)
    torch.testing.assert_close(got, (logits / 2.0).softmax(-1)[:, : model.trained_items])


def test_adamw_decays_matrices_and_not_vectors() -> None:  # M26
    lin = torch.nn.Linear(3, 4)
    decayed, plain = adamw_schedule(lin, OptimConfig(weight_decay=0.05))["optimizer"].param_groups
    assert len(decayed["params"]) == 1 and decayed["params"][0] is lin.weight and decayed["weight_decay"] == 0.05
    assert len(plain["params"]) == 1 and plain["params"][0] is lin.bias and plain["weight_decay"] == 0.0


@pytest.mark.parametrize("text", ["00:60:00", "00:00:60", "1:00:60:00"])
def test_max_time_refuses_sixty_minutes_or_seconds(text: str) -> None:  # M28
    with pytest.raises(ValueError, match="HH:MM:SS"):
        parse_max_time(text)


def test_score_codes_gives_minus_inf_to_a_code_one_past_its_level(world) -> None:  # noqa: F811 M35
    model, ids, layout, head, x, mask = world
    tree = PrefixTree.from_semantic_ids(ids, layout)
    K0 = layout.codebook_sizes[0]
    row = int(np.flatnonzero(ids.codes[:, 0] == K0 - 1)[0])  # an item whose level-0 code is the block's last
    good = torch.from_numpy(ids.codes[row]).expand(x.shape[0], 1, -1).clone()
    bad = good.clone()
    bad[..., 0] = K0  # one past level 0's block: no item's code (was clamped onto the item above)
    assert torch.isfinite(score_codes(model, x, mask, tree, layout, good)).all()
    assert torch.isinf(score_codes(model, x, mask, tree, layout, bad)).all()


def test_a_tokenizer_record_that_is_not_its_tokenizers_is_refused(tmp_path: Path) -> None:  # M41
    from transformers import BertTokenizer

    src = tmp_path / "bert"
    src.mkdir()
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "lipstick", "cream"]) + "\n")
    BertTokenizer(vocab=str(src / "vocab.txt")).save_pretrained(src)
    saved = TitleTokenizer.from_pretrained(src).save(tmp_path / "tokenizer")
    TitleTokenizer.load(saved)
    meta = json.loads((saved / META_FILE).read_text())
    (saved / META_FILE).write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 5}))
    with pytest.raises(ValueError, match="differ from those recorded"):
        TitleTokenizer.load(saved)


def test_check_codebooks_finds_an_edit_that_keeps_the_size(tmp_path: Path) -> None:  # M42
    def write(folder: Path) -> None:
        for name in CODEBOOK_FILES:
            (folder / name).write_bytes(b'{"a": 1}')

    write_codebooks_folder(tmp_path / "ids", write)
    check_codebooks(tmp_path / "ids")
    (tmp_path / "ids" / STATS_FILE).write_bytes(b'{"a": 2}')  # same size, other bytes
    with pytest.raises(ValueError, match="does not match manifest.json"):
        check_codebooks(tmp_path / "ids")


def test_standardization_leaves_a_nearly_constant_dimension_unscaled() -> None:  # M43
    x = np.random.default_rng(0).standard_normal((200, 3)).astype(np.float32)
    x[:, 1] *= 1e-5  # (numerically constant next to the others: was blown up into noise)
    _, scale = standardization(x)
    assert scale[1] == 1.0 and np.allclose(scale[[0, 2]], x[:, [0, 2]].std(0), rtol=1e-3)


def test_the_quantizer_file_is_synced_before_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # M45
    from rqvae._checkpoint import save_checkpoint

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode)
                                                               else "fsync file"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    save_checkpoint({"method": "rqkmeans"}, tmp_path / "quantizer.pt")
    assert events == ["fsync file", "rename", "fsync folder"]


def test_an_npy_with_bytes_after_its_array_is_refused(tmp_path: Path) -> None:  # M48
    path = tmp_path / "item_emb_x.npy"
    np.save(path, np.ones((4, 3), np.float32))
    with open(path, "ab") as f:
        f.write(np.ones(3, np.float32).tobytes())  # a fifth row its header does not count
    with pytest.raises(ValueError, match="truncated or damaged"):
        read_npy(path)


def test_check_alpha_refuses_nan() -> None:  # M51
    with pytest.raises(ValueError, match="`alpha` must be a number in"):
        check_alpha(math.nan)


def test_add_items_refuses_a_run_item_whose_embedding_changed_in_one_dimension(tmp_path: Path) -> None:  # M57
    from generator.runs.catalogue import _check_same_embeddings

    a = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    (tmp_path / "run_data").mkdir()
    (tmp_path / "new").mkdir()
    np.save(tmp_path / "run_data" / "item_emb_x.npy", a[:5])
    b = a.copy()
    b[2, 1] += 0.5  # item 3, one dimension
    np.save(tmp_path / "new" / "item_emb_x.npy", b)
    with pytest.raises(ValueError, match="item 3's embedding differs"):
        _check_same_embeddings(SimpleNamespace(path=tmp_path / "run_data"), SimpleNamespace(path=tmp_path / "new"), "x", 5)
