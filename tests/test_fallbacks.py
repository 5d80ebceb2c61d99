"""Nothing silent: where graphopt cannot know, it says what it assumed (a WARNING once,
and ``plan.assumptions``), raises, or reports the real estimate; ``verbose=True``
prints the planning progress."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import graphopt
from examples.gpt import GPT, GPTConfig
from graphopt import planner, torch_private
from graphopt.cost_models import PROFILES, estimate_node_cost, get_hardware, node_bytes_moved, profile_for_device_name
from graphopt.cost_models import compute
from graphopt.cost_models.compute import flop_count
from graphopt.errors import HardwareError
from graphopt.offline import options_for, with_traced_step


@torch.library.custom_op("graphopt_test::scaled", mutates_args=())
def scaled(x: torch.Tensor) -> torch.Tensor:
    """An op torch has no FLOP formula for (a user's own kernel)."""
    return x * 2


@scaled.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _only(graph_module, target):
    (node,) = [node for node in graph_module.graph.nodes if node.target == target]
    return node


def test_an_op_without_a_flop_formula_is_priced_by_its_bytes():
    hardware = PROFILES["h100"]
    node = _only(make_fx(scaled, tracing_mode="fake")(torch.randn(256, 256)), torch.ops.graphopt_test.scaled.default)
    cost = estimate_node_cost(node, hardware)
    bytes_ms = node_bytes_moved(node) / hardware.memory_bandwidth_bytes_per_s * 1e3
    assert node_bytes_moved(node) == 2 * 256 * 256 * 4
    assert cost.ms == pytest.approx(bytes_ms + hardware.kernel_overhead_ms) and cost.ms > 0
    assert cost.assumption == (
        "graphopt_test.scaled.default has no FLOP formula: priced by the bytes it moves at memory bandwidth, "
        "as if it did no arithmetic"
    )


def test_an_op_whose_flop_formula_fails_is_priced_by_its_bytes(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot read these metas")

    hardware = PROFILES["h100"]
    node = _only(make_fx(torch.mm, tracing_mode="fake")(torch.randn(64, 32), torch.randn(32, 16)), torch.ops.aten.mm.default)
    monkeypatch.setitem(compute.flop_registry, torch.ops.aten.mm, broken)
    assert flop_count(node) == (0.0, "its FLOP formula failed (RuntimeError)")
    cost = estimate_node_cost(node, hardware)
    assert cost.ms == pytest.approx(node_bytes_moved(node) / hardware.memory_bandwidth_bytes_per_s * 1e3 + hardware.kernel_overhead_ms)
    assert cost.assumption.startswith("aten.mm.default its FLOP formula failed (RuntimeError): priced by the bytes")


def test_aten_ops_assume_nothing():
    """Matmuls have formulas; pointwise ops are priced by their bytes by design, not by
    assumption: neither adds noise to the plan."""
    graph_module = make_fx(lambda a, b: (a @ b).relu() * 2, tracing_mode="fake")(torch.randn(8, 4), torch.randn(4, 8))
    costs = [estimate_node_cost(node, PROFILES["h100"]) for node in graph_module.graph.nodes if node.op == "call_function"]
    assert len(costs) == 3 and all(cost.assumption is None for cost in costs)


class _ScaledLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.linear(scaled(x)).sum()  # the weight's gradient reads scaled(x)


def test_an_unpriced_op_is_warned_once_and_recorded_in_the_plan(caplog):
    planner._warn_once.cache_clear()
    plans = []
    for _ in range(2):
        torch._dynamo.reset()
        compiled = graphopt.compile(_ScaledLinear(), compiler="eager", hardware="cpu")
        compiled(torch.randn(32, 64)).backward()
        plans += graphopt.plans(compiled)
    assumption = "graphopt_test.scaled.default has no FLOP formula: priced by the bytes it moves at memory bandwidth, as if it did no arithmetic"
    for plan in plans:
        assert plan.assumptions == (assumption,)
        assert f"  assumed: {assumption}" in str(plan).splitlines()
        assert plan.to_json()["assumptions"] == [assumption]
        assert graphopt.Plan.from_json(plan.to_json()) == plan
    warnings = [r for r in caplog.records if r.name == "graphopt" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [f"graphopt assumed: {assumption}"]


def test_an_unknown_gpu_raises_with_the_profiles_and_how_to_write_one(monkeypatch):
    with pytest.raises(HardwareError) as error:
        profile_for_device_name("NVIDIA L40S", 48 * 2**30)
    message = str(error.value)
    assert "no hardware profile for this GPU ('NVIDIA L40S')" in message
    assert str(sorted(PROFILES)) in message
    assert "hardware=" in message and "HardwareProfile(" in message and "to_json()" in message

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA L40S")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: type("Properties", (), {"total_memory": 48 * 2**30}))
    with pytest.raises(HardwareError, match="no hardware profile for this GPU"):
        get_hardware("auto")
    assert get_hardware("l4") is PROFILES["l4"]  # naming a profile needs no match


def _tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=64, d_model=32, n_heads=2, n_layers=2, seq=16))
    idx = torch.randint(0, 64, (2, 16))
    return model, (idx, idx)


def _budgeted_plan(**options):
    """The tiny GPT planned 10% under torch's min-cut peak: the solver takes min-cut's
    recomputations (priced free) and adds its own."""
    model, inputs = _tiny_gpt()
    compiled = graphopt.compile(model, compiler="eager", hardware="cpu")
    compiled(*inputs).backward()
    (min_cut,) = graphopt.plans(compiled)
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)  # a fresh step: a .grad left over would be planned as accumulated
    compiled = graphopt.compile(model, compiler="eager", hardware="cpu", memory_budget=int(min_cut.predicted_peak_bytes * 0.9), **options)
    compiled(*inputs).backward()
    (plan,) = graphopt.plans(compiled)
    assert plan.method.startswith("milp")
    return plan


