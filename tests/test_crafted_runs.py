"""Crafted or careless run folders (issue 22, items 4, 6, 9, 10 and 12), on one tiny trained causal run: a re-signed
checkpoint whose tables or sizes lie is refused before a model is built; digests pinned outside the run catch an edit
the in-file digest cannot; other data, a sample of users, a folder that cannot take the metrics, --alpha without the
hybrid and extreme stored weights are refused or kept apart, each naming the file or option."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import generator.runs.evaluate as ev
from generator.models.checkpoint import INTEGRITY_KEY, with_integrity
from generator.runs import fusion_store
from generator.runs.folder import load_run, read_config, write_config
from semid_cli import main
from tests.test_causal_run import FLAGS
from tests.test_generator_helpers import write_ids, write_random_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted_runs")
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(run), "--final-val-users", "0", *FLAGS]) == 0
    return {"run": run, "root": root, "data": data}


def _copy(trained: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained["run"], tmp_path / "run"))


def _resign(run: Path, edit) -> None:  # noqa: ANN001
    """Edit best.ckpt's content and recompute its in-file digest, as anyone who edits it can."""
    path = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.pop(INTEGRITY_KEY)
    edit(ckpt)
    torch.save(with_integrity(ckpt), path)


def _set(key: str, index: tuple[int, ...], value: int):  # noqa: ANN202
    def edit(ckpt: dict) -> None:
        ckpt["state_dict"][f"model.{key}"][index] = value
    return edit


# ---- item 4: structure checked against the config; digests pinned outside the run -------------------------------
@pytest.mark.parametrize("edit, message", [
    (_set("child_index_1", (0, 0), 10**6), r"tensor `child_index_1` is not the prefix-tree table"),
    (_set("child_index_2", (1, 0), -5), r"tensor `child_index_2` is not the prefix-tree table"),
    (_set("child_codes_1", (0, 0), 3), r"tensor `child_codes_1` is not the prefix-tree table"),
    (_set("parent_keys_2", (0,), -1), r"tensor `parent_keys_2` is not the prefix-tree table"),
    (_set("item_tokens", (3, 1), 10**4), r"tensor `item_tokens\[3, 1\]` is 10000, outside level 1's tokens"),
    (_set("item_tokens", (5, 0), 4), r"tensor `item_tokens` is not the token table of the semantic IDs"),
    (lambda c: c["semid"]["config"].update(d_model=10**6, dense_dim=10**6, num_heads=1),
     r"tensor `(code_emb\.weight|dense_head\.item_table)` has shape \(\d+, \d+\), but the model its config describes needs \(\d+, 1000000\)"),
    (lambda c: c["semid"]["config"].update(num_layers=3), r"the config says 3 layers, the file holds tensors of 2"),
    # (built as a skeleton first: 100,000 layers took minutes and GBs before any check)
    (lambda c: c["semid"]["config"].update(num_layers=100_000), r"the config says 100000 layers, the file holds tensors of 2"),
    (lambda c: c["state_dict"].update({"model.extra": torch.zeros(3)}), r"tensors \['extra'\] are not part of the model"),
])
def test_a_resigned_checkpoint_whose_structure_lies_is_refused_naming_the_tensor(trained: dict[str, Path], tmp_path: Path,
                                                                                   edit, message: str) -> None:  # noqa: ANN001
    run = _copy(trained, tmp_path)
    _resign(run, edit)
    with pytest.raises(ValueError, match=rf"best\.ckpt: {message}"):
        load_run(run)


