"""Quantized saving: the format's numerics, the error model, the program's choices
(synthetic problems, no torch graphs), and end-to-end training steps (compiler="eager",
one Inductor test)."""

import copy
import dataclasses
import functools

import pytest
import torch
from torch import nn

import graphopt
from graphopt.alternatives import AlternativePricer, Lifetime
from graphopt.cost_models import get_hardware
from graphopt.passes.quantize import dequantize, quantize, quantized_bytes, relative_squared_error
from graphopt.problem import KEEP, QUANTIZE, RECOMPUTE, Alternative, Candidate, Problem, evaluate, memory_timeline
from graphopt.solver import greedy, solve

from conftest import assert_same_training_step, training_step

MB = 2**20


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(1000,), (8, 130), (4, 64, 32)])
def test_round_trip_error_matches_the_model(bits, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    codes, scales = quantize(x, bits, x.numel())
    restored = dequantize(codes, scales, bits, x.shape, x.dtype)
    assert restored.shape == x.shape and restored.dtype == x.dtype
    assert codes.numel() * codes.element_size() + scales.numel() * scales.element_size() == quantized_bytes(x.numel(), bits)
    measured = ((x - restored) ** 2).sum() / (x**2).sum()
    # Gaussian values: the model's range estimate is close (within a factor of 2).
    assert relative_squared_error(bits) / 2 < measured < relative_squared_error(bits) * 2


def test_quantizing_is_deterministic_and_keeps_zeros():
    x = torch.zeros(300)
    x[5] = 3.0
    codes, scales = quantize(x, 4, x.numel())
    again = quantize(x.clone(), 4, x.numel())
    assert torch.equal(codes, again[0]) and torch.equal(scales, again[1])
    assert torch.equal(dequantize(codes, scales, 4, x.shape, x.dtype), x)  # 0 and the absmax are exact


def test_bfloat16_round_trip():
    x = torch.randn(512, dtype=torch.bfloat16)
    codes, scales = quantize(x, 8, x.numel())
    restored = dequantize(codes, scales, 8, x.shape, x.dtype)
    assert restored.dtype == torch.bfloat16
    torch.testing.assert_close(restored, x, rtol=0.02, atol=0.02)


def test_unsupported_width_is_an_error():
    with pytest.raises(ValueError, match="bits is not supported"):
        quantized_bytes(100, 3)


# ----------------------------------------------------------------------------- the program


def _lossy_chain(budget_mb, *, bits=(8,), size=10 * MB, recompute_ms=5.0, error_weight_ms=1000.0):
    """Four tensors read in reverse order by the backward, each quantizable."""
    pricer = AlternativePricer(get_hardware("h100"), [1.0] * 8, 4)
    value = torch.empty(size // 4, device="meta")
    candidates = []
    for k in range(4):
        use = 4 + (3 - k)
        lifetime = Lifetime(produced=k, free_at=k, first_use=use, last_use=use)
        candidates.append(
            Candidate(
                name=f"a{k}", size_bytes=size, recompute_ms=recompute_ms, inputs=(), free_at=k,
                backward_first_use=use, backward_last_use=use, needed_by_backward=True,
                alternatives=pricer.alternatives(value, lifetime, bits=bits, offload=False),
            )
        )  # fmt: skip
    return Problem(tuple(candidates), (0,) * 8, 4, budget_mb * MB, error_weight_ms)


def test_quantize_only_when_memory_needs_it():
    assert solve(_lossy_chain(100)).actions == (KEEP,) * 4
    tight = solve(_lossy_chain(25))
    assert tight.peak_bytes <= 25 * MB
    assert any(action.startswith(QUANTIZE) for action in tight.actions)
    assert tight.error == pytest.approx(sum(relative_squared_error(8) for a in tight.actions if a.startswith(QUANTIZE)))


def test_cheap_recompute_beats_quantizing():
    solution = solve(_lossy_chain(25, recompute_ms=0.0))
    assert QUANTIZE not in "".join(solution.actions)


def test_error_weight_steers_bit_widths():
    # int4 saves more memory; a large error weight makes the program use int8 where it can.
    careful = solve(_lossy_chain(14, bits=(8, 4), recompute_ms=1e6, error_weight_ms=1e4))
    careless = solve(_lossy_chain(14, bits=(8, 4), recompute_ms=1e6, error_weight_ms=0.0))
    assert careful.actions.count("quantize:4") <= careless.actions.count("quantize:4")
    assert careful.error <= careless.error


def test_greedy_uses_alternatives():
    problem = _lossy_chain(25, recompute_ms=1e6)
    solution = greedy(problem)
    assert solution is not None and solution.peak_bytes <= 25 * MB
    assert any(action.startswith(QUANTIZE) for action in solution.actions)


def test_memory_model_of_a_quantized_tensor():
    alternative = Alternative(QUANTIZE, 8, 0.1, ((1, 5, 2 * MB), (5, 6, 8 * MB)), 5e-5)
    candidate = Candidate("x", 8 * MB, 1.0, (), 1, 5, 6, True, alternatives=(alternative,))
    problem = Problem((candidate,), (0,) * 8, 3, None)
    assert memory_timeline(problem, ["quantize:8"]) == [0, 2 * MB, 2 * MB, 2 * MB, 2 * MB, 10 * MB, 8 * MB, 0]
    assert evaluate(problem, ["quantize:8"], "test").added_ms == pytest.approx(0.1)
    with pytest.raises(ValueError, match="may not be quantize:4"):
        evaluate(problem, ["quantize:4"], "test")


def test_recompute_may_read_a_quantized_input():
    problem = _lossy_chain(100)
    reader = dataclasses.replace(problem.candidates[1], inputs=(0,))
    problem = dataclasses.replace(problem, candidates=(problem.candidates[0], reader, *problem.candidates[2:]))
    assert evaluate(problem, ["quantize:8", RECOMPUTE, KEEP, KEEP], "test").added_ms > 0


# ----------------------------------------------------------------------------- training steps


def _mlp() -> nn.Module:
    return nn.Sequential(*(nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 64)) for _ in range(3)))


