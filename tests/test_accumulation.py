"""Gradient accumulation (issue 16, item 4): k micro-batches, ``loss.backward()`` after
each, one optimizer step after the last.

- The accumulated gradients equal eager's (``compiler="eager"``, a tight budget).
- The budget holds for every micro-batch, including the later ones, which run beside
  the gradients the earlier ones accumulated (Inductor, measured in a process of its own).
  Declared (``accumulation_steps=3``) the plan counts them from the start; undeclared,
  graphopt finds a ``.grad`` as the second micro-batch starts and plans again.
- ``optimizer=`` with ``accumulation_steps=k`` is exact: one update per k micro-batches,
  from the accumulated gradients.
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


def accumulate(model, micro_batches, k: int | None = None) -> list[torch.Tensor]:
    """``(loss / k).backward()`` per micro-batch (k: their number unless given),
    gradients summed in ``.grad``; the losses."""
    losses = []
    for inputs in micro_batches:
        loss = model(*inputs) / (k or len(micro_batches))
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
    # Half the activations, beside the gradients the earlier micro-batches accumulate.
    budget = static + free_plan.memory["gradients"] + (free_plan.predicted_peak_bytes - static) // 2
    torch._dynamo.reset()

    expected = accumulate(eager, micro_batches)
    compiled = graphopt.compile(ours, memory_budget=budget, compiler="eager", accumulation_steps=MICRO_BATCHES)
    actual = accumulate(compiled, micro_batches)
    (plan,) = graphopt.plans(compiled)  # one graph, compiled once for all micro-batches
    assert any(decision.action == "recompute" for decision in plan.decisions), plan
    for ours_loss, eager_loss in zip(actual, expected):
        torch.testing.assert_close(ours_loss, eager_loss, rtol=RTOL, atol=ATOL)
    assert_grads_equal(eager, ours)


# An MLP whose gradients (33.6 MB) are large beside its activations, under a budget a
# plan leaving them out meets for one micro-batch (predicted 109 MB of 120 MB).
# Micro-batches 2 and 3 start with the accumulated gradients resident; autograd adds
# the new ones into them. argv[2]: "declared" passes accumulation_steps=3; "found"
# does not, so the second warm-up micro-batch finds the .grad and graphopt plans again.
_ACCUMULATION_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import graphopt
    from torch import nn

    from tests.compiled_step import MLPLoss

    torch.manual_seed(0)
    width, batch, blocks, budget, mode = 1024, 1024, 8, int(sys.argv[1]), sys.argv[2]
    model = MLPLoss(width, blocks)
    x = torch.randn(batch, width)  # every micro-batch reads the same input: one input resident
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    static = parameter_bytes + x.numel() * x.element_size()
    steps = {"accumulation_steps": 3} if mode == "declared" else {}
    compiled = graphopt.compile(model, memory_budget=budget, **steps)

    def micro_batch():
        (compiled(x) / 3).backward()

    micro_batch()  # warm-up: compiles
    micro_batch()  # "found": a .grad as it starts, so every graph is planned again
    model.zero_grad(set_to_none=True)
    measured = []
    for index in range(3):
        resident_gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        _, peak = graphopt.measure_peak(micro_batch, device="cpu", cpu_method="allocated")
        measured.append(static + resident_gradients + peak.peak_bytes)
    (plan,) = graphopt.plans(compiled)
    print(json.dumps({"budget": budget, "predicted": plan.predicted_peak_bytes, "gradients": parameter_bytes,
                      "counted": plan.memory.get("accumulated gradients", 0), "measured": measured}))
    """
)
_ACCUMULATION_FIGURES: dict[str, dict] = {}


def _accumulation_figures(mode: str) -> dict:
    """Measure once per mode (about 20 s) in a process of its own."""
    if mode not in _ACCUMULATION_FIGURES:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", _ACCUMULATION_MEMORY_SCRIPT, str(120 * 10**6), mode],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        _ACCUMULATION_FIGURES[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        print(mode, _ACCUMULATION_FIGURES[mode])
    return _ACCUMULATION_FIGURES[mode]


