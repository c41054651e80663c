"""The real peers, run here beside semid: RecBole's SASRec and cornac's RPG and TIGER ports, on semid's split.

    make peers-venv      # once: .venv-peers/ (torch CPU pinned first, recbole 1.2.1, cornac 3.0.1, ...)
    OMP_NUM_THREADS=1 .venv-peers/bin/python -m experiments.peers --model sasrec-recbole|rpg-cornac|tiger-cornac \
        --data ../shared/data/beauty --max-cpu-time 900

The peers live in their own venv (torch CPU, recbole 1.2.1, cornac 3.0.1 with transformers and faiss-cpu); this
module (RecBole's runner; cornac's are in ``experiments/peers_cornac.py``) imports them only inside the runners, so
its helpers import in semid's venv too (tests/test_peers.py).

Protocol, the same for every peer and the same as semid's (experiments/sasrec.py):
- split: ``semid.split.leave_one_out`` (per user: last item = test target, second-to-last = validation target, the
  rest training; users with < 3 items left out);
- budget: ``--max-cpu-time`` CPU seconds of this process (``time.process_time``), one thread, counted from the start
  of the peer's ``fit`` (so its tokeniser and its validation passes are inside the budget). The libraries take a
  number of epochs; the budget stops them through a hook (see each runner), mid-epoch, as semid's loop does;
- model selection: the library's own best-epoch-on-validation (validation NDCG@10) where it has one;
- test: the full catalogue ranked for every test user (or the first ``--test-users``, for debugging), Recall@K and
  NDCG@K from ``semid.metrics`` on the top 10 item ids.

Shapes: B users, T history positions, N items.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from semid.data import load_dataset
from semid.metrics import RankingMetrics
from semid.split import Split, leave_one_out

log = logging.getLogger(__name__)

MODELS = ("sasrec-recbole", "rpg-cornac", "tiger-cornac")
RESULTS = Path(__file__).parent / "results"


class BudgetSpent(Exception):  # raised by a library callback to end training once the CPU budget is spent
    pass


class CpuBudget:
    """``seconds`` of CPU time of this process (``time.process_time``), counted from ``start()``."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"`seconds` must be positive, got {seconds!r}")
        self.seconds = float(seconds)
        self._c0: float | None = None
        self._w0 = 0.0

    def start(self) -> CpuBudget:
        self._c0, self._w0 = time.process_time(), time.perf_counter()
        return self

    @property
    def cpu_s(self) -> float:
        if self._c0 is None:
            raise ValueError("the budget was not started: call `start()` first")
        return time.process_time() - self._c0

    @property
    def wall_s(self) -> float:  # wall seconds since ``start()``
        return time.perf_counter() - self._w0

    def spent(self) -> bool:  # the budget is used up
        return self.cpu_s >= self.seconds

    def cut(self, batches: Iterable) -> Iterator:
        """Yields ``batches`` until the budget is spent (checked before each batch)."""
        for b in batches:
            if self.spent():
                return
            yield b


def left_padded(histories: list[np.ndarray], max_len: int, pad: int) -> np.ndarray:
    """The last ``max_len`` items of each history, right-aligned in a (B, max_len) int64 matrix filled with ``pad``."""
    out = np.full((len(histories), max_len), pad, dtype=np.int64)
    for i, h in enumerate(histories):  # batch assembly for evaluation, not a training hot path
        h = np.asarray(h[-max_len:], dtype=np.int64)
        if h.size:
            out[i, max_len - h.size:] = h
    return out


def cornac_usit(split: Split) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """cornac's USIT rows (user, session, item, timestamp) for train / validation / test, one session per user.

    Train holds ``sequences[i][:-2]``; validation ``sequences[i][:-1]`` (its last item is the validation target);
    test the whole sequence (its last item is the test target). Timestamps are positions, which keep the order.
    """
    train, val, test = [], [], []
    for u, seq in zip(split.user_ids.tolist(), split.sequences, strict=True):
        rows = [(str(u), str(u), str(int(item)), float(t)) for t, item in enumerate(seq)]
        train += rows[:-2]
        val += rows[:-1]
        test += rows
    return train, val, test


def recbole_inter(split: Split) -> str:
    """The RecBole atomic ``.inter`` file of the split's users: every item with its position as the timestamp, so
    RecBole's own leave-one-out (``LS: valid_and_test``, time-ordered) holds out exactly semid's targets."""
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, seq in zip(split.user_ids.tolist(), split.sequences, strict=True):
        lines += [f"{u}\t{int(item)}\t{t}" for t, item in enumerate(seq)]
    return "\n".join(lines) + "\n"


def _times(cpu_s: float, wall_s: float, c0: float, w0: float) -> dict:
    """Training CPU/wall seconds and the test ranking's, from its start clocks ``c0`` (CPU) and ``w0`` (wall)."""
    return {"train_cpu_s": round(cpu_s, 1), "train_wall_s": round(wall_s, 1),
            "test_cpu_s": round(time.process_time() - c0, 1), "test_wall_s": round(time.perf_counter() - w0, 1)}


