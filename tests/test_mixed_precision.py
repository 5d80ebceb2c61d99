"""Mixed precision (issue 16, item 3): ``torch.autocast`` around the forward, bf16 on CPU
and CUDA, and fp16 with ``torch.amp.GradScaler`` on CUDA (skipped without it).

Under autocast eager's step and a compiled one round differently (AOTAutograd's
decompositions, bf16 intermediates), so "equal to eager" means "as close to eager as
``torch.compile`` is". graphopt with ``compiler="eager"`` runs the graphs AOTAutograd
decomposed and partitioned, as ``torch.compile(backend="aot_eager_decomp_partition")``
does, and recomputing a tensor repeats its arithmetic: its step must equal that one's
within fp32 tolerances, and be no further from eager's. On the bf16 GPT below both are
0.6% of a gradient's largest entry from eager (Inductor's torch.compile: 0.26%; graphopt
through Inductor at the same tight budget measured the same 0.26% in a one-off run).

The plan's saved tensors must be the autocast dtypes' size: matmul outputs bf16, two
bytes an element, and the whole no-budget plan keeps fewer bytes than in fp32.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch

import graphopt
from conftest import ATOL, RTOL, assert_grads_equal

GPT_DIMS = dict(batch=4, seq=64, n_layers=2, d_model=64, n_heads=2, vocab=128)
_KEY = re.compile(r"(\w+)\[([\d,]*)\]$")  # a decision key ends in its dtype and shape: "float32[4,64,64]"
_MATMULS = ("addmm", "mm", "bmm", "baddbmm")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpt(device: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from examples.gpt import build

    torch.manual_seed(0)
    model, inputs = build(**GPT_DIMS)
    return model.to(device), tuple(x.to(device) for x in inputs)


def autocast_step(model, inputs, device: str, dtype: torch.dtype, scaler: torch.amp.GradScaler | None = None):
    """One step: forward under autocast, backward outside it (as the autocast docs say)."""
    with torch.autocast(device, dtype=dtype):
        loss = model(*inputs)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss.detach()


def _relative_errors(model: torch.nn.Module, reference: torch.nn.Module) -> dict[str, float]:
    """Per parameter: the largest gradient difference over the reference's largest entry."""
    return {
        name: ((p.grad.float() - r.grad.float()).abs().max() / r.grad.float().abs().max().clamp_min(1e-30)).item()
        for (name, p), r in zip(model.named_parameters(), reference.parameters())
    }


def _decision_dtype_and_elements(key: str) -> tuple[torch.dtype, int]:
    match = _KEY.search(key)
    assert match, f"no dtype and shape in decision key {key!r}"
    elements = 1
    for size in filter(None, match.group(2).split(",")):
        elements *= int(size)
    return getattr(torch, match.group(1)), elements


def _compile_under_half_the_plan(model: torch.nn.Module, step: Callable, **options) -> tuple:
    """graphopt without a budget on a copy of `model` (its plan), then on `model` at static
    memory plus half of what that plan adds (where that is infeasible, halfway between
    the least budget graphopt reports and the no-budget peak), one step each. Returns (the budgeted compiled model, its step's loss, the
    no-budget plan, the budgeted plan)."""
    probe = graphopt.compile(copy.deepcopy(model), compiler="eager", **options)
    step(probe)
    (free_plan,) = graphopt.plans(probe)
    static = sum(free_plan.memory[kind] for kind in ("parameters", "inputs", "gradients"))
    budget = static + (free_plan.predicted_peak_bytes - static) // 2
    torch._dynamo.reset()
    try:
        compiled = graphopt.compile(model, memory_budget=budget, compiler="eager", **options)
        loss = step(compiled)
    except graphopt.BudgetInfeasibleError as error:  # raised while compiling: no gradient yet
        torch._dynamo.reset()
        budget = (error.least_budget_bytes + free_plan.predicted_peak_bytes) // 2
        compiled = graphopt.compile(model, memory_budget=budget, compiler="eager", **options)
        loss = step(compiled)
    (plan,) = graphopt.plans(compiled)
    assert plan.predicted_peak_bytes < free_plan.predicted_peak_bytes
    assert any(decision.action == "recompute" for decision in plan.decisions), plan
    return compiled, loss, free_plan, plan


