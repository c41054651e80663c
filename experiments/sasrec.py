"""A plain SASRec (Kang & McAuley, 2018), the reference the quality study measures semid against.

    python -m experiments.sasrec --data ../shared/data/beauty --max-time 00:15:00 --out experiments/runs/study/sasrec

``--max-time`` is CPU time of the process by default (``--clock cpu``; one thread: the time it would take alone).

Item-ID embeddings (tied with the output), learned positions, pre-LN causal self-attention blocks written here
(``F.scaled_dot_product_attention``; no ``nn.TransformerEncoder``, whose fast path turns padded rows into NaN), and
a full-softmax cross-entropy over the catalogue at every position. It is trained in the same harness as semid's
causal design: the same leave-one-out split (``semid.split``), the same training windows (every next-item target of
every training sequence, windows of at most ``max_history`` cut from the end, ``training_windows``), the same seeded
1,000 validation users to keep the best epoch, and the test split ranked over the whole catalogue for all users.

``--input codes`` (or ``both``) replaces (or joins) the ID embedding with the sum of the item's semantic-ID code
embeddings (``--ids``): the ablation that measures what semid's input costs.

Shapes: B windows, T positions, D width, N items, L code levels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generator.runs.options import parse_max_time
from generator.training.causal_data import collate_windows, training_windows
from generator.training.sampling import sample_users
from semid.data import load_dataset
from semid.io import write_json
from semid.metrics import RankingMetrics
from semid.split import leave_one_out

INPUTS = ("id", "codes", "both")


class _IdRows:
    """``training_windows`` wants rows of items: for a plain ID model the row of item id i is i - 1."""

    def __init__(self, num_items: int) -> None:
        self.num_items = num_items

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_ids.size and (item_ids.min() < 1 or item_ids.max() > self.num_items):
            raise ValueError(f"item ids must be in [1, {self.num_items}]")
        return item_ids - 1


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D/H)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    """Histories of item rows + 1 (0 = padding, right-padded) -> states (B, T, D); scores = states . item table."""

    def __init__(self, num_items: int, *, d: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.3, input: str = "id", codes: torch.Tensor | None = None) -> None:
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"`input` must be one of {INPUTS}, got {input!r}")
        if input != "id" and codes is None:
            raise ValueError(f"`input` {input!r} needs the items' codes")
        self.input, self.max_len = input, max_len
        self.item = nn.Embedding(num_items + 1, d, padding_idx=0)  # input (input "id"/"both") and output
        nn.init.normal_(self.item.weight, std=d**-0.5)
        if codes is not None:  # (N, L) codes; one embedding table per level, offsets make them one table
            sizes = codes.max(0).values + 1
            offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
            self.register_buffer("code_rows", torch.cat([codes.new_full((1, codes.shape[1]), -1), codes + offsets]))
            self.code = nn.Embedding(int(sizes.sum()) + 1, d)
            nn.init.normal_(self.code.weight, std=d**-0.5)
        self.pos = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        # GPT-2's initialisation, as semid's backbone (transformers.GPT2Model): N(0, 0.02) matrices and positions,
        # the residual projections scaled by 1/sqrt(2 layers); PyTorch's defaults let the blocks' first outputs
        # drown the item vectors, and the model learned several times slower
        for name, p in self.named_parameters():
            if name.startswith("blocks") and p.ndim == 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith(("out.weight", "ff.3.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.startswith("blocks") and name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, rows1: torch.Tensor) -> torch.Tensor:
        B, T = rows1.shape
        x = self.item.weight.new_zeros(B, T, self.item.embedding_dim) if self.input == "codes" else self.item(rows1)
        if self.input != "id":
            c = self.code_rows[rows1]  # (B, T, L); -1 for padding
            x = x + self.code(c.clamp_min(0)).masked_fill((c < 0).unsqueeze(-1), 0.0).sum(-2)
        x = self.drop(x + self.pos(torch.arange(T, device=rows1.device)))
        for block in self.blocks:
            x = block(x)
        return self.ln(x)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., N) over real items (the padding row is not an item)."""
        return h @ self.item.weight[1:].T


