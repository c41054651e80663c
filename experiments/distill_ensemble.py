"""The quality study's sweep of distilling an ensemble's dense head into its trees (the product form is
`semid distill`, generator/training/distill.py, with the sweep's winner as its defaults: heads only, temperature 3,
weight 0.5, 2 epochs). This script also has what the sweep tried and the product does not: ``--train all`` (every
weight but the code embeddings, each member on its own dense loss too, against a frozen teacher).

    python -m experiments.distill_ensemble --run experiments/runs/study60/default+members-4 --out experiments/runs/distill4
        [--distill 0.5] [--epochs 6] [--lr 5e-4] [--val-users 2000]

Why: in the four-member default the dense head's ranking beats the beam's (test R@10 0.0855 against 0.0820 at 60
CPU-minutes; validation 0.1166 against 0.1086 on 5,000 users), while one member's two heads are level (0.0742 /
0.0733). The members' trees are trained on the one-hot next item; here each level's target becomes ``(1 - distill)``
x the true code + ``distill`` x the ensemble dense softmax's mass on each child of the true parent
(``code_loss(teacher=..., distill=...)``, the mechanism the quality study screened inside training), over Beauty's
training windows only. What is trained: per member the level projections, the head's layer norm, the prefix MLPs,
the code biases and the node vectors; the backbone, the code embeddings (they are also the input) and the dense head
stay as trained, so the states (eval mode, no dropout) are the run's and the teacher is fixed.

Epochs are chosen on ``--val-users`` seeded validation users (exact log-likelihood NDCG@10: the beam's ranking on
these runs, study.md); the best epoch's code heads are written into a copy of the run (``--out``: checkpoints/best.ckpt
replaced, the rest copied), which ``semid evaluate`` then scores on the test split like any run.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
def main(argv: list[str] | None = None) -> None:
    from generator.models.causal_loss import child_counts, code_loss, pair_counts
    from generator.models.checkpoint import safe_load, with_integrity
    from generator.models.ensemble import member_models
    from generator.runs.folder import load_run
    from generator.training.causal_data import collate_windows, eval_batches, split_histories
    from generator.training.datamodules import CausalDataModule
    from generator.training.distill import head_parameters, teacher_softmax, validation_ndcg
    from semid.data import load_dataset
    from semid.split import leave_one_out

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--distill", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0, help="the teacher's softmax temperature (>1: softer)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train", choices=("heads", "all"), default="heads",
                   help="heads: the code heads on the run's fixed states; all: every weight of every member but the "
                        "code embeddings, each member on its own dense loss too (dropout on), the teacher a frozen copy")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-users", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lever", default=None, help="also score the result on all test users (--decoders) and write "
                   "experiments/results/study/LEVER.json for the study's table")
    p.add_argument("--decoders", default="beam,dense")
    p.add_argument("--minutes", type=float, default=60.0, help="the run's training budget, for the study's row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = load_run(args.run)
    model = run.model.eval()
    members = member_models(model)
    split = leave_one_out(load_dataset(run.data_dir))
    dm = CausalDataModule(split, run.ids, max_history=model.config.max_history, batch_size=args.batch_size, val_users=10,
                          seed=args.seed)
    dm.setup()
    vrows = np.sort(np.random.default_rng(args.seed).choice(split.num_users, min(args.val_users, split.num_users), replace=False))
    vh, vt = split_histories(split, "valid", vrows)
    vbatches = eval_batches(vh, vt, run.ids, model.config.max_history, 256)
    counts = child_counts(members[0])

    def validate() -> dict[str, float]:
        return validation_ndcg(model, run.tree, run.ids, vbatches, len(vrows))

    teacher_model = copy.deepcopy(model).eval() if args.train == "all" else model
    for q in teacher_model.parameters():
        q.requires_grad_(args.train == "heads")
    params = (head_parameters(model) if args.train == "heads" else
              [q for m in members for name, q in m.named_parameters() if not name.startswith("code_emb")])
    log_q = None
    if args.train == "all":
        from generator.models.causal_loss import dense_loss
        from generator.models.dense_loss import log_popularity

        log_q = log_popularity(dm.windows.targets[dm.windows.targets >= 0], run.ids.num_items)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    history = [{"epoch": 0, **validate(), "loss": None, "seconds": 0.0}]
    print(json.dumps(history[-1]), flush=True)
    best = (history[0]["ndcg@10"], 0, copy.deepcopy(model.state_dict()))
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        total, steps = 0.0, 0
        for index in dm.train_sampler().batches():
            b = collate_windows(dm.windows, index)
            real = torch.nonzero(b.targets.flatten() >= 0).squeeze(1)
            rows = b.targets.flatten()[real]
            with torch.inference_mode():
                h = teacher_model.hidden(b.histories).flatten(0, 1)[real]  # (P, K * D), eval mode: the run's states
                teacher = teacher_softmax(teacher_model, h, args.temperature)
            h, teacher = h.clone(), teacher.clone()
            pairs = pair_counts(counts, rows)
            if args.train == "heads":
                loss = sum(code_loss(m, m.level_queries(x), m.item_tokens[rows + 1], label_smoothing=args.label_smoothing,
                                     teacher=teacher, distill=args.distill, pairs=pairs)
                           for m, x in zip(members, model._split(h), strict=True))  # loop over members
            else:
                loss = 0.0
                for m in members:  # loop over members, each in training mode (dropout) on its own states
                    m.train()
                    hs = m.hidden(b.histories).flatten(0, 1)[real]
                    loss = loss + code_loss(m, m.level_queries(hs), m.item_tokens[rows + 1], teacher=teacher,
                                            label_smoothing=args.label_smoothing, distill=args.distill, pairs=pairs)
                    loss = loss + dense_loss(m, hs, rows, log_q=log_q)
                    m.eval()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        history.append({"epoch": epoch, **validate(), "loss": total / steps, "seconds": time.time() - start})
        print(json.dumps(history[-1]), flush=True)
        if history[-1]["ndcg@10"] > best[0]:
            best = (history[-1]["ndcg@10"], epoch, copy.deepcopy(model.state_dict()))
    out = Path(args.out)
    shutil.copytree(run.path, out, ignore=shutil.ignore_patterns("metrics_*.json", "hybrid.json"))
    ckpt_path = out / "checkpoints" / "best.ckpt"
    ckpt = safe_load(ckpt_path)
    ckpt["state_dict"] = {f"model.{k}": v for k, v in best[2].items()}
    torch.save(with_integrity(ckpt), ckpt_path)
    for extra in ("last.ckpt", "resume.ckpt"):
        (out / "checkpoints" / extra).unlink(missing_ok=True)
    report = {"run": args.run, "out": str(out), "best_epoch": best[1], "history": history, "options": vars(args),
              "command": "python -m experiments.distill_ensemble " + shlex.join(sys.argv[1:])}
    (out / "distill.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"best_epoch": best[1], "val_ndcg@10": best[0]}), flush=True)
    if args.lever:
        from experiments.study import STUDY
        from generator.runs.evaluate import evaluate_run
        from semid.io import write_json

        rows = []
        for decoder in args.decoders.split(","):
            m = evaluate_run(out, "test", decoder=decoder, num_beams=20, batch_size=256)
            rows.append({"design": args.lever, "minutes": args.minutes, "decoder": decoder, "distill_epochs": best[1],
                         **{k: m[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")}, "users": m["users_evaluated"]})
            print(json.dumps(rows[-1]), flush=True)
        write_json(STUDY / f"{args.lever}.json", {"design": args.lever, "rows": rows, "threads": args.threads,
                                                   "command": report["command"]})


if __name__ == "__main__":
    main()
