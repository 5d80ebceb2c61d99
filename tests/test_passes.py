"""The pass pipeline (graphopt/passes/__init__.py): declared in order, one pass per file,
named by disable_passes= and by every plan."""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch
from torch import nn

import graphopt
from graphopt.passes import DISABLED, PASS_NAMES, PIPELINE, PassRun

PASSES_DIR = pathlib.Path(graphopt.__file__).parent / "passes"
INPUTS = (torch.randn(128, 32, generator=torch.Generator().manual_seed(0)),)


class _Loss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 32)) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).square().mean()


def _plan(sgd: bool = False, **settings) -> graphopt.Plan:
    torch.manual_seed(0)
    model = _Loss()
    if sgd:
        settings["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = graphopt.compile(model, compiler="eager", **settings)
    compiled(*INPUTS).backward()
    (plan,) = graphopt.plans(compiled)
    return plan


def test_each_pass_is_the_function_of_a_file_of_its_name():
    files = {path.stem for path in PASSES_DIR.glob("*.py")} - {"__init__"}
    assert files == set(PASS_NAMES), "one pass per file, each in PIPELINE"
    for graph_pass in PIPELINE:
        module = importlib.import_module(f"graphopt.passes.{graph_pass.name}")
        assert callable(getattr(module, graph_pass.name)), graph_pass.name
    # The ops the passes insert live in graphopt/ops/, not beside the passes.
    assert not [path.name for path in PASSES_DIR.glob("*.py") if "@torch.library" in path.read_text()]


def test_disable_passes_refuses_unknown_passes_and_those_an_option_needs():
    model = _Loss()
    with pytest.raises(graphopt.GraphoptError, match=r"unknown pass\(es\) \['reorder'\]; the passes, in order: \['chunk_loss'"):
        graphopt.compile(model, disable_passes=["reorder"])
    with pytest.raises(graphopt.GraphoptError, match="prune_frozen carries out trainable="):
        graphopt.compile(model, trainable="body.0.*", disable_passes=["prune_frozen"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(graphopt.GraphoptError, match="place_updates carries out optimizer="):
        graphopt.compile(model, optimizer=optimizer, disable_passes=["place_updates"])
    with pytest.raises(graphopt.GraphoptError, match="reorder=True asks for the reorder_graph pass"):
        graphopt.compile(model, reorder=True, disable_passes=["reorder_graph"])


def test_the_plan_lists_the_passes_that_ran_in_order_and_those_disabled():
    plan = _plan(sgd=True, reorder=True)
    assert [run.name for run in plan.passes] == ["insert_updates", "place_updates", "reorder_graph"]
    assert plan.passes[0] == PassRun("insert_updates", "12 updates")
    assert "  passes: insert_updates (12 updates), place_updates, reorder_graph (saves " in str(plan)

    plan = _plan(memory_budget="1GB", disable_passes=["hoist_prefetches", "chunk_loss", "lower_saves"])
    assert plan.method == "torch-min-cut"
    assert plan.passes == tuple(PassRun(name, DISABLED) for name in ("chunk_loss", "lower_saves", "hoist_prefetches"))
    assert graphopt.Plan.from_json(plan.to_json()).passes == plan.passes


def test_without_lower_saves_the_program_only_keeps_or_recomputes():
    def least_budget(**settings) -> int:
        with pytest.raises(graphopt.BudgetInfeasibleError) as error:
            _plan(memory_budget=1, **settings)
        return error.value.least_budget_bytes

    exact = least_budget()
    assert least_budget(allow_lossy=True) < exact  # quantized copies reach lower
    assert least_budget(allow_lossy=True, disable_passes=["lower_saves"]) == exact
    plan = _plan(memory_budget=exact, allow_lossy=True, disable_passes=["lower_saves"])
    assert {d.action for d in plan.decisions} <= {"keep", "recompute"}
    assert PassRun("lower_saves", DISABLED) in plan.passes
