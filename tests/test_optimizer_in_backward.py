"""optimizer= runs each parameter's update inside the compiled backward.

Each test trains two copies of a model for a few steps: one eagerly with
``opt.zero_grad(); loss.backward(); opt.step(); scheduler.step()``, one compiled with
``graphopt.compile(model, optimizer=opt)`` and ``loss.backward(); scheduler.step()``.
Their parameters and optimizer state must agree, and the compiled model's gradients
must be gone after each backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphopt
from graphopt.ops.apply_update import OptimizerInBackward

STEPS = 4


class MLP(nn.Module):
    """Linear, LayerNorm, GELU, Linear, ReLU, Linear: weights read again in the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


def sgd(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=0.01)


def adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=0.01, weight_decay=0.1)


def train_both(make_optimizer, *, compiler: str = "eager", steps: int = STEPS):
    """(eager model, eager optimizer, compiled model, its optimizer) after `steps` steps."""
    torch.manual_seed(0)
    eager_model = MLP()
    model = copy.deepcopy(eager_model)
    eager_optimizer, optimizer = make_optimizer(eager_model.parameters()), make_optimizer(model.parameters())
    eager_schedule = torch.optim.lr_scheduler.StepLR(eager_optimizer, step_size=2, gamma=0.5)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    compiled = graphopt.compile(model, optimizer=optimizer, compiler=compiler)
    for step in range(steps):
        x = torch.randn(8, 16)
        eager_optimizer.zero_grad()
        eager_model(x).backward()
        eager_optimizer.step()
        eager_schedule.step()
        compiled(x).backward()
        assert all(p.grad is None for p in model.parameters()), f"step {step}: a gradient outlived the backward"
        schedule.step()
    return eager_model, eager_optimizer, model, optimizer


def assert_same_parameters(expected: nn.Module, actual: nn.Module, *, rtol: float, atol: float) -> None:
    for (name, want), got in zip(expected.named_parameters(), actual.parameters()):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_sgd_momentum_with_step_lr_matches_eager():
    eager_model, eager_optimizer, model, optimizer = train_both(sgd)
    assert optimizer.param_groups[0]["lr"] == eager_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert_same_parameters(eager_model, model, rtol=1e-5, atol=1e-6)


def test_adamw_with_step_lr_matches_eager_and_keeps_the_users_state():
    eager_model, eager_optimizer, model, optimizer = train_both(adamw)
    # Adam divides by the root of tiny second moments, which magnifies the few-ulp
    # differences between eager and compiled gradients; atol covers that, not more.
    assert_same_parameters(eager_model, model, rtol=1e-5, atol=1e-5)
    state = optimizer.state_dict()["state"]
    assert len(state) == len(list(model.parameters()))
    assert all(int(entry["step"]) == STEPS for entry in state.values())
    eager_state = eager_optimizer.state_dict()["state"]
    for index, entry in state.items():
        torch.testing.assert_close(entry["exp_avg"], eager_state[index]["exp_avg"], rtol=1e-5, atol=1e-6)


def test_same_as_the_compiled_step_with_opt_step_after_backward():
    """Against graphopt without optimizer= (same compiled gradients), the updates agree
    to rounding: only where the step runs changed."""
    torch.manual_seed(0)
    reference = MLP()
    model = copy.deepcopy(reference)
    reference_optimizer, optimizer = adamw(reference.parameters()), adamw(model.parameters())
    compiled_reference = graphopt.compile(reference, compiler="eager")
    compiled = graphopt.compile(model, optimizer=optimizer, compiler="eager")
    for _ in range(STEPS):
        x = torch.randn(8, 16)
        reference_optimizer.zero_grad()
        compiled_reference(x).backward()
        reference_optimizer.step()
        compiled(x).backward()
    assert_same_parameters(reference, model, rtol=1e-6, atol=1e-7)


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.GELU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).square().mean()