def test_pinned_digests_catch_an_edit_the_in_file_digest_cannot(trained: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, tmp_path)
    assert main(["digest", "--run", str(run)]) == 0
    pins = tmp_path / "pins.sha256"
    pins.write_text(capsys.readouterr().out)
    assert sorted(line.split()[1] for line in pins.read_text().splitlines()) == ["checkpoints/best.ckpt", "config.yaml",
                                                                                 "hybrid.json", "semantic_ids.npz"]
    assert main(["digest", "--run", str(run), "--combined"]) == 0
    combined = capsys.readouterr().out.strip()
    history = ["recommend", "--run", str(run), "--history", "1,2,3", "-k", "5"]
    assert main([*history, "--expect-sha256", str(pins)]) == 0
    assert main([*history, "--expect-sha256", combined]) == 0
    capsys.readouterr()

    def boost(ckpt: dict) -> None:  # +50 on one code bias: a well-formed file that favours some items for everyone
        ckpt["state_dict"]["model.code_bias"][5] += 50.0
    _resign(run, boost)
    load_run(run)  # the in-file digest was recomputed: loading alone cannot tell
    assert main([*history, "--expect-sha256", str(pins)]) == 2
    assert "best.ckpt: sha256" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "--no-progress", "--expect-sha256", combined]) == 2
    assert "do not have the digest you pinned" in capsys.readouterr().err
    pins.write_text("".join(ln + "\n" for ln in pins.read_text().splitlines() if "config.yaml" not in ln))
    assert main([*history, "--expect-sha256", str(pins)]) == 2
    assert "pins no digest for config.yaml" in capsys.readouterr().err
    ckpt = run / "checkpoints" / "best.ckpt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x40  # a flipped bit: a run that no longer loads is not pinned, the message names the file
    ckpt.write_bytes(bytes(data))
    assert main(["digest", "--run", str(run)]) == 2
    assert "best.ckpt: corrupted" in (err := capsys.readouterr().err), err
    assert main(["digest", "--run", str(run), "--checkpoint", str(run / "checkpoints")]) == 2  # a folder: said so (it
    assert "checkpoints: a folder, not a file: name the checkpoint file itself" in capsys.readouterr().err  # was "missing")
    (run / "semantic_ids.npz").unlink()  # a missing file: named as such
    assert main(["digest", "--run", str(run)]) == 2
    assert "semantic_ids.npz: missing from the run folder" in capsys.readouterr().err


# ---- item 6: silently wrong answers -------------------------------------------------------------------------------
def test_evaluate_refuses_other_data_naming_both(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, tmp_path)
    other = Path(shutil.copytree(trained["data"], tmp_path / "other"))
    seqs = (other / "sequences.txt").read_text().splitlines()
    (other / "sequences.txt").write_text("\n".join(seqs[1:] + seqs[:1]) + "\n")  # same items and users, other order
    before = sorted(p.name for p in run.iterdir())
    assert main(["evaluate", "--run", str(run), "--data", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{other}: not the data the run {run} was trained on ({trained['data'].resolve()})" in err
    assert "sequences.txt" in err and "items.jsonl" not in err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_a_run_without_a_fingerprint_is_evaluated_with_a_warning(trained: dict[str, Path], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    run = _copy(trained, tmp_path)
    config = read_config(run)
    config.pop("data_fingerprint")
    write_config(run, config)
    m = ev.evaluate_run(run, "test", num_beams=10, max_users=5)
    assert m["users_evaluated"] == 5 and "records no fingerprint of its data" in caplog.text


def test_a_sample_of_users_never_overwrites_the_all_users_metrics(trained: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, tmp_path)
    assert main(["evaluate", "--run", str(run), "--num-beams", "10", "--no-progress"]) == 0
    whole = (run / "metrics_test.json").read_bytes()
    assert main(["evaluate", "--run", str(run), "--num-beams", "10", "--max-users", "5", "--no-progress"]) == 0
    assert (run / "metrics_test.json").read_bytes() == whole
    assert json.loads((run / "metrics_test_sample5.json").read_text())["users_evaluated"] == 5
    assert "metrics_test_sample5.json  (a sample: the all-users file is left as it was)" in capsys.readouterr().out


# ---- item 9: check the folder takes the result before the work ----------------------------------------------------
def test_evaluate_refuses_a_folder_that_cannot_take_the_metrics_before_computing(
        trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, tmp_path)
    computed = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **kw: computed.append(1) or real(*a, **kw))
    (run / "metrics_test.json").mkdir()
    assert main(["evaluate", "--run", str(run), "--num-beams", "10", "--no-progress"]) == 2
    assert "metrics_test.json: is a folder" in capsys.readouterr().err and not computed
    (run / "metrics_test.json").rmdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*a, dir=None, **kw):  # noqa: A002, ANN001, ANN202 (tests run as root, whom chmod does not stop)
        if dir is not None and Path(dir).resolve() == run.resolve():
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*a, dir=dir, **kw)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["evaluate", "--run", str(run), "--num-beams", "10", "--no-progress"]) == 2
    assert f"{run}: cannot write the metrics (metrics_test.json) into this folder (Permission denied)" in capsys.readouterr().err
    assert not computed
    assert main(["train", "--data", str(trained["data"]), "--ids", str(trained["root"] / "ids"), "--out", str(run), "--resume"]) == 2
    assert "cannot write the run's config into this folder" in capsys.readouterr().err


