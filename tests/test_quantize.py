"""Quantized saving: the format's numerics, the error model, the program's choices
(synthetic problems, no torch graphs), and end-to-end training steps (compiler="eager",
one Inductor test)."""

import copy
import dataclasses
import functools
import json

import pytest
import torch
from torch import nn

import graphopt
from graphopt.alternatives import AlternativePricer, Lifetime
from graphopt.cli import _parser
from graphopt.config import make_options
from graphopt.cost_models import get_hardware
from graphopt.ops.quantize import FP8, dequantize, quantize, quantized_bytes, relative_squared_error
from graphopt.planner import alternative_settings
from graphopt.problem import (
    KEEP, QUANTIZE, RECOMPUTE, Alternative, Candidate, Problem, evaluate, memory_timeline, parse_action,
)
from graphopt.solver import greedy, solve

from conftest import assert_same_training_step, training_step

MB = 2**20


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize("bits", [8, 4, 2, FP8])
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


@pytest.mark.parametrize("bits, rtol", [(8, 0.02), (FP8, 2**-4)])  # fp8: half a step of 3 mantissa bits
def test_bfloat16_round_trip(bits, rtol):
    x = torch.randn(512, dtype=torch.bfloat16)
    codes, scales = quantize(x, bits, x.numel())
    restored = dequantize(codes, scales, bits, x.shape, x.dtype)
    assert restored.dtype == torch.bfloat16
    torch.testing.assert_close(restored, x, rtol=rtol, atol=0.02)


def test_fp8_codes_span_the_format_and_keep_zeros():
    x = torch.zeros(300)
    x[5], x[6], x[200] = -3.0, 1e-6, 1e-3
    codes, scales = quantize(x, FP8, x.numel())
    assert codes.dtype == torch.float8_e4m3fn and codes.element_size() == 1
    assert codes.float().abs().amax(1).tolist() == [448.0, 448.0, 0.0]  # each group's largest maps to e4m3fn's
    expected = x.clone()
    expected[6] = 0.0  # under half e4m3fn's smallest subnormal (2^-9) once its group is scaled: flushed
    torch.testing.assert_close(dequantize(codes, scales, FP8, x.shape, x.dtype), expected, rtol=1e-6, atol=0.0)
    outlier = torch.randn(128)
    outlier[0] = 1000.0  # an int8 group's step follows the outlier; fp8's relative precision does not
    restored = {b: dequantize(*quantize(outlier, b, 128), b, (128,), torch.float32) for b in (8, FP8)}
    error = {b: ((restored[b] - outlier)[1:] ** 2).sum() / (outlier[1:] ** 2).sum() for b in (8, FP8)}
    assert error[FP8] < relative_squared_error(FP8) * 2 < error[8]


