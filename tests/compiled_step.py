"""One budgeted graphopt step measured against eager, shared by the Inductor test scripts
(tests/test_inductor.py runs them in subprocesses with this repository on PYTHONPATH)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

import graphopt


def measure_compiled_step(model: torch.nn.Module, inputs: Sequence[torch.Tensor], budget: int) -> dict:
    """Compile `model` under `budget`, run one warm-up step and one measured step (the
    allocator's peak plus parameters and inputs), and compare its gradients with an
    eager copy's (Inductor's fused sums: 1e-4 relative)."""
    reference = copy.deepcopy(model)
    static = sum(t.numel() * t.element_size() for t in [*model.parameters(), *inputs])
    compiled = graphopt.compile(model, memory_budget=budget)

    def step() -> None:
        compiled(*inputs).backward()

    step()
    model.zero_grad(set_to_none=True)
    _, peak = graphopt.measure_peak(step, device="cpu", cpu_method="allocated")
    (plan,) = graphopt.plans(compiled)
    reference(*inputs).backward()
    grads_equal = all(
        torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-5) for p, r in zip(model.parameters(), reference.parameters())
    )
    return {
        "budget": budget,
        "predicted": plan.predicted_peak_bytes,
        "measured": peak.peak_bytes + static,
        "recomputed": sum(d.action == "recompute" for d in plan.decisions),
        "grads_equal": grads_equal,
    }


class MLPLoss(nn.Module):
    """Linear-GELU blocks with the loss inside the model, so the compiled graph is the whole step."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).square().mean()


class SquaredLogits(nn.Module):
    """A GPT whose loss is its logits' mean square. (With a cross-entropy loss graphopt's
    loss chunking reads the token count as an int, which specializes the sequence length:
    every length then compiles for itself, and no graph is symbolic.)"""

    def __init__(self, seq: int = 128, **dims: int):
        super().__init__()
        from examples.gpt import build

        self.gpt, _ = build(seq=seq, **dims)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt(tokens).square().mean()