# ---- item 10: options and files named --------------------------------------------------------------------------
def test_alpha_with_a_decoder_that_ignores_it_is_refused(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--run", str(trained["run"]), "--history", "1,2", "--alpha", "0.3"]) == 2
    assert "`--alpha` is the hybrid decoder's blend weight, and decoder beam does not use it" in capsys.readouterr().err


def test_extreme_stored_fusion_weights_are_refused_naming_hybrid_json(trained: dict[str, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, tmp_path)
    r = load_run(run)
    stored = {"fusion": "learned", "params": {"weights": [1e300] * 8}, "num_candidates": min(50, r.model.num_items),
              **fusion_store.choice_key(r)}
    (run / "hybrid.json").write_text(json.dumps(stored))
    assert main(["recommend", "--run", str(run), "--history", "1,2", "--decoder", "hybrid"]) == 2
    err = capsys.readouterr().err
    assert "hybrid.json: corrupt hybrid fusion file" in err and "magnitude <= 1e+06" in err
    (run / "hybrid.json").write_text(json.dumps({**stored, "params": [1, 2]}))  # not an object: it was an AttributeError
    assert main(["recommend", "--run", str(run), "--history", "1,2", "--decoder", "hybrid"]) == 2
    assert "hybrid.json: corrupt hybrid fusion file" in (err := capsys.readouterr().err) and "`params` must be an object" in err


# ---- item 12: one read of the IDs -------------------------------------------------------------------------------
def test_load_run_reads_the_semantic_ids_once(trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    real = np.load

    def counting(path, *a, **kw):  # noqa: ANN001, ANN202
        if str(path).endswith("semantic_ids.npz"):
            reads.append(path)
        return real(path, *a, **kw)
    monkeypatch.setattr(np, "load", counting)
    load_run(trained["run"])
    assert len(reads) == 1


def test_a_pin_covers_the_fusion_and_refuses_a_checkpoint_swapped_while_the_run_loads(
        trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """hybrid.json changes the hybrid's rankings, so the pin covers it; and a checkpoint renamed over the pinned one
    after the pin was checked, while the run loads, is refused (the files' states before the check must be theirs
    after the load), not served under the pin."""
    import json
    import os

    import generator.runs.recommender as recommender

    run = _copy(trained, tmp_path)
    assert main(["digest", "--run", str(run), "--combined"]) == 0
    combined = capsys.readouterr().out.strip()
    history = ["recommend", "--run", str(run), "--history", "1,2,3", "-k", "5", "--expect-sha256", combined]
    original = (run / "hybrid.json").read_bytes()
    stored = json.loads(original)
    (run / "hybrid.json").write_text(json.dumps({**stored, "fusion": "blend", "params": {"alpha": 0.0}}))
    assert main([*history, "--decoder", "hybrid"]) == 2
    assert "do not have the digest you pinned" in capsys.readouterr().err
    (run / "hybrid.json").write_bytes(original)
    assert main(history) == 0
    capsys.readouterr()
    real, calls = recommender.Recommender.from_run.__func__, []

    def swapping(cls, *args, **kwargs):  # noqa: ANN001 (the checkpoint replaced by another file while the run loads)
        calls.append(1)
        out = real(cls, *args, **kwargs)
        ckpt = run / "checkpoints" / "best.ckpt"
        (run / "new.ckpt").write_bytes(ckpt.read_bytes())
        os.replace(run / "new.ckpt", ckpt)
        return out

    monkeypatch.setattr(recommender.Recommender, "from_run", classmethod(swapping))
    assert main(history) == 2
    assert "pinned files changed while they were checked and loaded" in capsys.readouterr().err and calls == [1]
    import generator.runs.evaluate as evaluate_module

    real_load = evaluate_module.load_run

    def swapping_load(*args, **kwargs):  # noqa: ANN002, ANN003 (evaluate: swapped while it loads, refused before it
        out = real_load(*args, **kwargs)  # evaluates or writes anything)
        ckpt = run / "checkpoints" / "best.ckpt"
        (run / "new.ckpt").write_bytes(ckpt.read_bytes())
        os.replace(run / "new.ckpt", ckpt)
        return out

    assert main(["digest", "--run", str(run), "--combined"]) == 0
    combined = capsys.readouterr().out.strip()
    monkeypatch.setattr(evaluate_module, "load_run", swapping_load)
    (run / "metrics_test.json").unlink(missing_ok=True)
    assert main(["evaluate", "--run", str(run), "--no-progress", "--expect-sha256", combined]) == 2
    assert "pinned files changed while they were checked and loaded" in capsys.readouterr().err
    assert not (run / "metrics_test.json").exists()


def test_digest_refuses_files_that_change_while_it_reads_them(trained: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`semid digest` notes the files' states, hashes them, loads the run and looks again (without reading them a
    second time): a run rewritten meanwhile (a training still saving its best checkpoint) is refused, not pinned with
    digests of files that were not the ones checked."""
    import os

    import generator.runs.folder as folder

    run, real, calls = _copy(trained, tmp_path), folder.load_run, []

    def rewriting(*args, **kwargs):  # the checkpoint replaced (same bytes, a new file) while the run loads
        calls.append(1)
        out = real(*args, **kwargs)
        ckpt = run / "checkpoints" / "best.ckpt"
        (run / "new.ckpt").write_bytes(ckpt.read_bytes())
        os.replace(run / "new.ckpt", ckpt)
        return out

    monkeypatch.setattr(folder, "load_run", rewriting)
    assert main(["digest", "--run", str(run)]) == 2
    assert "its files changed while `semid digest` read them" in capsys.readouterr().err and calls == [1]
    monkeypatch.setattr(folder, "load_run", real)
    assert main(["digest", "--run", str(run)]) == 0  # left alone: pinned
    assert "checkpoints/best.ckpt" in capsys.readouterr().out


def test_a_path_of_bytes_that_are_not_utf8_is_digested_and_a_huge_config_int_names_the_file(tmp_path: Path) -> None:
    # (a run folder whose path held byte 0xff failed every checkpoint save at the digest: the training was lost;
    # a config.yaml int of 5,000 digits failed with Python's "Exceeds the limit" naming no file)
    from generator.models.checkpoint import content_digest
    from generator.runs.folder import read_config

    path = "/runs/caf\udcff"  # what os.fsdecode gives for b"/runs/caf\xff"
    assert content_digest({"dirpath": path}) != content_digest({"dirpath": "/runs/caf"})
    (tmp_path / "config.yaml").write_text("format: semid.run\nversion: " + "9" * 5000 + "\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.yaml'}: not a config.yaml semid reads \(Exceeds the limit"):
        read_config(tmp_path)
