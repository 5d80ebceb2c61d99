"""A step with a graph break between the halves of a GPT's blocks, under a budget, step by step.

    cd <repo root> && MALLOC_MMAP_THRESHOLD_=65536 python -m bench.graph_breaks \\
        [--fraction 0.6] [--steps 4] [--batch 4] [--seq 256] [--compiler inductor] \\
        [--out bench/results/graph_breaks.csv]

The model is ``examples.gpt`` (4 layers, d 256) with ``torch._dynamo.graph_break()``
between blocks 2 and 3, so Dynamo compiles two graphs per step. The budget is the
parameters and inputs plus ``--fraction`` of eager's measured step peak above them.
Each step's peak is measured on CPU as what the allocator holds above the step's start
(``graphopt.measure_peak(cpu_method="allocated")``: tensors only, so the first step's
compilation does not count), plus the parameters and inputs; each step is timed whole
(the first includes compiling).

Configurations, each from the same weights, in this process:

  eager       the model as it is.
  first-step  ``graphopt.compile(model, memory_budget=...)``: the graph compiled at the
              break leaves the later one the most room it can in the first step, and the
              step is planned again after it (docs/design.md, "Graph breaks").
  rerun       the same, with the break hidden from graphopt (``torch_private.
              compiled_at_graph_break`` answering False): the first graph is planned as if
              it were the step's last; when the second does not fit beside it, the call
              is planned again and rerun, its forwards run twice (before this change).

For each graphopt step: the measured peak against the budget, the predicted peaks, the
room the first graph leaves, how many times graphopt planned the step again, and the loss
against eager's (same weights, same inputs, no dropout).
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as functional
from torch import nn

import graphopt
from graphopt import torch_private
from graphopt.budget import format_bytes

MEGABYTE = 1_000_000


class BrokenGPT(nn.Module):
    """``examples.gpt.GPT``'s forward with a graph break between the halves of its blocks
    (not inside the loop over them, which would make Dynamo run the whole frame eagerly)."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gpt = self.gpt
        half = len(gpt.blocks) // 2
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = gpt.token_embedding(idx) + gpt.position_embedding(positions)
        for block in gpt.blocks[:half]:
            x = block(x)
        torch._dynamo.graph_break()
        for block in gpt.blocks[half:]:
            x = block(x)
        logits = gpt.lm_head(gpt.final_norm(x))
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _Replans(logging.Handler):
    """Counts graphopt's log lines saying it plans every graph again."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "planning every graph again" in record.getMessage():
            self.count += 1


@contextmanager
def _break_hidden(hidden: bool):
    """Have graphopt see no graph as compiled at a break (the behaviour before it could)."""
    original = torch_private.compiled_at_graph_break
    if hidden:
        torch_private.compiled_at_graph_break = lambda graph_module: False
    try:
        yield
    finally:
        torch_private.compiled_at_graph_break = original


def _step(model, inputs, parameters) -> tuple[float, int, float]:
    """One training step: (loss, peak bytes above its start, seconds)."""
    for parameter in parameters:
        parameter.grad = None
    started = time.perf_counter()

    def run() -> float:
        loss = model(*inputs)
        loss.backward()
        return loss.item()

    loss, peak = graphopt.measure_peak(run, device="cpu", cpu_method="allocated")
    return loss, peak.peak_bytes, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fraction", type=float, default=0.6, help="of eager's step peak above the parameters and inputs")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/graph_breaks.csv"))
    args = parser.parse_args(argv)

    from examples.gpt import build

    torch.manual_seed(0)
    gpt, inputs = build(batch=args.batch, seq=args.seq)
    original = BrokenGPT(gpt)
    resident = sum(t.numel() * t.element_size() for t in [*original.parameters(), *inputs])
    eager = copy.deepcopy(original)
    eager_losses, eager_peak = [], 0
    for _ in range(2):
        loss, peak, _ = _step(eager, inputs, list(eager.parameters()))
        eager_losses.append(loss)
        eager_peak = max(eager_peak, peak)
    budget = resident + int(args.fraction * eager_peak)
    print(f"eager: step peak {format_bytes(resident + eager_peak)} (parameters and inputs {format_bytes(resident)}); "
          f"budget {format_bytes(budget)} = them + {args.fraction} x eager's peak above them", flush=True)

    replans = _Replans()
    logging.getLogger("graphopt").addHandler(replans)
    logging.getLogger("graphopt").setLevel(logging.INFO)
    rows = [{"config": "eager", "step": 1, "budget_mb": budget / MEGABYTE, "measured_mb": (resident + eager_peak) / MEGABYTE,
             "loss": eager_losses[0]}]
    for config in ("first-step", "rerun"):
        torch._dynamo.reset()
        model = copy.deepcopy(original)
        replans.count = 0
        with _break_hidden(config == "rerun"):
            compiled = graphopt.compile(model, memory_budget=budget, compiler=args.compiler)
            for step in range(1, args.steps + 1):
                loss, peak, seconds = _step(compiled, inputs, list(model.parameters()))
                plans = graphopt.plans(compiled)
                row = {
                    "config": config, "step": step, "budget_mb": budget / MEGABYTE,
                    "measured_mb": (resident + peak) / MEGABYTE,
                    "predicted_mb": max(p.predicted_peak_bytes for p in plans) / MEGABYTE,
                    "room_mb": plans[0].memory.get("room for later graphs", 0) / MEGABYTE,
                    "recomputed": sum(d.action == "recompute" for p in plans for d in p.decisions),
                    "added_ms": sum(p.predicted_added_ms for p in plans),
                    "replans_so_far": replans.count, "seconds": seconds, "loss": loss,
                    "loss_vs_eager": abs(loss - eager_losses[0]) if step == 1 else "",
                }
                rows.append(row)
                print(f"{config} step {step}: measured {row['measured_mb']:.1f} MB of {budget / MEGABYTE:.1f} MB "
                      f"(predicted {row['predicted_mb']:.1f}), room {row['room_mb']:.1f} MB, "
                      f"{row['recomputed']} recomputed, {row['added_ms']:.2f} ms added, replans so far "
                      f"{replans.count}, {seconds:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[1]))
        writer.writeheader()
        writer.writerows(rows)
    over = [row for row in rows[1:] if row["measured_mb"] > row["budget_mb"]]
    print(f"wrote {args.out}; {len(over)} graphopt step(s) measured over the budget")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
