"""Planning a deep model from 3 of its repeated blocks (graphopt/blocks.py), and applying
a saved plan to a compiled model (``graphopt.compile(..., plan=...)``)."""

from __future__ import annotations

import pytest
import torch

import graphopt
from examples.gpt import GPT, GPTConfig
from graphopt import BudgetInfeasibleError, PlanMismatchError
from graphopt.blocks import find_repeated_blocks, with_blocks
from graphopt.offline import options_for, plan_model, planning_device, with_planner
from graphopt.cost_models import get_hardware

DEEP_GPT = GPTConfig(vocab=64, d_model=32, n_heads=2, n_layers=6, seq=32)


def _deep_gpt(device: str = "meta"):
    with torch.device(device):
        model = GPT(DEEP_GPT)
        idx = torch.zeros(4, DEEP_GPT.seq, dtype=torch.long)
    return model, (idx, idx)


def _plan(model, inputs, *, compose: bool, **settings):
    options = options_for(model, hardware="cpu", reorder=False, **settings)
    device = planning_device(get_hardware("cpu"))
    return with_planner(model, inputs, lambda step: step.plan(options), device=device, compose=compose)


def test_finds_the_repeated_blocks_and_shallow_copies_keep_the_model_intact():
    model, _ = _deep_gpt()
    blocks = find_repeated_blocks(model)
    assert (blocks.path, blocks.count, blocks.kind) == ("blocks", 6, "Block")
    three = with_blocks(model, blocks, 3)
    assert len(three.blocks) == 3 and three.blocks[2] is model.blocks[2]
    assert len(model.blocks) == 6 and three.token_embedding is model.token_embedding
    assert find_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) is None


def test_composed_plan_predicts_what_planning_the_whole_model_does():
    model, inputs = _deep_gpt()
    (composed,) = _plan(model, inputs, compose=True)
    (whole,) = _plan(model, inputs, compose=False)
    assert composed.method.endswith("composed from 3 of 6 blocks")
    assert composed.predicted_peak_bytes == whole.predicted_peak_bytes
    assert {(d.key, d.action, d.bytes) for d in composed.decisions} == {(d.key, d.action, d.bytes) for d in whole.decisions}
    assert composed.predicted_added_ms == pytest.approx(whole.predicted_added_ms)
    assert max(composed.timeline_bytes) == composed.predicted_peak_bytes


def test_an_infeasible_budget_reports_the_whole_model_least_budget():
    """Composing repeats one block's decisions; the whole model's program may vary them
    block by block and reach a lower peak (26% lower here), so a budget below what
    composing reaches is judged on the whole model."""
    model, inputs = _deep_gpt()
    least = []
    for compose in (True, False):
        with pytest.raises(BudgetInfeasibleError) as error:
            _plan(model, inputs, compose=compose, memory_budget=1000)
        least.append(error.value.least_peak_bytes)
    composed, whole = least
    assert composed == whole


def test_a_budget_composing_cannot_fit_snugly_is_planned_on_the_whole_model():
    """Somewhere below the no-budget peak, repeating one block's decisions cannot fit
    the budget snugly (the knob moves whole blocks at a time); there the plan is the
    whole model's."""
    model, inputs = _deep_gpt()
    (baseline,) = _plan(model, inputs, compose=False)
    for percent in range(99, 80, -2):
        budget = baseline.predicted_peak_bytes * percent // 100
        (composed,) = _plan(model, inputs, compose=True, memory_budget=budget)
        if "composed" not in composed.method:
            break
    else:
        pytest.fail("composing fit every budget from 99% to 81% of the no-budget peak snugly")
    (whole,) = _plan(model, inputs, compose=False, memory_budget=budget)
    assert composed.predicted_peak_bytes == whole.predicted_peak_bytes <= budget * 0.95
    assert composed.predicted_added_ms == pytest.approx(whole.predicted_added_ms)


def test_the_budget_table_and_its_baseline_come_from_one_trace():
    """`graphopt plan` without a budget finds the least budget on the whole model's
    trace; the table's plans come from that trace, and so must the baseline line (a
    composed baseline disagreed with the table's min-cut row by 0.5% on llama7b)."""
    from graphopt.cli import pareto

    model, inputs = _deep_gpt()
    options = options_for(model, hardware="cpu", reorder=False)
    result = with_planner(model, inputs, lambda step: pareto(step, options), device=planning_device(get_hardware("cpu")), compose=True)
    (baseline,) = result["plans"]
    (top,) = result["pareto"][-1]["plans"]
    assert "composed" not in baseline.method and "composed" not in top.method
    assert baseline.predicted_peak_bytes == top.predicted_peak_bytes


def _tiny(device: str = "cpu", seq: int = 16):
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(GPTConfig(vocab=64, d_model=32, n_heads=2, n_layers=2, seq=seq))
        idx = torch.randint(0, 64, (2, seq))
    return model, (idx, idx)


def test_a_saved_plan_is_applied_by_compile_with_eager_gradients(tmp_path):
    model, inputs = _tiny()
    (saved,) = plan_model(model, inputs, memory_budget="300KB", hardware="cpu")
    assert any(d.action == "recompute" for d in saved.decisions)
    path = tmp_path / "plan.json"
    path.write_text(saved.dumps())

    reference = GPT(model.config)
    reference.load_state_dict(model.state_dict())
    reference(*inputs).backward()
    compiled = graphopt.compile(model, plan=str(path), compiler="eager", hardware="cpu", fullgraph=True)
    compiled(*inputs).backward()
    (applied,) = graphopt.plans(compiled)
    assert applied.method == "given plan"
    assert {(d.key, d.action) for d in applied.decisions} == {(d.key, d.action) for d in saved.decisions}
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_plan_for_other_shapes_is_refused():
    model, inputs = _tiny(seq=16)
    (saved,) = plan_model(model, inputs, memory_budget="300KB", hardware="cpu")
    other, other_inputs = _tiny(seq=8)
    other.blocks = torch.nn.ModuleList(list(other.blocks)[:1])  # one block: keys of blocks.1 are missing
    compiled = graphopt.compile(other, plan=[saved], compiler="eager", hardware="cpu")
    with pytest.raises(PlanMismatchError, match="does not match graph_0"):
        compiled(*other_inputs)


def test_plan_option_rejects_what_is_not_a_plan(tmp_path):
    model, _ = _tiny()
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    with pytest.raises(graphopt.GraphoptError, match="not a graphopt plan"):
        graphopt.compile(model, plan=str(bad))
    with pytest.raises(graphopt.GraphoptError, match="cannot read the plan"):
        graphopt.compile(model, plan=str(tmp_path / "missing.json"))
    with pytest.raises(graphopt.GraphoptError, match="plan= takes"):
        graphopt.compile(model, plan=42)
