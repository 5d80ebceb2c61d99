"""Saved plans refuse to misapply: ``graphopt.compile(model, plan=...)`` checks that the
plan was made for this graph (its tensors, their dtypes and shapes, the torch release)
and that its predicted peak fits ``memory_budget``, as a solved plan must."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import graphopt
from examples.gpt import GPT, GPTConfig
from graphopt import BudgetInfeasibleError, PlanMismatchError
from graphopt.config import torch_release
from graphopt import planner
from graphopt.planner import key_tensor, key_value


def _tiny(*, batch: int = 2, layers: int = 2, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=64, d_model=32, n_heads=2, n_layers=layers, seq=16)).to(dtype)
    idx = torch.randint(0, 64, (batch, 16))
    return model, (idx, idx)


def _step(model, inputs, **options):
    """One training step compiled without code generation; the plan it made."""
    torch._dynamo.reset()
    model.zero_grad(set_to_none=True)  # a fresh step: a .grad left over would be planned as accumulated
    compiled = graphopt.compile(model, compiler="eager", hardware="cpu", **options)
    compiled(*inputs).backward()
    (plan,) = graphopt.plans(compiled)
    return plan


def _saved(*, budgeted: bool, **model_settings):
    """A plan for the tiny GPT: torch's min-cut's (no budget) or the solver's (a budget
    10% under min-cut's peak)."""
    model, inputs = _tiny(**model_settings)
    plan = _step(model, inputs)
    if budgeted:
        plan = _step(model, inputs, memory_budget=int(plan.predicted_peak_bytes * 0.9))
        assert plan.method.startswith("milp") and any(d.action == "recompute" for d in plan.decisions)
    return plan


def test_keys_carry_dtype_and_shape_and_the_plan_its_torch():
    plan = _saved(budgeted=False)
    assert plan.torch_version == torch.__version__
    for decision in plan.decisions:
        assert re.fullmatch(r"[a-z0-9]+\[[0-9,]*\]", key_value(decision.key)), decision.key
    up = [d.key for d in plan.decisions if key_tensor(d.key) == "blocks.0.mlp.up: addmm #0"]
    assert up == ["blocks.0.mlp.up: addmm #0 float32[32,128]"]  # batch 2 x seq 16 rows, 4 x 32 wide


@pytest.mark.parametrize("budgeted", [False, True], ids=["min-cut", "solved"])
def test_a_plan_for_another_batch_size_is_refused(budgeted):
    saved = _saved(budgeted=budgeted, batch=2)
    model, inputs = _tiny(batch=8)
    shapes = r"made for other shapes or dtypes .* is float32\[(2|32),\S*\] in the plan and float32\[(8|128),\S*\] here"
    with pytest.raises(PlanMismatchError, match=shapes):
        _step(model, inputs, plan=[saved])


def test_a_plan_for_another_dtype_is_refused():
    saved = _saved(budgeted=True)
    model, inputs = _tiny(dtype=torch.float64)
    with pytest.raises(PlanMismatchError, match=r"made for other shapes or dtypes .*float32\[.* in the plan and float64\["):
        _step(model, inputs, plan=[saved])


@pytest.mark.parametrize("budgeted", [False, True], ids=["min-cut", "solved"])
def test_a_plan_for_fewer_layers_is_refused(budgeted):
    """Its decisions all exist in the deeper graph; what the plan lacks (blocks.2) used
    to be kept silently."""
    saved = _saved(budgeted=budgeted, layers=2)
    model, inputs = _tiny(layers=3)
    with pytest.raises(PlanMismatchError, match=r"has no decision for \d+ of the \d+ tensors .*'blocks\.2\..*fewer layers"):
        _step(model, inputs, plan=[saved])


def test_a_plan_from_another_torch_release_is_refused_at_compile():
    saved = _saved(budgeted=False)
    model, inputs = _tiny()
    with pytest.raises(PlanMismatchError, match=r"made with torch 2\.99\.0, and this is torch"):
        graphopt.compile(model, compiler="eager", hardware="cpu", plan=[dataclasses.replace(saved, torch_version="2.99.0")])
    patch_release = dataclasses.replace(saved, torch_version=f"{torch_release(torch.__version__)}.99")
    assert _step(model, inputs, plan=[patch_release]).method == saved.method  # another patch release applies


def test_a_version_1_plan_file_is_refused(tmp_path):
    old = {**_saved(budgeted=False).to_json(), "schema": "graphopt.plan/1"}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    model, _ = _tiny()
    with pytest.raises(PlanMismatchError, match="saved by an older graphopt .*plan again"):
        graphopt.compile(model, compiler="eager", hardware="cpu", plan=str(path))


@pytest.mark.parametrize("budgeted", [False, True], ids=["min-cut", "solved"])
def test_a_given_plan_over_the_budget_raises_unless_check_budget_is_false(budgeted):
    saved = _saved(budgeted=budgeted)
    budget = int(saved.predicted_peak_bytes * 0.95)
    model, inputs = _tiny()
    with pytest.raises(BudgetInfeasibleError, match="the given plan's predicted peak on graph_0 .*check_budget=False") as error:
        _step(model, inputs, plan=[saved], memory_budget=budget)
    assert error.value.least_peak_bytes == saved.predicted_peak_bytes
    assert error.value.least_budget_bytes >= saved.predicted_peak_bytes > budget

    applied = _step(model, inputs, plan=[saved], memory_budget=budget, check_budget=False)
    assert applied.predicted_peak_bytes == saved.predicted_peak_bytes
    assert applied.assumptions[0] == planner.EAGER_MEMORY  # compiler="eager" under a budget
    (over,) = applied.assumptions[1:]
    assert "applied anyway (check_budget=False)" in over and over in str(applied)


def test_a_given_plan_within_the_budget_is_applied_from_its_json(tmp_path):
    saved = _saved(budgeted=True)
    path = tmp_path / "plan.json"
    path.write_text(saved.dumps())
    assert graphopt.Plan.from_json(json.loads(path.read_text())) == saved
    model, inputs = _tiny()
    applied = _step(model, inputs, plan=str(path), memory_budget=saved.budget_bytes)
    assert applied.method == "given plan"
    assert applied.predicted_peak_bytes == saved.predicted_peak_bytes <= saved.budget_bytes
    assert {(d.key, d.action) for d in applied.decisions} == {(d.key, d.action) for d in saved.decisions}
