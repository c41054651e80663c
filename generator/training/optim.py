"""The optimiser every design trains with: AdamW with warmup and a schedule (:class:`OptimConfig`,
:func:`adamw_schedule`), and its lazy form for tables with sparse gradients (:class:`LazyAdamW`).

Lazy AdamW: with ``CausalConfig.sparse_tables`` the item table and the node-vector tables get sparse gradients (``F.embedding(...,
sparse=True)``): the rows of the step's inputs, targets and sampled negatives. A dense optimiser would still read and
write all N rows of each table and of its two moment buffers every step (at 1M items, most of a training step).
:class:`LazyAdamW` keeps AdamW's update for dense gradients (decoupled weight decay, bias-corrected moments; the
same arithmetic as ``torch.optim.AdamW``) and for a sparse gradient applies it to the touched rows alone ("lazy"
Adam, as TensorFlow's LazyAdam and ``torch.optim.SparseAdam``): an untouched row keeps its value and moments (no
decay while it is not seen), and the bias correction follows the parameter's step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from generator.models.config import is_plain_int


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to ``lr`` over ``warmup_steps``, then ``schedule``: "inverse-sqrt" decay (TIGER, T5),
    "constant" (SASRec's Adam at a fixed rate) or "cosine" (half a cosine from the peak to 0 over the run's budget).
    ``cooldown``: over the last fraction of the budget the rate also falls linearly to 0, whatever the schedule.
    "cosine" and a cooldown follow the budget's progress (``needs_budget``; :func:`lr_factor`)."""

    lr: float = 2e-3
    warmup_steps: int = 500
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    label_smoothing: float = 0.1
    schedule: str = "inverse-sqrt"
    cooldown: float = 0.0

    @property
    def needs_budget(self) -> bool:
        """Whether the rate follows the share of the budget spent (then a run needs a budget to spend)."""
        return self.schedule == "cosine" or self.cooldown > 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"`lr` must be a finite number > 0, got {self.lr!r}")
        if not is_plain_int(self.warmup_steps) or self.warmup_steps < 0:  # (saved with the run: no numpy, no bool)
            raise ValueError(f"`warmup_steps` must be a non-negative int, got {self.warmup_steps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing!r}")
        if isinstance(self.cooldown, bool) or not isinstance(self.cooldown, (int, float)) or not 0.0 <= self.cooldown <= 1.0:
            raise ValueError(f"`cooldown` must be a fraction of the budget in [0, 1], got {self.cooldown!r}")


SCHEDULES = ("inverse-sqrt", "constant", "cosine")


def lr_factor(step: int, warmup_steps: int, schedule: str = "inverse-sqrt", progress: float = 0.0,
              cooldown: float = 0.0) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based), with ``progress`` the share of the run's budget
    spent (0..1, :class:`generator.training.callbacks.BudgetProgress`): linear warmup, then sqrt(warmup / step)
    ("inverse-sqrt"), 1 ("constant") or (1 + cos(pi * progress)) / 2 ("cosine"); times (1 - progress) / cooldown
    over the budget's last ``cooldown`` share."""
    step, progress = step + 1, min(max(float(progress), 0.0), 1.0)
    if warmup_steps and step < warmup_steps:
        factor = step / warmup_steps
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "constant" or warmup_steps == 0:
        factor = 1.0
    else:
        factor = math.sqrt(warmup_steps / step)
    if cooldown > 0 and progress > 1.0 - cooldown:
        factor *= (1.0 - progress) / cooldown
    return factor


def adamw_schedule(module: torch.nn.Module, optim: OptimConfig, *, lazy: bool = False) -> dict[str, Any]:
    """Lightning's optimiser config: AdamW (matrices decayed, vectors and layer-norm scales not) with
    :func:`lr_factor`'s warmup and schedule, stepped every optimiser step; the budget's progress is read from
    ``module.budget_progress`` (set by :class:`generator.training.callbacks.BudgetProgress`; 0 without one).
    ``lazy``: the tables with sparse gradients update only the rows a step touches (:class:`LazyAdamW`)."""
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (LazyAdamW if lazy else torch.optim.AdamW)(groups, lr=optim.lr, betas=optim.betas)
    warmup = optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(
        step, warmup, optim.schedule, getattr(module, "budget_progress", 0.0), optim.cooldown))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LazyAdamW(torch.optim.Optimizer):
    """AdamW for dense gradients, lazy AdamW for sparse ones (module doc). Arguments as ``torch.optim.AdamW``'s."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not lr > 0 or not eps > 0 or not weight_decay >= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"LazyAdamW needs lr > 0, eps > 0, weight_decay >= 0 and betas in [0, 1), got lr {lr!r}, "
                             f"eps {eps!r}, weight_decay {weight_decay!r}, betas {betas!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # loop over groups and parameters (tens), not rows
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                step_size, bc2_sqrt = lr / (1 - b1**t), math.sqrt(1 - b2**t)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.grad.is_sparse:
                    g = p.grad.coalesce()
                    rows, values = g.indices()[0], g.values()
                    w, m_rows, v_rows = p[rows], m[rows], v[rows]
                    w.mul_(1 - lr * wd)
                    m_rows.lerp_(values, 1 - b1)
                    v_rows.mul_(b2).addcmul_(values, values, value=1 - b2)
                    w.addcdiv_(m_rows, (v_rows.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
                    p[rows], m[rows], v[rows] = w, m_rows, v_rows
                else:
                    g = p.grad
                    p.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
        return loss


def parse_max_time(text: str | None, name: str = "max_time") -> timedelta | None:
    """"HH:MM:SS" or "DD:HH:MM:SS" -> timedelta (``name``: the option, for the error)."""
    if text is None:
        return None
    parts = str(text).split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (3, 4) or any(n < 0 for n in nums):
        raise ValueError(f"`{name}` must be HH:MM:SS or DD:HH:MM:SS, got {text!r}")
    d, h, m, s = ([0] * (4 - len(nums))) + nums
    if m >= 60 or s >= 60:
        raise ValueError(f"`{name}` must be HH:MM:SS or DD:HH:MM:SS, got {text!r}")
    return timedelta(days=d, hours=h, minutes=m, seconds=s)
