"""Shared test helpers: the repo root on sys.path, a fresh dynamo per test, and the
"graphopt's training step equals eager's" check most end-to-end tests are built on."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `import examples.gpt`

import graphopt  # noqa: E402

# fp32 tolerances for "the same training step". graphopt changes which tensors are kept
# and which are recomputed, never the arithmetic, so a recomputed tensor is bit-identical
# to the kept one; what remains is the difference between eager's fused kernels and the
# decomposed aten ops AOTAutograd runs, a few ulps.
RTOL = 1e-5
ATOL = 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: no cached graphs or guards leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_of(output: Any) -> torch.Tensor:
    """The scalar loss of a model's output: the tensor itself, or a Hugging Face ``.loss``."""
    if isinstance(output, torch.Tensor):
        return output
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    assert isinstance(loss, torch.Tensor), f"cannot find a loss in {type(output).__name__}"
    return loss


def training_step(model: torch.nn.Module, inputs: Sequence[Any], kwargs: dict | None = None, *, seed: int | None = None) -> torch.Tensor:
    """One step: zero the gradients, loss, backward. Returns the detached loss."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = loss_of(model(*inputs, **(kwargs or {})))
    assert loss.dim() == 0, f"the loss must be a scalar, got shape {tuple(loss.shape)}"
    loss.backward()
    return loss.detach()


def assert_grads_equal(expected: torch.nn.Module, actual: torch.nn.Module, *, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Every parameter gradient and every buffer (BatchNorm running stats) of the two models match."""
    expected_params = dict(expected.named_parameters())
    actual_params = dict(actual.named_parameters())
    assert expected_params.keys() == actual_params.keys()
    for name, parameter in expected_params.items():
        other = actual_params[name]
        if parameter.grad is None:
            assert other.grad is None, f"{name}: eager has no gradient, graphopt has one"
            continue
        assert other.grad is not None, f"{name}: graphopt produced no gradient"
        torch.testing.assert_close(other.grad, parameter.grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")
    expected_buffers = dict(expected.named_buffers())
    actual_buffers = dict(actual.named_buffers())
    assert expected_buffers.keys() == actual_buffers.keys()
    for name, buffer in expected_buffers.items():
        torch.testing.assert_close(actual_buffers[name], buffer, rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}")


def assert_same_training_step(
    model_factory: Callable[[], torch.nn.Module],
    inputs: Sequence[Any],
    *,
    input_kwargs: dict | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    compile_fn: Callable[[torch.nn.Module], Any] | None = None,
    seed: int = 0,
    **compile_kwargs: Any,
) -> Any:
    """Run one eager and one graphopt training step on identical models; assert the
    loss, every parameter gradient and every buffer agree. Returns the compiled model.

    ``compile_fn`` replaces ``graphopt.compile(model, **compile_kwargs)`` (e.g. to go
    through ``torch.compile(backend="graphopt")``). ``compile_kwargs`` default to
    ``compiler="eager"``.
    """
    torch.manual_seed(seed)
    eager_model = model_factory()
    graphopt_model = copy.deepcopy(eager_model)
    if compile_fn is None:
        compile_kwargs.setdefault("compiler", "eager")
        compiled = graphopt.compile(graphopt_model, **compile_kwargs)
    else:
        assert not compile_kwargs, "pass either compile_fn or compile kwargs"
        compiled = compile_fn(graphopt_model)

    expected_loss = training_step(eager_model, inputs, input_kwargs, seed=seed)
    actual_loss = training_step(compiled, inputs, input_kwargs, seed=seed)
    torch.testing.assert_close(actual_loss, expected_loss, rtol=rtol, atol=atol, msg=lambda m: f"loss: {m}")
    assert_grads_equal(eager_model, graphopt_model, rtol=rtol, atol=atol)
    return compiled


@pytest.fixture(name="assert_same_training_step")
def _assert_same_training_step_fixture():
    return assert_same_training_step
