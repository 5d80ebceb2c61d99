"""Gradient accumulation (issue 16, item 4): k micro-batches, ``loss.backward()`` after
each, one optimizer step after the last.

- The accumulated gradients equal eager's (``compiler="eager"``, a tight budget).
- The budget holds for every micro-batch, including the later ones, which run beside
  the gradients the earlier ones accumulated (Inductor, measured in a process of its own).
- ``optimizer=`` with accumulation is either exact (one update from the accumulated
  gradients) or refused with a ``GraphoptError``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from conftest import ATOL, RTOL, assert_grads_equal

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 3
GPT_DIMS = dict(batch=4, seq=64, n_layers=2, d_model=64, n_heads=2, vocab=128)


def _micro_batches(vocab: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MICRO_BATCHES (tokens, targets) pairs, different from each other."""
    generator = torch.Generator().manual_seed(7)
    return [
        tuple(torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(2)) for _ in range(MICRO_BATCHES)
    ]


def accumulate(model, micro_batches) -> list[torch.Tensor]:
    """``(loss / k).backward()`` per micro-batch, gradients summed in ``.grad``; the losses."""
    losses = []
    for inputs in micro_batches:
        loss = model(*inputs) / len(micro_batches)
        loss.backward()
        losses.append(loss.detach())
    return losses


def test_accumulated_gradients_equal_eager_under_a_tight_budget():
    from examples.gpt import build

    torch.manual_seed(0)
    model, inputs = build(**GPT_DIMS)
    micro_batches = _micro_batches(GPT_DIMS["vocab"], GPT_DIMS["batch"], GPT_DIMS["seq"])
    eager, ours = copy.deepcopy(model), copy.deepcopy(model)

    probe = graphopt.compile(copy.deepcopy(model), compiler="eager")
    probe(*inputs).backward()
    (free_plan,) = graphopt.plans(probe)
    static = sum(free_plan.memory[kind] for kind in ("parameters", "inputs", "gradients"))
    budget = static + (free_plan.predicted_peak_bytes - static) // 2
    torch._dynamo.reset()

    expected = accumulate(eager, micro_batches)
    compiled = graphopt.compile(ours, memory_budget=budget, compiler="eager")
    actual = accumulate(compiled, micro_batches)
    (plan,) = graphopt.plans(compiled)  # one graph, compiled once for all micro-batches
    assert any(decision.action == "recompute" for decision in plan.decisions), plan
    for ours_loss, eager_loss in zip(actual, expected):
        torch.testing.assert_close(ours_loss, eager_loss, rtol=RTOL, atol=ATOL)
    assert_grads_equal(eager, ours)


# An MLP whose gradients (33.6 MB) are large beside its activations, under a budget its
# plan meets for one micro-batch (predicted 109 MB of 120 MB). Micro-batches 2 and 3
# start with the accumulated gradients resident; autograd adds the new ones into them.
_ACCUMULATION_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import graphopt
    from torch import nn

    from tests.compiled_step import MLPLoss

    torch.manual_seed(0)
    width, batch, blocks, budget = 1024, 1024, 8, int(sys.argv[1])
    model = MLPLoss(width, blocks)
    x = torch.randn(batch, width)  # every micro-batch reads the same input: one input resident
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    static = parameter_bytes + x.numel() * x.element_size()
    compiled = graphopt.compile(model, memory_budget=budget)

    def micro_batch():
        (compiled(x) / 3).backward()

    micro_batch()  # warm-up: compiles
    model.zero_grad(set_to_none=True)
    measured = []
    for index in range(3):
        resident_gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        _, peak = graphopt.measure_peak(micro_batch, device="cpu", cpu_method="allocated")
        measured.append(static + resident_gradients + peak.peak_bytes)
    (plan,) = graphopt.plans(compiled)
    print(json.dumps({"budget": budget, "predicted": plan.predicted_peak_bytes, "gradients": parameter_bytes,
                      "measured": measured}))
    """
)
_ACCUMULATION_FIGURES: dict = {}


def _accumulation_figures() -> dict:
    """Measure once (about 20 s) and share the figures between the two tests."""
    if not _ACCUMULATION_FIGURES:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", _ACCUMULATION_MEMORY_SCRIPT, str(120 * 10**6)],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        _ACCUMULATION_FIGURES.update(json.loads(result.stdout.strip().splitlines()[-1]))
        print(_ACCUMULATION_FIGURES)
    return _ACCUMULATION_FIGURES


@pytest.mark.inductor
def test_first_micro_batch_stays_under_the_budget():
    figures = _accumulation_figures()
    assert figures["predicted"] <= figures["budget"], figures
    assert figures["measured"][0] <= figures["budget"], figures


@pytest.mark.inductor
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "gradients alive between backwards are not counted: the plan assumes every .grad is None when the step "
        "starts, so micro-batches 2..k run with 33.6 MB of accumulated gradients beside a plan predicted at "
        "109.1 MB (the first micro-batch measures 109.1 MB) and measure 142.7 MB against the 120 MB budget"
    ),
)
def test_later_micro_batches_stay_under_the_budget():
    figures = _accumulation_figures()
    assert max(figures["measured"][1:]) <= figures["budget"], figures


class _MLPLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "optimizer= with accumulation is neither refused nor exact: each micro-batch's backward runs the "
        "optimizer on that micro-batch's gradient (AdamW state step 3 after 3 micro-batches, parameters 3.5e-2 "
        "from eager's one accumulated step), and no GraphoptError is raised at compile time or later"
    ),
)
def test_optimizer_in_backward_with_accumulation_is_exact_or_refused():
    torch.manual_seed(0)
    eager = _MLPLoss()
    ours = copy.deepcopy(eager)
    eager_optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    our_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    micro_batches = [(torch.randn(8, 16),) for _ in range(MICRO_BATCHES)]
    accumulate(eager, micro_batches)
    eager_optimizer.step()
    try:
        compiled = graphopt.compile(ours, optimizer=our_optimizer, compiler="eager")
        accumulate(compiled, micro_batches)
    except graphopt.GraphoptError as error:  # refused: it must say why
        assert "accumulat" in str(error), error
        return
    steps = {int(state["step"]) for state in our_optimizer.state.values()}
    assert steps == {1}, f"the optimizer stepped {steps} times per parameter for one accumulated step"
    for (name, expected), actual in zip(eager.named_parameters(), ours.parameters()):
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