@pytest.mark.inductor
@pytest.mark.parametrize("mode", ["declared", "found"])
def test_every_micro_batch_stays_under_the_budget(mode):
    """Micro-batches 2 and 3 run beside the 33.6 MB the earlier ones left in .grad; the
    plan counts them from the step's start, declared or found."""
    figures = _accumulation_figures(mode)
    assert figures["counted"] == figures["gradients"], figures
    assert figures["predicted"] <= figures["budget"], figures
    assert max(figures["measured"]) <= figures["budget"], figures


class _MLPLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def test_optimizer_in_backward_with_accumulation_is_exact():
    """Two accumulated steps of 3 micro-batches: one AdamW update per step, from the
    summed gradients, as eager's ``opt.step(); opt.zero_grad()`` after 3 backwards."""
    torch.manual_seed(0)
    eager = _MLPLoss()
    ours = copy.deepcopy(eager)
    eager_optimizer = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    our_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    compiled = graphopt.compile(ours, optimizer=our_optimizer, accumulation_steps=MICRO_BATCHES, compiler="eager")
    for _ in range(2):
        micro_batches = [(torch.randn(8, 16),) for _ in range(MICRO_BATCHES)]
        accumulate(eager, micro_batches)
        eager_optimizer.step()
        eager_optimizer.zero_grad(set_to_none=True)
        accumulate(compiled, micro_batches[:-1], MICRO_BATCHES)
        assert all(p.grad is not None for p in ours.parameters()), "the first k-1 micro-batches accumulate in .grad"
        accumulate(compiled, micro_batches[-1:], MICRO_BATCHES)
        assert all(p.grad is None for p in ours.parameters()), "the k-th micro-batch's update consumes .grad"
    steps = {int(state["step"]) for state in our_optimizer.state.values()}
    assert steps == {2}, f"the optimizer stepped {steps} times per parameter for two accumulated steps"
    for (name, expected), actual in zip(eager.named_parameters(), ours.parameters()):
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_optimizer_in_backward_without_accumulation_steps_refuses_a_resident_grad():
    """Undeclared accumulation with optimizer= cannot be told from consecutive steps, but
    a .grad left from elsewhere is refused, and the error names accumulation_steps."""
    model = _MLPLoss()
    compiled = graphopt.compile(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), compiler="eager")
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    with pytest.raises(graphopt.GraphoptError, match="accumulation_steps"):
        compiled(torch.randn(8, 16)).backward()


def test_a_grad_found_at_a_step_start_is_planned_for():
    """Undeclared accumulation under a budget: the second micro-batch finds a .grad, the
    step is planned again with the gradients counted, and the sums equal eager's."""
    torch.manual_seed(0)
    eager = _MLPLoss()
    ours = copy.deepcopy(eager)
    micro_batches = [(torch.randn(8, 16),) for _ in range(MICRO_BATCHES)]
    accumulate(eager, micro_batches)
    compiled = graphopt.compile(ours, memory_budget=10**9, compiler="eager")
    accumulate(compiled, micro_batches)
    (plan,) = graphopt.plans(compiled)
    gradients = sum(p.numel() * p.element_size() for p in ours.parameters())
    assert plan.memory["accumulated gradients"] == gradients, plan.memory
    assert_grads_equal(eager, ours)


def test_torch_compile_backend_refuses_an_unplanned_grad():
    """Through torch.compile(backend="graphopt") nothing can plan again: the budgeted
    graph refuses to run beside a .grad its plan left out, and says what to pass."""
    model = _MLPLoss()
    compiled = torch.compile(model, backend="graphopt", options={"memory_budget": 10**9, "compiler": "eager"})
    x = torch.randn(8, 16)
    compiled(x).backward()
    with pytest.raises(graphopt.GraphoptError, match="accumulation_steps"):
        compiled(x).backward()
    model.zero_grad(set_to_none=True)
    accumulated = torch.compile(
        model, backend="graphopt", options={"memory_budget": 10**9, "compiler": "eager", "accumulation_steps": 2}
    )
    accumulated(x).backward()
    accumulated(x).backward()
