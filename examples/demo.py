"""`make demo`: train a small GPT under a memory budget, print the plan and the measured peak.

    python -m examples.demo [--budget 250MB] [--steps 5] [--batch 8]

Run with MALLOC_MMAP_THRESHOLD_=65536 in the environment (the Makefile sets it) so the
CPU peak measurement sees freed tensors leave the process.
"""

from __future__ import annotations

import argparse
import time

import torch

import graphopt
from examples.gpt import build
from graphopt.budget import format_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="250MB", help="peak memory of one training step (default 250MB)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, inputs = build(batch=args.batch)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    compiled = graphopt.compile(model, memory_budget=args.budget)

    print(f"GPT: {parameter_bytes / 4:.0f} parameters ({format_bytes(parameter_bytes)}), batch {args.batch}x512, budget {args.budget}")
    started = time.perf_counter()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss, peak = graphopt.measure_peak(lambda: _step(compiled, inputs))
        optimizer.step()
        label = f"(compile + step {time.perf_counter() - started:.1f} s; the peak includes compiling)" if step == 0 else ""
        print(f"step {step}: loss {loss:.4f}, measured peak {format_bytes(peak.peak_bytes + parameter_bytes)} {label}")
    for plan in graphopt.plans(compiled):
        print(plan)
    budget = graphopt.parse_budget(args.budget)
    measured = peak.peak_bytes + parameter_bytes
    verdict = "within" if measured <= budget else "OVER"
    print(f"measured peak {format_bytes(measured)} (parameters included) is {verdict} the budget {format_bytes(budget)}")


def _step(compiled, inputs) -> float:
    loss = compiled(*inputs)
    loss.backward()
    return loss.item()


if __name__ == "__main__":
    main()