def rank_test(top10: Callable[[list[np.ndarray]], np.ndarray], split: Split, users: int, batch: int = 256) -> dict:
    """Recall/NDCG@5/10 of ``top10(histories) -> (B, 10) item ids`` on the test targets of the first ``users`` users."""
    metrics = RankingMetrics((5, 10))
    for lo in range(0, users, batch):
        rows = range(lo, min(lo + batch, users))
        metrics.update(top10([split.test_history(i) for i in rows]), split.test_targets[lo: lo + len(rows)])
    return {**metrics.compute(), "users": metrics.count}


# ---------------------------------------------------------------- RecBole SASRec


def run_sasrec_recbole(data: str, split: Split, budget: CpuBudget, args: argparse.Namespace) -> dict:
    """RecBole's SASRec (CE over the catalogue), its own trainer and best-on-validation checkpoint.

    Budget hook: a ``Trainer`` subclass whose ``_train_epoch`` trains on ``budget.cut(train_data)`` (stops mid-epoch)
    and a ``callback_fn`` (called by ``fit`` after each validation) that raises ``BudgetSpent``; the best checkpoint
    RecBole saved is loaded back. Test: the trained model's ``full_sort_predict`` on semid's test histories.
    """
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.interaction import Interaction
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    # RecBole 1.2.1's Config re-creates numpy 1 aliases from names numpy 2 removed; give it those names
    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if old not in np.__dict__:
            setattr(np, old, new)
    tmp = Path(tempfile.mkdtemp(prefix="peers_recbole_"))
    (tmp / "beauty").mkdir()
    (tmp / "beauty" / "beauty.inter").write_text(recbole_inter(split))
    settings = {"hidden_size": args.d, "inner_size": 4 * args.d, "n_layers": 2, "n_heads": 2,
                "hidden_dropout_prob": args.dropout, "attn_dropout_prob": args.dropout, "loss_type": "CE",
                "learning_rate": args.lr, "train_batch_size": args.batch_size, "MAX_ITEM_LIST_LENGTH": 50}
    config = Config(model="SASRec", dataset="beauty", config_dict={
        **settings, "data_path": str(tmp), "checkpoint_dir": str(tmp / "saved"), "seed": args.seed,
        "reproducibility": True, "use_gpu": False, "worker": 0, "epochs": 10_000, "stopping_step": 10_000,
        "train_neg_sample_args": None, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                                                     "group_by": "user", "mode": "full"},
        "metrics": ["Recall", "NDCG"], "topk": [5, 10], "valid_metric": "NDCG@10", "eval_batch_size": 4096,
        "show_progress": False, "log_wandb": False, "state": "WARNING"})
    init_seed(config["seed"], config["reproducibility"])
    torch.set_num_threads(1)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset)
    epochs, log_rows, best = [0], [], {"score": float("-inf"), "state": None, "epoch": -1}

    class BudgetTrainer(Trainer):
        def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
            epochs[0] = epoch_idx + 1
            return super()._train_epoch(budget.cut(train_data), epoch_idx, loss_func, show_progress)

    def after_validation(epoch_idx: int, valid_score: float) -> None:
        log_rows.append({"epoch": epoch_idx + 1, "val_ndcg@10": float(valid_score), "cpu_s": round(budget.cpu_s, 1)})
        if float(valid_score) > best["score"]:  # the best epoch's weights kept in memory: no checkpoint file is read back
            best.update(score=float(valid_score), epoch=epoch_idx,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        print(json.dumps(log_rows[-1]), flush=True)
        if budget.spent():
            raise BudgetSpent

    cwd = os.getcwd()
    os.chdir(tmp)  # RecBole's trainer writes its tensorboard logs under the working directory
    try:
        trainer = BudgetTrainer(config, model)
        budget.start()
        trainer.fit(train_data, valid_data, verbose=False, saved=False, callback_fn=after_validation)
    except BudgetSpent:
        pass
    finally:
        os.chdir(cwd)
    cpu_s, wall_s = budget.cpu_s, budget.wall_s
    if best["state"] is None:
        raise RuntimeError("RecBole ran no validation within the budget: raise --max-cpu-time")
    model.load_state_dict(best["state"])
    model.eval()
    tokens = dataset.field2id_token[dataset.iid_field]  # internal id -> token (0 is padding)
    to_internal = np.zeros(args.num_items + 1, dtype=np.int64)
    to_internal[tokens[1:].astype(np.int64)] = np.arange(1, len(tokens))
    item_of = np.concatenate([[0], tokens[1:].astype(np.int64)])

    @torch.no_grad()
    def top10(histories: list[np.ndarray]) -> np.ndarray:
        lengths = np.array([min(len(h), 50) for h in histories])
        seq = np.zeros((len(histories), 50), dtype=np.int64)  # left-aligned, as RecBole feeds SASRec
        for i, h in enumerate(histories):
            seq[i, : lengths[i]] = to_internal[np.asarray(h[-50:])]
        inter = Interaction({model.ITEM_SEQ: torch.from_numpy(seq), model.ITEM_SEQ_LEN: torch.from_numpy(lengths)})
        scores = model.full_sort_predict(inter)  # (B, 1 + N) over internal ids
        scores[:, 0] = -torch.inf
        return item_of[scores.topk(10).indices.numpy()]

    c0, w0 = time.process_time(), time.perf_counter()
    test = rank_test(top10, split, args.test_users or split.num_users)
    times = _times(cpu_s, wall_s, c0, w0)
    # a cross-check of the bypass: RecBole's own evaluator on its own test split (all users), same model
    own = {k: float(v) for k, v in trainer.evaluate(test_data, load_best_model=False).items()}
    return {"library": f"recbole {recbole.__version__}", "settings": settings, "epochs": epochs[0],
            "best_epoch": int(best["epoch"]) + 1, **times, "test": test, "recbole_own_test": own, "log": log_rows}


def _runner(model: str) -> Callable:
    if model == "sasrec-recbole":
        return run_sasrec_recbole
    from experiments import peers_cornac  # imports this module: loaded only when asked for

    return {"rpg-cornac": peers_cornac.run_rpg_cornac, "tiger-cornac": peers_cornac.run_tiger_cornac}[model]


# ---------------------------------------------------------------- results


def write_results(name: str, result: dict, out: Path) -> None:
    """Adds ``result`` under ``name`` to ``out``.json and rewrites ``out``.md from every result there."""
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = result
    path.write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "# Peers on Beauty, beside semid",
        "",
        "Real peers run here (`experiments/peers.py`, their own venv): semid's leave-one-out split, one thread, a",
        "budget of CPU seconds of the process (`time.process_time`) from the start of the library's fit (tokeniser and",
        "validation inside), best epoch on validation NDCG@10 by the library, then the full catalogue ranked for the",
        "test users with semid's Recall/NDCG (`semid/metrics.py`). Other processes ran on this 2-core machine (two",
        "one-thread benchmark jobs of the lead), so wall time is above CPU time.",
        "",
        "| peer | library | epochs (cut) | best epoch | train CPU s | train wall s | users | R@5 | N@5 | R@10 | N@10 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.items():
        t = r["test"]
        lines.append(f"| {key} | {r['library']} | {r['epochs']} | {r.get('best_epoch') or ''} | {r['train_cpu_s']} | "
                     f"{r['train_wall_s']} | {t['users']} | {t['recall@5']:.4f} | {t['ndcg@5']:.4f} | "
                     f"{t['recall@10']:.4f} | {t['ndcg@10']:.4f} |")
    lines += ["", "## Settings and commands", ""]
    for key, r in results.items():
        lines += [f"- **{key}**: {json.dumps(r['settings'])}; test ranking {r['test_cpu_s']} CPU s / "
                  f"{r['test_wall_s']} wall s.", f"  `{r['command']}`"]
        if r.get("note"):
            lines.append(f"  {r['note']}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _python() -> str:
    """The interpreter that ran, as the command line names it: relative where it is under this folder (the peers' venv
    from ``make peers-venv``, ``.venv-peers/bin/python``), else its path."""
    path = Path(sys.executable)
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--data", default="../shared/data/beauty")
    p.add_argument("--max-cpu-time", type=float, default=900.0, help="training budget in CPU seconds (default 900)")
    p.add_argument("--test-users", type=int, default=0, help="rank only the first N test users (0: all)")
    p.add_argument("--val-users", type=int, default=1000, help="validation users for cornac's best epoch")
    p.add_argument("--d", type=int, default=64, help="SASRec width")
    p.add_argument("--dropout", type=float, default=0.5, help="SASRec dropout (RecBole's default 0.5)")
    p.add_argument("--lr", type=float, default=1e-3, help="SASRec learning rate")
    p.add_argument("--batch-size", type=int, default=2048, help="SASRec batch (RecBole's default 2048)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant", help="RPG's schedule")
    p.add_argument("--rpg-scoring", choices=("exact", "graph"), default="exact")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--name", help="the row's name in the results (default: --model)")
    p.add_argument("--note", default="", help="a line about this run for the results (e.g. what it did not reach)")
    p.add_argument("--out", type=Path, default=RESULTS / "peers", help="results path without suffix")
    args = p.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        p.error("run with OMP_NUM_THREADS=1 (one thread, as semid is measured)")
    if args.test_users < 0:
        p.error(f"--test-users must be >= 0, got {args.test_users}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dataset = load_dataset(args.data)
    split = leave_one_out(dataset)
    args.num_items = dataset.num_items
    budget = CpuBudget(args.max_cpu_time)
    result = _runner(args.model)(args.data, split, budget, args)
    result.update(budget_cpu_s=args.max_cpu_time, threads=1, note=args.note,
                  command=f"OMP_NUM_THREADS=1 {_python()} -m experiments.peers " + " ".join(
                      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
    write_results(args.name or args.model, result, args.out)


if __name__ == "__main__":
    main()
