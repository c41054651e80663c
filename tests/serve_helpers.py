"""Shared by the service's tests: a tiny trained run and a second version of it, and an in-process client.

``serve_world`` (tests/conftest.py, session scope) trains one tiny causal run with a dense head (``v1``) and makes a
second version ``v2``: a copy whose checkpoint's weights are perturbed (another version, other rankings) with its
hybrid fusion chosen again (``semid choose-fusion``); ``v2_no_fusion`` is that copy before the fusion was chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import torch

from generator.models.checkpoint import with_integrity
from generator.runs.folder import HYBRID_FILE, best_checkpoint, read_config
from generator.runs.recommender import Recommender
from generator.serving.app import create_app
from generator.serving.holder import Holder, Served
from semid_cli import main
from tests.test_generator_helpers import write_ids, write_random_dataset

FLAGS = ["--max-epochs", "1", "--batch-size", "8", "--val-users", "all", "--num-beams", "10", "--no-progress", "--seed", "0"]
HISTORIES = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 30], [12, 14, 16, 18, 20]]


def build_world(root: Path) -> dict[str, Path]:
    data = write_random_dataset(root / "data")
    (root / "ids").mkdir()
    write_ids(root / "ids" / "semantic_ids.npz")
    v1 = root / "v1"
    assert main(["train", "--data", str(data), "--ids", str(root / "ids"), "--out", str(v1), *FLAGS]) == 0
    v2 = root / "v2_no_fusion"
    shutil.copytree(v1, v2)
    (v2 / HYBRID_FILE).unlink()
    ckpt_path = best_checkpoint(v2, read_config(v2))
    ckpt = torch.load(ckpt_path, weights_only=False)  # our own file, written by the training above
    gen = torch.Generator().manual_seed(1)
    for name, w in ckpt["state_dict"].items():
        if w.is_floating_point():
            ckpt["state_dict"][name] = w + 0.5 * torch.randn(w.shape, generator=gen)
    torch.save(with_integrity(ckpt), ckpt_path)
    shutil.copytree(v2, root / "v2")
    assert main(["choose-fusion", "--run", str(root / "v2")]) == 0
    return {"root": root, "data": data, "v1": v1, "v2": root / "v2", "v2_no_fusion": v2}


def holder_for(path: Path, target: dict[str, Path] | None = None, **options: object) -> Holder:
    """A Holder serving ``path``; a reload loads ``target["path"]`` (default: ``path`` again)."""
    target = target if target is not None else {"path": path}
    return Holder(lambda: Recommender.from_run(target["path"], **options), path,
                  served=Served.build(Recommender.from_run(path, **options)))


@contextlib.asynccontextmanager
async def serving(app: object, client: tuple[str, int] = ("127.0.0.1", 50000)) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of ``app`` (its decoding worker started; ``client``: the address the app sees)."""
    app.state.batcher.start()
    try:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://semid.test", timeout=60) as c:
            yield c
    finally:
        await asyncio.to_thread(app.state.batcher.stop)


def app_for(path: Path, target: dict[str, Path] | None = None, **app_options: object) -> object:
    return create_app(holder_for(path, target), **app_options)
