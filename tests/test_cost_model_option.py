"""The `cost_model="measured"` option prices recomputation with times measured here."""

import copy

import torch
from torch import nn

import graphopt


def test_measured_cost_model_plans_and_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the op-time cache goes under ~/.cache
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))
    x = torch.randn(64, 32)
    reference = copy.deepcopy(model)
    reference(x).square().mean().backward()
    compiled = graphopt.compile(model, compiler="eager", cost_model="measured", memory_budget="100MB")
    compiled(x).square().mean().backward()
    assert graphopt.plans(compiled)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
