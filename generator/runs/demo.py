"""Train -> evaluate -> show, in one call, for the demo (the codebooks are fitted before, by ``rqvae``).

    ids = ...  # `semid fit-codebooks` / rqvae wrote IDS/semantic_ids.npz
    report = train_evaluate_show("../shared/data/beauty", "IDS/semantic_ids.npz", "runs/demo/run")
    print(report.text)

Library code does not print: the returned :class:`DemoReport` carries the text to show.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from generator.runs.evaluate import evaluate_run
from generator.runs.folder import load_run
from generator.runs.options import TrainOptions
from generator.runs.recommend import recommend
from generator.runs.train import TrainResult, train_run
from semid.data import load_dataset
from semid.split import leave_one_out

log = logging.getLogger(__name__)


class ShownUser(NamedTuple):
    user_id: int
    history: list[tuple[int, str]]  # (item id, title), oldest first
    target: tuple[int, str]  # the held-out test item
    recommendations: list[tuple[int, float, str]]  # (item id, score, title), best first


class DemoReport(NamedTuple):
    run_dir: Path
    train: TrainResult
    test: dict[str, Any]  # what RUN/metrics_test.json (metrics_test_sample<N>.json for a sample) holds
    shown: list[ShownUser]
    text: str


def demo_options(*, preset: str = "causal", max_time: str | None = "00:05:00", max_epochs: int | None = 50,
                 eval_users: int | None = None, seed: int = 0, progress: bool = True) -> TrainOptions:
    """The demo's training options (checked: a bad value is a ValueError naming it, before anything is written)."""
    return TrainOptions(
        preset=preset, max_time=max_time, max_epochs=max_epochs, seed=seed, val_users=1000, final_val_users=eval_users,
        patience=0, progress=progress,
    )


def train_evaluate_show(
    data_dir: str | os.PathLike[str],
    ids_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    preset: str = "causal",
    max_time: str | None = "00:05:00",
    max_epochs: int | None = 50,
    eval_users: int | None = None,
    show_users: int = 3,
    k: int = 10,
    seed: int = 0,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> DemoReport:
    """Train a generator for ``max_time``, evaluate on ``eval_users`` test users, recommend for ``show_users`` users.

    The training options are ``semid train``'s defaults (the default design); only the budget is the demo's:
    validation on 1,000 sampled users per epoch, on ``eval_users`` at the end.
    """
    options = demo_options(preset=preset, max_time=max_time, max_epochs=max_epochs, eval_users=eval_users, seed=seed,
                           progress=progress)
    trained = train_run(data_dir, ids_path, out_dir, options, callbacks=callbacks)
    test = evaluate_run(out_dir, "test", max_users=eval_users, seed=seed, progress=progress)

    run = load_run(out_dir)
    dataset = load_dataset(data_dir)
    split = leave_one_out(dataset)
    title = dataset.catalogue.title_of
    rows = np.random.default_rng(seed).choice(split.num_users, size=min(show_users, split.num_users), replace=False)
    histories = [split.test_history(int(i)) for i in rows]
    recs = recommend(run, histories, k=k, user_ids=split.user_ids[rows].tolist() if run.use_user_tokens else None)
    shown = [
        ShownUser(
            int(split.user_ids[i]),
            [(int(x), title(int(x))) for x in h],
            (int(split.test_targets[i]), title(int(split.test_targets[i]))),
            [(int(it), float(s), title(int(it))) for it, s in zip(r.items, r.scores, strict=True)],
        )
        for i, h, r in zip(rows, histories, recs, strict=True)
    ]
    return DemoReport(Path(out_dir), trained, test, shown, _text(Path(out_dir), trained, test, shown))


def _text(run_dir: Path, trained: TrainResult, test: dict[str, Any], shown: list[ShownUser]) -> str:
    lines = [
        f"trained {trained.epochs} epochs ({trained.steps} steps) in {trained.train_seconds / 60:.1f} min -> {run_dir}",
        f"test, {test['users_evaluated']} users: Recall@5 {test['recall@5']:.4f}  NDCG@5 {test['ndcg@5']:.4f}  "
        f"Recall@10 {test['recall@10']:.4f}  NDCG@10 {test['ndcg@10']:.4f}  (invalid items: {test['invalid_items']}; every "
        "item ranked, the benchmark's protocol)",
    ]
    for u in shown:
        lines += ["", f"user {u.user_id}: last items seen"]
        lines += [f"      {item:>6}  {t[:70] or '(no title)'}" for item, t in u.history[-5:]]
        lines.append(f"  held out: {u.target[0]:>6}  {u.target[1][:70] or '(no title)'}")
        lines.append("  top-10 (as `semid serve` answers: the history left out):")
        for rank, (item, score, t) in enumerate(u.recommendations, start=1):
            mark = "  <- held-out item" if item == u.target[0] else ""
            lines.append(f"  {rank:>3}. {item:>6}  {score:7.2f}  {t[:70] or '(no title)'}{mark}")
    valid = Path(trained.metrics_valid["file"]).name if trained.metrics_valid else "metrics_valid.json"
    lines += ["", f"files: {run_dir}/config.yaml, checkpoints/, logs/, {valid}, {Path(test['file']).name}"]
    return "\n".join(lines)