INPUTS = (torch.randn(256, 64, generator=torch.Generator().manual_seed(1)),)


def _loss_model():
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, x):
            return self.body(x).square().mean()

    return Loss()


@functools.cache
def _tight_budget() -> int:
    """A budget min-cut cannot meet without lossy choices, found from the exact plan's least peak."""
    torch.manual_seed(0)
    model = _loss_model()
    compiled = graphopt.compile(model, compiler="eager", memory_budget=1)  # infeasible: the error names the least
    with pytest.raises(graphopt.BudgetInfeasibleError) as error:
        training_step(compiled, INPUTS)
    return error.value.least_peak_bytes


def test_exact_mode_never_quantizes_and_matches_eager():
    budget = _tight_budget()
    compiled = assert_same_training_step(_loss_model, INPUTS, memory_budget=budget)
    assert all(d.action in ("keep", "recompute") and d.error == 0 for d in graphopt.plans(compiled)[0].decisions)


def test_int8_gradients_close_to_exact_below_the_exact_least_peak():
    budget = int(_tight_budget() * 0.93)
    torch.manual_seed(0)
    exact = _loss_model()
    lossy = copy.deepcopy(exact)
    compiled = graphopt.compile(lossy, compiler="eager", memory_budget=budget, quantize_bits=8)
    training_step(exact, INPUTS)
    training_step(compiled, INPUTS)
    plan = graphopt.plans(compiled)[0]
    quantized = [d for d in plan.decisions if d.action == "quantize"]
    assert quantized and all(d.bits == 8 and d.error == pytest.approx(relative_squared_error(8)) for d in quantized)
    assert plan.predicted_peak_bytes <= budget
    assert "quantize:int8" in str(plan) and "expected relative squared error" in str(plan)
    exact_grads = torch.cat([p.grad.flatten() for p in exact.parameters()])
    lossy_grads = torch.cat([p.grad.flatten() for p in lossy.parameters()])
    assert torch.nn.functional.cosine_similarity(exact_grads, lossy_grads, dim=0) >= 0.999
    assert not torch.equal(exact_grads, lossy_grads)  # the quantized copies were really used


def test_plan_json_round_trips_lossy_decisions():
    budget = int(_tight_budget() * 0.93)
    torch.manual_seed(0)
    compiled = graphopt.compile(_loss_model(), compiler="eager", memory_budget=budget, allow_lossy=True)
    training_step(compiled, INPUTS)
    plan = graphopt.plans(compiled)[0]
    assert any(d.bits for d in plan.decisions)
    again = graphopt.Plan.from_json(plan.to_json())
    assert again.decisions == plan.decisions


def test_bad_lossy_options_are_errors():
    with pytest.raises(graphopt.GraphoptError, match="quantize_bits=3"):
        graphopt.compile(_mlp(), quantize_bits=3)
    with pytest.raises(graphopt.GraphoptError, match="allow_lossy"):
        graphopt.compile(_mlp(), allow_lossy="yes")


@pytest.mark.inductor
def test_int4_with_inductor():
    budget = _tight_budget()  # Inductor keeps 5% of it free: below the exact least peak
    torch.manual_seed(0)
    exact = _loss_model()
    lossy = copy.deepcopy(exact)
    compiled = graphopt.compile(lossy, memory_budget=budget, quantize_bits=4)
    training_step(exact, INPUTS)
    training_step(compiled, INPUTS)
    assert any(d.bits == 4 for d in graphopt.plans(compiled)[0].decisions)
    exact_grads = torch.cat([p.grad.flatten() for p in exact.parameters()])
    lossy_grads = torch.cat([p.grad.flatten() for p in lossy.parameters()])
    assert torch.nn.functional.cosine_similarity(exact_grads, lossy_grads, dim=0) >= 0.98


def test_decisions_of_the_new_kinds_print_and_load_compatibly():
    decision = graphopt.Decision("mul_3", "mlp.act: mul", "quantize", 2 * MB, 0.3, "why", bits=4, error=0.017)
    assert decision.label == "quantize:int4"
    old = {"node": "mul_3", "tensor": "mlp.act: mul", "action": "keep", "bytes": 8, "added_ms": 0.0, "reason": "r", "source": None}
    assert graphopt.Decision(**old).bits is None and graphopt.Decision(**old).error == 0.0  # plans saved before
