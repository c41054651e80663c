"""`semid train` refuses what cannot train before the run folder is touched (a helper's audit, December 2026): each of
these failed after config.yaml, the IDs' copy and logs/ were written, and the corrected command was then told the
folder already held a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from generator.runs.options import TrainOptions
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset


@pytest.mark.parametrize(("flags", "said"), [
    (["--num-beams", "5"], "`--num-beams` must be an int in [k=10, 40]"),
    (["--num-beams", "100"], "`--num-beams` must be an int in [k=10, 40]"),
    (["--dense", "both", "--dense-embeddings", "missing"], "item_emb_missing.npy: no content vectors"),
    (["--accelerator", "tpu"], "Lightning cannot train so here"),  # (a traceback)
    (["--precision", "7-true"], "Precision '7-true' is invalid"),
    (["--strategy", "nope"], "invalid strategy name"),
])
def test_refused_before_the_folder_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                              said: str) -> None:
    data, ids = write_random_dataset(tmp_path / "data"), write_ids(tmp_path / "ids.npz")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--ids", str(ids), "--out", str(out), "--max-steps", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert not out.exists()


def test_t5_options_that_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError, match="`objective` 'dense' trains the dense head alone"):
        TrainOptions(preset="cpu", dense="both", objective="dense", decoder="generate")  # (recorded, not what validated)
    with pytest.raises(ValueError, match="`user_tokens` must be 0 with preset 'item-t5'"):
        TrainOptions(preset="item-t5", user_tokens=50)
    assert TrainOptions(preset="cpu", dense="both", objective="dense").decoder == "auto"