def test_min_cut_recomputations_report_their_roofline_time_and_progress_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="graphopt")
    plan = _budgeted_plan()
    reasons = [d.reason for d in plan.decisions]
    assert not any("0.000 ms" in reason for reason in reasons)
    fused = [r for r in reasons if r.startswith("recompute: redone inside a backward kernel as torch's min-cut does (counted 0 ms; ")]
    assert fused and all(r.split("; ")[1].split(" unfused")[0].endswith(" ms") for r in fused)
    logged = [r.getMessage() for r in caplog.records if r.name == "graphopt"]
    assert any(m.startswith("round 1: program budget ") for m in logged)


def test_verbose_prints_the_planning_progress(capsys):
    _budgeted_plan(verbose=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("graphopt: ")]
    assert lines[0].startswith("graphopt: graph_0: torch's min-cut predicts a peak of ")
    assert any(line.startswith("graphopt: round 1: program budget ") and " s so far" in line for line in lines)
    assert lines[-1].startswith("graphopt: graph_0: milp-optimal, predicted peak ") and " planned in " in lines[-1]


def test_a_peak_predicted_without_inductors_code_is_recorded(monkeypatch, caplog):
    def no_wrapper(*args, **kwargs):
        raise RuntimeError("no wrapper here")

    planner._warn_once.cache_clear()
    monkeypatch.setattr(torch_private, "generate_wrapper_code", no_wrapper)
    model, inputs = _tiny_gpt()
    options = options_for(model, hardware="cpu", prediction="code")
    (plan,) = with_traced_step(model, inputs, lambda step: step.plan(options), device=torch.device("cpu"))
    (assumption,) = plan.assumptions
    assert assumption.startswith("the peak is predicted by graphopt's simulation of the graphs")
    assert assumption.endswith("Inductor's generated code could not be read (RuntimeError: no wrapper here)")
    assert f"graphopt assumed: {assumption}" in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
