"""A crafted checkpoint runs no code: every load of a checkpoint goes through weights_only loading. A damaged one
(empty, truncated, garbage, a changed byte, NaN weights, another format version) is an error naming the file, and a
config.yaml that disagrees with its checkpoint is an error naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from generator.models.checkpoint import INTEGRITY_KEY, safe_load, with_integrity
from generator.runs.folder import load_run
from semid_cli import main
from tests.test_causal_run import FLAGS
from tests.test_generator_helpers import write_ids, write_random_dataset


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crafted")
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(run), "--final-val-users", "0", *FLAGS]) == 0
    marker = root / "code_ran"
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["extra"] = _Exploit(marker)  # a real checkpoint plus one object whose unpickling runs a command
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    return {"run": run, "marker": marker}


def test_a_crafted_checkpoint_is_refused_before_it_runs_code(crafted: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"best\.ckpt: refused: this file holds objects other than tensors"):
        load_run(crafted["run"])
    with pytest.raises(ValueError, match="refused"):
        safe_load(crafted["run"] / "checkpoints" / "best.ckpt")
    assert not crafted["marker"].exists()


def test_the_cli_refuses_it_with_exit_code_2(crafted: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(crafted["run"]), "--no-progress"]) == 2
    assert main(["recommend", "--run", str(crafted["run"]), "--history", "1,2"]) == 2
    assert "refused" in capsys.readouterr().err and not crafted["marker"].exists()
    # the unsafe loader would have run it: the test is real
    torch.load(crafted["run"] / "checkpoints" / "best.ckpt", weights_only=False)
    assert crafted["marker"].exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    run = root / "run"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(run), "--final-val-users", "0", *FLAGS]) == 0
    return {"run": run, "root": root}


def _copy(trained: dict[str, Path], name: str) -> Path:
    import shutil

    run = trained["root"] / name
    if not run.exists():
        shutil.copytree(trained["run"], run)
    return run


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":  # garbled after its zip header
        path.write_bytes(data[:4] + os.urandom(len(data) - 4))
    elif how == "another file":  # evaluate --checkpoint /etc/passwd
        path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif how == "flipped byte":  # in the middle of the largest tensor's bytes: the zip and pickle still read
        ckpt = torch.load(path, weights_only=True)
        name, t = max(ckpt["state_dict"].items(), key=lambda kv: kv[1].numel())
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        at = data.find(raw[:64]) + len(raw) // 2
        assert at > len(raw) // 2, "the tensor's bytes are stored as they are"
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    elif how == "nan weights":  # rewritten whole, digest included: only the values are wrong
        ckpt = torch.load(path, weights_only=True)
        name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and v.ndim == 2)
        ckpt["state_dict"][name][0, 0] = float("nan")
        torch.save(with_integrity(ckpt), path)
    elif how == "other version":
        ckpt = torch.load(path, weights_only=True)
        ckpt[INTEGRITY_KEY]["version"] = 99
        torch.save(ckpt, path)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("empty", "empty file (0 bytes), not a checkpoint"),
        ("truncated", "not a readable checkpoint (truncated or corrupted"),
        ("random", "not a readable checkpoint (truncated or corrupted"),
        ("another file", "not a checkpoint (a torch checkpoint starts with a zip or pickle header, this file with b'root')"),
        ("flipped byte", "corrupted: its content no longer matches the sha256 semid recorded"),
        ("nan weights", "holds 1 NaN or inf value(s)"),
        ("other version", "checkpoint format version 99; this semid reads version 1"),
    ],
)
def test_a_damaged_checkpoint_is_an_error_naming_the_file(
    trained: dict[str, Path], how: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(trained, how.replace(" ", "_"))
    best = run / "checkpoints" / "best.ckpt"
    _damage(best, how)
    with pytest.raises(ValueError, match="^" + str(best).replace(".", r"\.")) as e:
        load_run(run)
    assert message in str(e.value)
    if how == "nan weights":
        assert "tensor `" in str(e.value)
    assert main(["recommend", "--run", str(run), "--history", "1,2"]) == 2
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_damaged_resume_point_is_an_error_naming_it(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(trained, "damaged_last")
    _damage(run / "checkpoints" / "last.ckpt", "flipped byte")
    data, ids = trained["root"] / "data", trained["root"] / "ids"
    assert main(["train", "--data", str(data), "--ids", str(ids), "--out", str(run), "--resume", "--no-progress"]) == 2
    assert f"{run / 'checkpoints' / 'last.ckpt'}: corrupted" in capsys.readouterr().err


def test_a_config_yaml_that_disagrees_with_its_checkpoint_is_refused(trained: dict[str, Path]) -> None:
    run = _copy(trained, "edited_config")
    text = (run / "config.yaml").read_text()
    assert "num_user_tokens: 0" in text
    text = text.replace("num_user_tokens: 0", "num_user_tokens: 5")
    (run / "config.yaml").write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("sha256:")) + "\n")
    with pytest.raises(ValueError, match=r"config\.yaml: key `layout\.num_user_tokens` is 5, but the checkpoint .*best\.ckpt was trained with 0"):
        load_run(run)