class TiedEmbedding(nn.Module):
    """The embedding's weight is the output head too: one gradient from two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.mid(self.embedding(idx)).tanh()
        return nn.functional.cross_entropy((hidden @ self.embedding.weight.t()).flatten(0, 1), idx.flatten())


def train_steps(factory, inputs, **compile_kwargs):
    """(eager model, compiled model, compiled) after 3 AdamW steps on the same inputs."""
    torch.manual_seed(0)
    eager_model = factory()
    model = copy.deepcopy(eager_model)
    eager_optimizer = adamw(eager_model.parameters())
    compiled = graphopt.compile(model, optimizer=adamw(model.parameters()), compiler="eager", **compile_kwargs)
    for _ in range(3):
        eager_optimizer.zero_grad()
        eager_model(*inputs).backward()
        eager_optimizer.step()
        compiled(*inputs).backward()
    return eager_model, model, compiled


def test_tied_weights_update_once_with_the_whole_gradient():
    eager_model, model, _ = train_steps(TiedEmbedding, (torch.randint(0, 50, (4, 8)),))
    assert_same_parameters(eager_model, model, rtol=1e-5, atol=1e-5)


def test_under_a_budget_that_makes_the_program_recompute():
    """The program's split recomputes forward tensors in the backward; the updates are
    placed after those reads too."""
    inputs = (torch.randn(256, 64),)
    _, _, unconstrained = train_steps(Deep, inputs)
    (min_cut,) = graphopt.plans(unconstrained)
    torch._dynamo.reset()
    eager_model, model, compiled = train_steps(Deep, inputs, memory_budget=int(0.85 * min_cut.predicted_peak_bytes))
    (plan,) = graphopt.plans(compiled)
    assert plan.method != "torch-min-cut" and any(d.action == "recompute" for d in plan.decisions)
    assert_same_parameters(eager_model, model, rtol=1e-5, atol=1e-5)


def test_parameters_outside_the_optimizer_keep_their_gradients():
    torch.manual_seed(0)
    model = MLP()
    head = model.layers[5]
    optimizer = sgd(p for p in model.parameters() if not any(p is q for q in head.parameters()))
    compiled = graphopt.compile(model, optimizer=optimizer, compiler="eager")
    compiled(torch.randn(8, 16)).backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert model.layers[0].weight.grad is None


def test_plan_counts_the_optimizer_state():
    torch.manual_seed(0)
    model = MLP()
    optimizer = adamw(model.parameters())
    compiled = graphopt.compile(model, optimizer=optimizer, compiler="eager")
    compiled(torch.randn(8, 16)).backward()
    (plan,) = graphopt.plans(compiled)
    actual = sum(t.numel() * t.element_size() for entry in optimizer.state.values() for t in entry.values())
    assert plan.memory["optimizer state"] == actual  # exp_avg, exp_avg_sq and a scalar step per parameter
    assert plan.memory["gradients"] == 0  # every gradient is consumed inside the backward


def test_through_torch_compile_options():
    torch.manual_seed(0)
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = sgd(model.parameters())
    compiled = torch.compile(model, backend="graphopt", options={"optimizer": optimizer, "compiler": "eager"})
    compiled(torch.randn(8, 16)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("optimizer_class", [torch.optim.LBFGS, torch.optim.SparseAdam])
def test_whole_model_optimizers_are_refused(optimizer_class):
    model = MLP()
    with pytest.raises(graphopt.GraphoptError, match="cannot run inside the backward"):
        graphopt.compile(model, optimizer=optimizer_class(model.parameters()))


def test_a_non_optimizer_is_refused():
    with pytest.raises(graphopt.GraphoptError, match="torch.optim.Optimizer"):
        graphopt.compile(MLP(), optimizer="adamw")


def test_an_existing_gradient_is_refused_in_the_backward():
    """Gradient accumulation is not supported: a .grad left from elsewhere is an error."""
    model = MLP()
    compiled = graphopt.compile(model, optimizer=sgd(model.parameters()), compiler="eager")
    model.layers[0].bias.grad = torch.zeros_like(model.layers[0].bias)
    with pytest.raises(graphopt.GraphoptError, match="already has a .grad"):
        compiled(torch.randn(8, 16)).backward()


def test_two_forwards_before_one_backward_are_refused():
    """The first backward's updates write parameters the second one saved: autograd's
    version check stops it before any half-gradient update."""
    model = MLP()
    compiled = graphopt.compile(model, optimizer=sgd(model.parameters()), compiler="eager")
    loss = compiled(torch.randn(8, 16)) + compiled(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_parameter_on_both_sides_of_a_graph_break_is_refused():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.linear(x).relu()
            torch._dynamo.graph_break()
            return self.linear(x).sum()

    model = Shared()
    compiled = graphopt.compile(model, optimizer=sgd(model.parameters()), compiler="eager")
    with pytest.raises(graphopt.GraphoptError, match="both sides of a graph break"):
        compiled(torch.randn(4, 8)).backward()


def test_state_bytes_estimate_before_the_first_step():
    model = MLP()
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    count = len(list(model.parameters()))
    assert OptimizerInBackward(sgd(model.parameters())).state_bytes == parameter_bytes  # momentum buffers
    # AdamW: two moments per element and a float32 step per parameter
    assert OptimizerInBackward(adamw(model.parameters())).state_bytes == 2 * parameter_bytes + 4 * count


@pytest.mark.inductor
def test_adamw_through_inductor_matches_eager_on_a_gpt_block():
    """Inductor fuses LayerNorm's backward into few kernels: without the update's data
    dependencies on the weight's readers, the input gradient read the updated weight
    (parameters then differed from eager by 1.5e-3 after two steps)."""
    from examples.gpt import build

    torch.manual_seed(0)
    eager_model, inputs = build(batch=1, seq=64, n_layers=1)
    model = copy.deepcopy(eager_model)
    eager_optimizer = torch.optim.AdamW(eager_model.parameters(), lr=1e-3)
    compiled = graphopt.compile(model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    for _ in range(2):
        eager_optimizer.zero_grad()
        eager_model(*inputs).backward()
        eager_optimizer.step()
        compiled(*inputs).backward()
    # AdamW's first steps move each weight by about lr whatever the gradient's size, so
    # rounding differences in small gradients show at up to ~3e-5 (as without optimizer=).
    assert_same_parameters(eager_model, model, rtol=1e-4, atol=1e-4)