def _histories(seqs: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) rows + 1 (item ids are rows + 1) of the last ``max_len`` items, and lengths (B,)."""
    lengths = torch.tensor([min(len(s), max_len) for s in seqs])
    out = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):  # evaluation batch assembly only (not the training hot path)
        out[i, : lengths[i]] = torch.from_numpy(np.asarray(s[-max_len:], dtype=np.int64))
    return out, lengths


@torch.no_grad()
def evaluate(model: SASRec, histories: list[np.ndarray], targets: np.ndarray, batch: int = 256) -> dict[str, float]:
    model.eval()
    metrics = RankingMetrics((5, 10))
    for lo in range(0, len(histories), batch):
        x, lengths = _histories(histories[lo: lo + batch], model.max_len)
        dev = model.item.weight.device
        h = model(x.to(dev))[torch.arange(x.shape[0], device=dev), lengths.to(dev) - 1]  # (B, D)
        top = (model.scores(h).topk(10).indices + 1).cpu()  # item ids
        metrics.update(top, torch.as_tensor(targets[lo: lo + batch]))
    model.train()
    return metrics.compute()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/beauty")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-time", default="00:15:00")
    p.add_argument("--input", choices=INPUTS, default="id")
    p.add_argument("--ids", help="a `semid fit-codebooks` folder (for --input codes/both)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-history", type=int, default=50)
    p.add_argument("--val-users", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the budget in CPU time (default) or wall clock")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    budget = parse_max_time(args.max_time).total_seconds()
    data = load_dataset(args.data)
    split = leave_one_out(data)
    N = data.num_items
    codes = None
    if args.input != "id":
        if not args.ids:
            p.error("--input codes/both needs --ids")
        from semid.ids import SemanticIDs
        ids = SemanticIDs.load(Path(args.ids) / "semantic_ids.npz")
        order = np.argsort(ids.item_ids)  # rows in item-id order (item id i at row i - 1)
        if not np.array_equal(ids.item_ids[order], np.arange(1, N + 1)):
            raise ValueError(f"{args.ids}: the semantic IDs must cover items 1..{N}")
        codes = torch.as_tensor(ids.codes[order], dtype=torch.long)
    dev = torch.device(args.device)
    model = SASRec(N, d=args.d, layers=args.layers, heads=2, max_len=args.max_history, dropout=args.dropout,
                   input=args.input, codes=codes).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    windows = training_windows(split.train, _IdRows(N), args.max_history)
    val_idx = np.sort(sample_users(split.num_users, args.val_users, args.seed))
    val_hist = [split.valid_history(int(i)) for i in val_idx]
    args.out.mkdir(parents=True, exist_ok=True)
    best, best_state, log, epoch, steps = -1.0, None, [], 0, 0
    gen = torch.Generator().manual_seed(args.seed)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t0 = time.perf_counter()
    c0 = clock()
    while clock() - c0 < budget:
        order = torch.randperm(len(windows.start), generator=gen)
        loss_sum = 0.0
        for lo in range(0, len(order), args.batch_size):
            b = collate_windows(windows, order[lo: lo + args.batch_size])
            h = model(b.histories.to(dev))  # (B, T, D)
            real = b.targets.to(dev) >= 0
            loss = F.cross_entropy(model.scores(h[real]), b.targets.to(dev)[real])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            steps += 1
            if clock() - c0 >= budget:
                break
        epoch += 1
        m = evaluate(model, val_hist, split.valid_targets[val_idx])
        log.append({"epoch": epoch, "steps": steps, "train_loss": round(loss_sum / max(1, -(-len(order) // args.batch_size)), 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "budget_clock_s": round(clock() - c0, 1), **m})
        print(json.dumps(log[-1]), flush=True)
        if m["ndcg@10"] > best:
            best, best_state = m["ndcg@10"], {k: v.clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - t0
    model.load_state_dict(best_state)
    test = evaluate(model, [split.test_history(i) for i in range(split.num_users)], split.test_targets)
    result = {"model": "sasrec", "input": args.input, "d": args.d, "layers": args.layers, "dropout": args.dropout,
              "lr": args.lr, "budget_s": budget, "clock": args.clock, "train_s": round(train_s, 1), "epochs": epoch, "steps": steps,
              "threads": args.threads, "test_users": split.num_users, "best_val_ndcg@10": best, "test": test, "log": log}
    write_json(args.out / "result.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