def _assert_as_close_as_torch_compile(device: str, dtype: torch.dtype, **options) -> tuple[graphopt.Plan, graphopt.Plan]:
    """One autocast step of eager, torch.compile and graphopt under a tight budget on
    identical GPTs; returns graphopt's no-budget and budgeted plans."""
    model, inputs = _gpt(device)
    eager, theirs, ours = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    eager_loss = autocast_step(eager, inputs, device, dtype)
    their_loss = autocast_step(torch.compile(theirs, backend="aot_eager_decomp_partition"), inputs, device, dtype)
    torch._dynamo.reset()
    def our_step(compiled) -> torch.Tensor:
        return autocast_step(compiled, inputs, device, dtype)

    _, our_loss, free_plan, plan = _compile_under_half_the_plan(ours, our_step, **options)
    torch.testing.assert_close(our_loss, their_loss, rtol=RTOL, atol=ATOL)
    assert_grads_equal(theirs, ours, rtol=RTOL, atol=ATOL)
    assert abs(our_loss - eager_loss) <= abs(their_loss - eager_loss) * 1.01 + 1e-7
    their_errors, our_errors = _relative_errors(theirs, eager), _relative_errors(ours, eager)
    assert max(their_errors.values()) > 0, "autocast changed nothing: the comparison would say nothing"
    for name, error in our_errors.items():
        assert error <= their_errors[name] * 1.01 + 1e-7, (name, error, their_errors[name])
    return free_plan, plan


def _assert_saved_in(dtype: torch.dtype, plans: list[graphopt.Plan]) -> None:
    """Every decision's bytes are its tensor's at its dtype, and every matmul output
    the backward needs (autocast runs matmuls in `dtype`) is `dtype`."""
    matmuls = 0
    for plan in plans:
        for decision in plan.decisions:
            tensor_dtype, elements = _decision_dtype_and_elements(decision.key)
            assert decision.bytes == elements * tensor_dtype.itemsize, decision
            if decision.key.split(": ")[-1].split(" #")[0] in _MATMULS:
                matmuls += 1
                assert tensor_dtype == dtype, decision
    assert matmuls > 0, "no matmul output among the saved tensors: nothing was checked"


def _kept_bytes(plan: graphopt.Plan) -> int:
    return sum(decision.bytes for decision in plan.decisions if decision.action == "keep")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_autocast_bf16_step_equals_torch_compile_and_saves_bf16(device):
    options = {"hardware": "h100"} if device == "cuda" else {}  # "auto" refuses a GPU it has no profile of
    free_plan, plan = _assert_as_close_as_torch_compile(device, torch.bfloat16, **options)
    _assert_saved_in(torch.bfloat16, [free_plan, plan])
    # The same GPT in fp32 keeps more: autocast's bf16 matmul outputs are half the size.
    model, inputs = _gpt(device)
    fp32 = graphopt.compile(model, compiler="eager", **options)
    fp32(*inputs).backward()
    (fp32_plan,) = graphopt.plans(fp32)
    assert _kept_bytes(free_plan) < _kept_bytes(fp32_plan), (_kept_bytes(free_plan), _kept_bytes(fp32_plan))


@cuda
def test_autocast_fp16_with_grad_scaler_equals_torch_compile():
    """fp16 autocast with a GradScaler, three AdamW steps: the scaled gradients and the
    parameters after every step equal torch.compile's (same decompositions), and the
    saved matmul outputs are fp16."""
    device, dtype = "cuda", torch.float16
    model, inputs = _gpt(device)
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    their_optimizer, our_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (theirs, ours))
    their_scaler, our_scaler = torch.amp.GradScaler(device), torch.amp.GradScaler(device)

    def our_step(compiled) -> torch.Tensor:
        return autocast_step(compiled, inputs, device, dtype, our_scaler)

    # graphopt's first step runs while it plans.
    our_compiled, _, free_plan, plan = _compile_under_half_the_plan(ours, our_step, hardware="h100")
    their_compiled = torch.compile(theirs, backend="aot_eager_decomp_partition")
    for step in range(3):
        autocast_step(their_compiled, inputs, device, dtype, their_scaler)
        if step:
            our_step(our_compiled)
        assert_grads_equal(theirs, ours, rtol=RTOL, atol=ATOL)
        for optimizer, scaler in ((their_optimizer, their_scaler), (our_optimizer, our_scaler)):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        for (name, theirs_parameter), ours_parameter in zip(theirs.named_parameters(), ours.parameters()):
            torch.testing.assert_close(ours_parameter, theirs_parameter, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    assert our_scaler.get_scale() == their_scaler.get_scale()
    _assert_saved_in(torch.float16, [free_plan, plan])
