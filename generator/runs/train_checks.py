"""What ``train_run`` checks before a run folder is touched, beyond the options' own checks (which know no data):
the validation beams against the catalogue, the content vectors a dense head reads, and the hardware flags as Lightning
reads them. Each of these failed only after config.yaml, the IDs' copy and logs/ were written, so the corrected
command was then told the folder "already holds a run" (a helper's audit, December 2026)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from generator.decoding.protocol import check_beams
from semid.data import EMBEDDING_PREFIX

VALIDATION_K = 10  # the largest cut-off validation ranks (every design's system: ks (5, 10))


def check_before_writing(options: Any, data_dir: str | Path, num_items: int) -> None:
    """ValueErrors / FileNotFoundErrors naming the option (the command line names its flag) and what to do."""
    try:
        check_beams(options.num_beams, min(VALIDATION_K, num_items), num_items)
    except ValueError as e:
        raise ValueError(f"{e}: validation ranks the top {min(VALIDATION_K, num_items)} of {num_items:,} items") from None
    if options.dense in ("content", "both"):
        emb = Path(data_dir) / f"{EMBEDDING_PREFIX}{options.dense_embeddings}.npy"
        if not emb.is_file():
            raise FileNotFoundError(f"{emb}: no content vectors for the dense head (`dense_embeddings` "
                                    f"{options.dense_embeddings!r}); make them with `semid embed`, or name another")
    check_hardware(options)


def check_hardware(options: Any) -> None:
    """`accelerator`, `devices`, `strategy` and `precision` as Lightning's Trainer takes them: one is built and thrown
    away (no process is started: that is ``fit``'s), so a GPU asked for where none is, a strategy or precision Lightning
    does not know, fail here with one line and not as a traceback after the folder was written."""
    import lightning as L

    said = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # (its "GPU available" lines: the real one's)
    level = said.level
    said.setLevel(logging.WARNING)
    try:
        L.Trainer(accelerator=options.accelerator, devices=options.devices, strategy=options.strategy,
                  precision=options.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False)
    except Exception as e:  # noqa: BLE001 (Lightning raises MisconfigurationException, ValueError, ImportError, ...)
        raise ValueError(f"`accelerator` {options.accelerator!r}, `devices` {options.devices!r}, `strategy` "
                         f"{options.strategy!r}, `precision` {options.precision!r}: Lightning cannot train so here "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})") from None
    finally:
        said.setLevel(level)
