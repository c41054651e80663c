"""Exploratory lever: an ensemble's members distil the ensemble's dense softmax into their trees *while* they train
(`semid distill` does it after training, with the backbones fixed).

    python -m experiments.codistill [--temperature 3] [--weight 0.5] -- <experiments.study train arguments>

Each training step of a run with members > 1 computes, without gradients, the softmax at ``temperature`` of the sum
of the members' dense logits over every item (the ensemble's dense head), and trains each member's code head on
``(1 - weight)`` x the true code + ``weight`` x that teacher's mass on the true parent's children (``code_loss``'s
teacher), beside the members' own dense losses, as the default step does. Not in the product: this script replaces
``CausalSystem.training_step`` in its own process and then runs ``experiments.study train`` with the lever
``default+members-4+codistill`` (the four-member default's options).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

import torch

from experiments import study
from generator.models.causal_loss import code_loss, dense_loss
from generator.models.ensemble import member_models
from generator.training import causal_system
from generator.training.causal_system import StepBatch
from semid.io import write_json

LEVER = "default+members-4+codistill"


def codistill_step(temperature: float, weight: float) -> Any:  # noqa: ANN401
    default_step = causal_system.CausalSystem.training_step

    def training_step(self: causal_system.CausalSystem, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: ANN401
        members = member_models(self.model)
        if len(members) == 1 or self.objective != "joint":
            return default_step(self, batch, batch_idx)
        step = batch if isinstance(batch, StepBatch) else self.plan(batch)
        b, real = step.batch, step.real.to(step.batch.targets.device)
        rows = b.targets.flatten()[real]
        hs = [m.hidden(b.histories).flatten(0, 1)[real] for m in members]  # loop over members
        with torch.no_grad():  # the ensemble's dense softmax over every item
            logits = sum(m.dense_queries(h.detach()) @ m.item_vectors().T for m, h in zip(members, hs, strict=True))
            teacher = (logits / temperature).softmax(-1)
        gen = [code_loss(m, m.level_queries(h), m.item_tokens[rows + 1], label_smoothing=self.optim.label_smoothing,
                         teacher=teacher, distill=weight, pairs=step.pairs) for m, h in zip(members, hs, strict=True)]
        dense = [dense_loss(m, h, rows, log_q=self.log_q) for m, h in zip(members, hs, strict=True)]
        total = torch.stack(gen).sum() + self.dense_weight * torch.stack(dense).sum()
        P = rows.numel()
        self.log("train/gen_loss", torch.stack(gen).detach().mean(), batch_size=P)
        self.log("train/dense_loss", torch.stack(dense).detach().mean(), batch_size=P)
        self.log("train/loss", total, prog_bar=True, batch_size=P)
        self.log("train/targets", float(P), reduce_fx="sum", batch_size=1)
        return total

    return training_step


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--weight", type=float, default=0.5)
    args = p.parse_args(argv[:cut])
    causal_system.CausalSystem.training_step = codistill_step(args.temperature, args.weight)
    study.LEVERS[LEVER] = study.LEVERS["default+members-4"]
    rest = argv[cut + 1:]
    study.main(["train", "--lever", LEVER, *rest])
    tag = rest[rest.index("--tag") + 1] if "--tag" in rest else ""
    out = study.STUDY / f"{LEVER}{tag}.json"  # the command that made it is this script's
    record = json.loads(out.read_text())
    record["command"] = "python -m experiments.codistill " + shlex.join(argv)
    write_json(out, record)


if __name__ == "__main__":
    main()
