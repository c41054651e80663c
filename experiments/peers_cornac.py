"""cornac's RPG and TIGER ports run in the peers' harness (``experiments/peers.py``, which has the protocol).

    OMP_NUM_THREADS=1 .venv-peers/bin/python -m experiments.peers --model rpg-cornac|tiger-cornac --data ../shared/data/beauty

Both get semid's leave-one-out split as cornac ``NextItemEvaluation`` splits (one session per user) and the MiniLM
item embeddings as item features; cornac is imported only inside the runners.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from experiments.peers import CpuBudget, _times, cornac_usit, left_padded, rank_test
from semid.split import Split


class _Epochs:
    """Stands in for the ``trange`` a cornac trainer loops over: its epochs until the budget is spent."""

    def __init__(self, budget: CpuBudget, counter: list[int]) -> None:
        self.budget, self.counter = budget, counter

    def __call__(self, start: int, stop: int, **_: object) -> _Epochs:
        self.range = range(start, stop)
        return self

    def __iter__(self) -> Iterator[int]:
        for epoch in self.range:
            if self.budget.spent():
                return
            self.counter[0] = epoch
            yield epoch

    def set_postfix(self, **_: object) -> None:  # the trainer reports its loss to the progress bar
        pass


def _cornac_data(data: str, split: Split):
    """cornac's ``NextItemEvaluation`` over semid's split, with the MiniLM item embeddings as item features."""
    from cornac.data import FeatureModality
    from cornac.eval_methods import NextItemEvaluation

    emb = np.load(Path(data) / "item_emb_minilm.npy").astype(np.float32)  # (N, 384), row i = item i + 1
    train, val, test = cornac_usit(split)
    method = NextItemEvaluation.from_splits(
        train_data=train, val_data=val, test_data=test, fmt="USIT", mode="last", exclude_unknowns=False,
        item_feature=FeatureModality(features=emb, ids=[str(i) for i in range(1, emb.shape[0] + 1)]))
    index_of = method.global_iid_map  # raw id (str) -> cornac item index
    item_of = np.zeros(len(index_of), dtype=np.int64)
    item_of[list(index_of.values())] = [int(k) for k in index_of]
    to_index = np.full(emb.shape[0] + 1, -1, dtype=np.int64)
    to_index[item_of] = np.arange(len(item_of))
    return method, item_of, to_index


def _cornac_fit(model, module, iterator_name: str, method, budget: CpuBudget) -> tuple[int, float, float]:
    """Fits a cornac model under the budget: the module's ``trange`` stops at the budget between epochs and its batch
    iterator ``iterator_name`` stops mid-epoch; the library validates the cut epoch and keeps its best checkpoint."""
    counter = [0]
    original = getattr(module, iterator_name)
    saved_trange = module.trange
    module.trange = _Epochs(budget, counter)
    setattr(module, iterator_name, lambda *a, **k: budget.cut(original(*a, **k)))
    try:
        budget.start()
        model.fit(method.train_set, method.val_set)
        return counter[0], budget.cpu_s, budget.wall_s
    finally:
        module.trange, _ = saved_trange, setattr(module, iterator_name, original)


def _top10_of(scores: np.ndarray, item_of: np.ndarray) -> np.ndarray:
    """(B, N') cornac scores -> (B, 10) semid item ids, best first."""
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
    return item_of[np.take_along_axis(top, order, 1)]


def run_rpg_cornac(data: str, split: Split, budget: CpuBudget, args: argparse.Namespace) -> dict:
    """cornac's RPG with its Beauty recipe (``RPG_BEAUTY_CONFIG``), OPQ codes from the MiniLM item embeddings.

    ``--rpg-scoring exact`` ranks the catalogue with the batched parallel-MTP scores (the library's
    ``_exact_item_scores``, what its validation uses); ``graph`` calls ``score`` per user (graph-guided beam)."""
    import cornac
    import torch
    from cornac.models import RPG
    from cornac.models.rpg import RPG_BEAUTY_CONFIG, recom_rpg

    torch.set_num_threads(1)
    method, item_of, to_index = _cornac_data(data, split)
    cfg = {**RPG_BEAUTY_CONFIG, "device": "cpu", "seed": args.seed, "val_sample": args.val_users,
           "lr_schedule": args.lr_schedule, "scoring": args.rpg_scoring}
    model = RPG(**cfg)
    epochs, cpu_s, wall_s = _cornac_fit(model, recom_rpg, "_rpg_session_iter", method, budget)

    @torch.no_grad()
    def top10(histories: list[np.ndarray]) -> np.ndarray:
        hist = [to_index[h] for h in histories]
        if args.rpg_scoring == "graph":
            return _top10_of(np.stack([model.score(0, h.tolist()) for h in hist]), item_of)
        ids = torch.from_numpy(left_padded(hist, model.max_len, model.pad_idx))
        logits = model.model.next_item_logits(ids, (ids != model.pad_idx).float())  # (B, codebooks, 256)
        return _top10_of(model._exact_item_scores(logits).numpy(), item_of)

    c0, w0 = time.process_time(), time.perf_counter()
    test = rank_test(top10, split, args.test_users or split.num_users, batch=32 if args.rpg_scoring == "graph" else 256)
    keys = ("n_codebook", "codebook_size", "d_model", "n_layer", "n_head", "n_inner", "embd_dropout", "attn_dropout",
            "resid_dropout", "temperature", "learning_rate", "lr_schedule", "warmup_steps", "batch_size", "max_len",
            "scoring", "n_beams", "graph_edges", "val_sample")
    return {"library": f"cornac {cornac.__version__}", "settings": {k: cfg[k] for k in keys}, "epochs": epochs,
            "best_epoch": getattr(model, "best_epoch", None), **_times(cpu_s, wall_s, c0, w0), "test": test}


def run_tiger_cornac(data: str, split: Split, budget: CpuBudget, args: argparse.Namespace) -> dict:
    """cornac's TIGER with the GRID recipe (``GRID_CONFIG``: residual k-means codes from the MiniLM item embeddings,
    4+4-layer T5, constant lr, best epoch on validation), scored by its constrained beam search per user."""
    import cornac
    import torch
    from cornac.models import TIGER
    from cornac.models.tiger import GRID_CONFIG, recom_tiger

    torch.set_num_threads(1)
    method, item_of, to_index = _cornac_data(data, split)
    cfg = {**GRID_CONFIG, "device": "cpu", "seed": args.seed, "val_sample": args.val_users, "n_epochs": 10_000,
           "scoring": "beam", "n_beams": 20}
    model = TIGER(**cfg)
    epochs, cpu_s, wall_s = _cornac_fit(model, recom_tiger, "session_seq_iter", method, budget)

    def top10(histories: list[np.ndarray]) -> np.ndarray:
        return _top10_of(np.stack([model.score(0, to_index[h].tolist()) for h in histories]), item_of)

    c0, w0 = time.process_time(), time.perf_counter()
    test = rank_test(top10, split, args.test_users or split.num_users, batch=64)
    keys = ("tokenizer", "rqvae_num_levels", "rqvae_codebook_size", "d_model", "d_ff", "num_heads", "d_kv",
            "num_enc_layers", "num_dec_layers", "dropout", "max_len", "learning_rate", "weight_decay", "batch_size",
            "lr_schedule", "scoring", "n_beams", "val_sample")
    full = {**model.__dict__, **cfg}
    return {"library": f"cornac {cornac.__version__}", "settings": {k: full[k] for k in keys}, "epochs": epochs,
            "best_epoch": None, **_times(cpu_s, wall_s, c0, w0), "test": test}