@pytest.mark.inductor
def test_inductor_compiles_the_fp8_conversions_like_eager():
    def round_trip(x):
        codes, scales = quantize(x, FP8, x.numel())
        return codes, dequantize(codes, scales, FP8, x.shape, x.dtype)

    x = torch.randn(64, 130)
    codes, restored = round_trip(x)
    compiled_codes, compiled_restored = torch.compile(round_trip, backend="inductor")(x)
    assert torch.equal(compiled_codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(compiled_restored, restored)


def test_unsupported_width_is_an_error():
    with pytest.raises(ValueError, match="bits is not supported"):
        quantized_bytes(100, 3)
    with pytest.raises(ValueError, match="bits is not supported"):
        quantize(torch.ones(4), "fp16", 4)


def test_fp8_error_model_sits_between_int8_and_int4():
    assert relative_squared_error(FP8) == pytest.approx(7.0e-4, rel=0.01)
    assert relative_squared_error(8) < relative_squared_error(FP8) < relative_squared_error(4)
    assert quantized_bytes(1000, FP8) == quantized_bytes(1000, 8)


def test_parse_action_reads_bit_counts_and_format_names():
    assert parse_action("quantize:fp8") == (QUANTIZE, FP8)
    assert parse_action("offload-quantized:fp8") == ("offload-quantized", FP8)
    assert parse_action("quantize:8") == (QUANTIZE, 8)
    assert parse_action(KEEP) == (KEEP, None)
    assert Alternative(QUANTIZE, FP8, 0.0, ()).action == "quantize:fp8"


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
    return error.value.least_budget_bytes


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
    with pytest.raises(graphopt.GraphoptError, match="quantize_bits='e5m2'; choose one of .*'fp8'"):
        graphopt.compile(_mlp(), quantize_bits="e5m2")
    with pytest.raises(graphopt.GraphoptError, match="allow_lossy"):
        graphopt.compile(_mlp(), allow_lossy="yes")


@pytest.mark.inductor
def test_int4_with_inductor():
    budget = _tight_budget()  # Inductor keeps 7% of it free: below the exact least peak
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
    assert dataclasses.replace(decision, bits=FP8).label == "quantize:fp8"
    old = {"node": "mul_3", "tensor": "mlp.act: mul", "action": "keep", "bytes": 8, "added_ms": 0.0, "reason": "r", "source": None}
    assert graphopt.Decision(**old).bits is None and graphopt.Decision(**old).error == 0.0  # plans saved before


# ----------------------------------------------------------------------------- fp8


def test_allow_lossy_offers_fp8_only_on_hardware_with_fp8_units():
    assert FP8 in alternative_settings(make_options(hardware="h100", allow_lossy=True)).quantize_bits
    assert FP8 not in alternative_settings(make_options(hardware="a100", allow_lossy=True)).quantize_bits
    assert FP8 not in alternative_settings(make_options(hardware="cpu", allow_lossy=True)).quantize_bits
    assert alternative_settings(make_options(hardware="cpu", quantize_bits=FP8)).quantize_bits == (FP8,)
    assert _parser().parse_args(["plan", "model.py", "--quantize-bits", "fp8"]).quantize_bits == FP8


@functools.cache
def _fp8_step() -> tuple[graphopt.Plan, torch.Tensor, torch.Tensor]:
    """The fp8 plan below the exact least peak, and the exact and fp8 gradients of one step."""
    torch.manual_seed(0)
    exact = _loss_model()
    lossy = copy.deepcopy(exact)
    compiled = graphopt.compile(lossy, compiler="eager", memory_budget=int(_tight_budget() * 0.93), quantize_bits=FP8)
    training_step(exact, INPUTS)
    training_step(compiled, INPUTS)
    grads = [torch.cat([p.grad.flatten() for p in model.parameters()]) for model in (exact, lossy)]
    return graphopt.plans(compiled)[0], *grads


def test_fp8_gradients_close_to_exact_below_the_exact_least_peak():
    plan, exact_grads, fp8_grads = _fp8_step()
    quantized = [d for d in plan.decisions if d.action == "quantize"]
    assert quantized and all(d.bits == FP8 and d.error == pytest.approx(relative_squared_error(FP8)) for d in quantized)
    assert plan.predicted_peak_bytes <= int(_tight_budget() * 0.93)
    assert "quantize:fp8" in str(plan)
    assert torch.nn.functional.cosine_similarity(exact_grads, fp8_grads, dim=0) >= 0.999
    assert not torch.equal(exact_grads, fp8_grads)  # the fp8 copies were really used


def test_an_fp8_plan_round_trips_and_applies_where_fp8_is_offered(tmp_path):
    plan, _, fp8_grads = _fp8_step()
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    loaded = graphopt.Plan.from_json(json.loads(path.read_text()))
    assert loaded.decisions == plan.decisions and any(d.planned_action == "quantize:fp8" for d in loaded.decisions)
    torch.manual_seed(0)
    model = _loss_model()
    compiled = graphopt.compile(model, compiler="eager", plan=str(path), hardware="h100", allow_lossy=True)
    training_step(compiled, INPUTS)
    assert graphopt.plans(compiled)[0].method == "given plan"
    assert torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), fp8_grads)  # same codes, same step
    refused = graphopt.compile(_loss_model(), compiler="eager", plan=str(path), hardware="cpu", allow_lossy=True)
    with pytest.raises(graphopt.PlanMismatchError, match="quantize:fp8 .* which these options do not allow"):
        training_step(refused, INPUTS)
