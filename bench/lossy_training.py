"""Does saving activations as int8 change training? 200 steps of a small GPT, exact vs int8.

    cd <repo root> && python -m bench.lossy_training [--steps 200] [--out bench/results/lossy_training.csv]

Model: ``examples.gpt.build(batch=8, seq=128, n_layers=2, d_model=128, n_heads=4,
vocab=256)``, fp32, CPU, AdamW (lr 1e-3), ``torch.manual_seed(0)``. Data: 8 fixed batches
of a learnable synthetic language (each token is the previous one plus a per-sequence
stride, mod the vocabulary, with 10% of tokens replaced at random), cycled.

Runs, each from the same initial weights and data order:
  exact  ``graphopt.compile(model, memory_budget=B)``: keep / recompute only
  int8   ``graphopt.compile(model, memory_budget=0.9·B, quantize_bits=8)``
where ``B`` is the least budget the exact planner can meet (read from the
``BudgetInfeasibleError`` a 1-byte budget raises), so int8 has to quantize to fit. Both use
``compiler="eager"`` (the graphs graphopt plans, run without code generation: this
measures numerics, not speed). The int8 run is ok when its final loss (mean of the last
10 steps) is within 1% of the exact run's.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import graphopt  # noqa: E402
from examples.gpt import build  # noqa: E402

MODEL = {"batch": 8, "seq": 128, "n_layers": 2, "d_model": 128, "n_heads": 4, "vocab": 256}
NUM_BATCHES = 8
LEARNING_RATE = 1e-3
LAST_STEPS = 10
TOLERANCE = 0.01
CSV_FIELDS = ("config", "steps", "budget_bytes", "quantized_tensors", "first_loss", "final_loss", "relative_to_exact", "ok")


def synthetic_batches(batch: int, seq: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences with a learnable rule (next = previous + stride) and 10% noise."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(NUM_BATCHES):
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        stride = torch.randint(1, 8, (batch, 1), generator=generator)
        tokens = (start + stride * torch.arange(seq + 1)) % vocab
        noise = torch.rand(batch, seq + 1, generator=generator) < 0.1
        tokens = torch.where(noise, torch.randint(0, vocab, (batch, seq + 1), generator=generator), tokens)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def least_exact_budget(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    compiled = graphopt.compile(copy.deepcopy(model), compiler="eager", memory_budget=1)
    try:
        compiled(*batch).backward()
    except graphopt.BudgetInfeasibleError as error:
        return error.least_peak_bytes
    raise AssertionError("a 1-byte budget cannot be met")


def train(model: torch.nn.Module, compiled, batches, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = compiled(*batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(steps: int) -> list[dict]:
    torch.manual_seed(0)
    initial, _ = build(**MODEL)
    batches = synthetic_batches(MODEL["batch"], MODEL["seq"], MODEL["vocab"])
    budget = least_exact_budget(initial, batches[0])
    configs = {"exact": {"memory_budget": budget}, "int8": {"memory_budget": int(budget * 0.9), "quantize_bits": 8}}
    rows, exact_final = [], None
    for name, settings in configs.items():
        torch._dynamo.reset()
        model = copy.deepcopy(initial)
        compiled = graphopt.compile(model, compiler="eager", **settings)
        losses = train(model, compiled, batches, steps)
        final = statistics.mean(losses[-LAST_STEPS:])
        exact_final = final if name == "exact" else exact_final
        quantized = sum(1 for plan in graphopt.plans(compiled) for d in plan.decisions if d.bits is not None)
        relative = final / exact_final - 1
        rows.append(
            {
                "config": name, "steps": steps, "budget_bytes": settings["memory_budget"], "quantized_tensors": quantized,
                "first_loss": losses[0], "final_loss": final, "relative_to_exact": relative,
                "ok": "ok" if abs(relative) <= TOLERANCE else "not-ok",
            }
        )  # fmt: skip
        print(f"{name}: budget {settings['memory_budget']} B, {quantized} quantized tensors, loss {losses[0]:.4f} -> {final:.4f} "
              f"({relative:+.3%} vs exact)", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "lossy_training.csv")
    args = parser.parse_args(argv)
    rows = run(args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
