"""True Inductor end-to-end tests: generated C++ code, real memory. Slow here (tens of s each)."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphopt

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.inductor


def test_tiny_gpt_under_a_tight_budget_equals_eager():
    from examples.gpt import build

    torch.manual_seed(0)
    model, inputs = build(batch=4, seq=64, n_layers=2, d_model=64, n_heads=2, vocab=128)
    reference = copy.deepcopy(model)
    reference(*inputs).backward()

    probe = graphopt.compile(copy.deepcopy(model))
    probe(*inputs).backward()
    no_budget_peak = graphopt.plans(probe)[0].predicted_peak_bytes
    torch._dynamo.reset()

    compiled = graphopt.compile(model, memory_budget=int(no_budget_peak * 0.9))
    loss = compiled(*inputs)
    loss.backward()
    plan = graphopt.plans(compiled)[0]
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert any(d.action == "recompute" for d in plan.decisions)
    assert torch.allclose(loss, reference(*inputs), rtol=1e-5, atol=1e-6)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        # Inductor's fused kernels sum in another order than eager: 1e-5 absolute.
        assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5), name


def test_offline_plan_predicts_what_inductor_compiles():
    """``graphopt plan`` traces without Dynamo or Inductor; it must still partition the
    graph Inductor partitions (after Inductor's joint-graph passes), or its figures are
    another model's (the bench GPT: 396 MB offline for a 331 MB compiled step)."""
    from examples.gpt import build
    from graphopt.offline import plan_model

    shape = {"batch": 4, "seq": 64, "n_layers": 2, "d_model": 64, "n_heads": 2, "vocab": 128}
    torch.manual_seed(0)
    model, inputs = build(**shape)
    # Offline planning judges splits by graphopt's simulation (it may plan for a device
    # it does not have); compiled with the same prediction, both must be one plan.
    compiled = graphopt.compile(model, hardware="cpu", prediction="simulation")
    compiled(*inputs).backward()
    with torch.device("meta"):
        meta_model, meta_inputs = build(**shape)
    (offline,) = plan_model(meta_model, meta_inputs, hardware="cpu")
    (online,) = graphopt.plans(compiled)
    assert offline.predicted_peak_bytes == online.predicted_peak_bytes
    assert [(d.key, d.action) for d in offline.decisions] == [(d.key, d.action) for d in online.decisions]


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    import graphopt
    from torch import nn

    from tests.compiled_step import MLPLoss

    torch.manual_seed(0)
    width, batch, blocks = 1024, 2048, 8
    model = MLPLoss(width, blocks)
    x = torch.randn(batch, width)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = int(sys.argv[1])
    compiled = graphopt.compile(model, memory_budget=budget)

    def step():
        model.zero_grad(set_to_none=True)
        compiled(x).backward()

    step()
    model.zero_grad(set_to_none=True)
    _, peak = graphopt.measure_peak(lambda: compiled(x).backward(), device="cpu", cpu_method="allocated")
    plan = graphopt.plans(compiled)[0]
    print(json.dumps({
        "measured": peak.peak_bytes + parameter_bytes + x.numel() * x.element_size(),
        "predicted": plan.predicted_peak_bytes,
        "budget": budget,
        "saved_activations_without_budget": blocks * 2 * batch * width * 4,
    }))
    """
)


def test_measured_peak_stays_under_the_budget_and_matches_the_prediction():
    budget = 150 * 10**6  # the MLP keeps ~134 MB of activations with no budget; ~240 MB peak
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(budget)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["saved_activations_without_budget"] > 100 * 10**6
    assert figures["measured"] <= budget
    assert abs(figures["predicted"] - figures["measured"]) <= 0.10 * figures["measured"]


# A second memory check on a wider MLP whose saved activations (302 MB without a budget)
# are 2-3x what the budget leaves them, the budget picked as the task states it: 45% of
# the no-budget predicted peak, or 5% above the least reachable peak if that is infeasible.
_WIDE_MLP_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import graphopt
    from torch import nn

    BATCH, WIDTH, HIDDEN, DEPTH = 4096, 256, 1024, 8

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(
                *[nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH)) for _ in range(DEPTH)]
            )

        def forward(self, x):
            return self.blocks(x).square().mean()

    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(BATCH, WIDTH)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    input_bytes = x.numel() * x.element_size()

    probe = graphopt.compile(MLP(), compiler="eager")  # plans without code generation
    probe(x)
    no_budget = graphopt.plans(probe)[0]
    torch._dynamo.reset()
    budget = int(no_budget.predicted_peak_bytes * 0.45)
    try:
        graphopt.compile(MLP(), memory_budget=budget)(x)  # infeasibility is raised before codegen
    except graphopt.BudgetInfeasibleError as error:
        budget = int(error.least_budget_bytes * 1.05)
    torch._dynamo.reset()

    compiled = graphopt.compile(model, memory_budget=budget)

    def step():
        loss = compiled(x)
        loss.backward()
        return loss.item()

    step()  # warm-up: compiles
    model.zero_grad(set_to_none=True)  # the measured step allocates its gradients anew
    _, peak = graphopt.measure_peak(step, device="cpu", cpu_method="allocated")
    plan = graphopt.plans(compiled)[0]

    torch._dynamo.reset()
    model(x).backward()
    model.zero_grad(set_to_none=True)
    _, eager_peak = graphopt.measure_peak(lambda: model(x).backward(), device="cpu", cpu_method="allocated")

    static = parameter_bytes + input_bytes  # resident before the step: excluded by measure_peak
    print(json.dumps({
        "budget": budget,
        "parameters": parameter_bytes,
        "saved_activations_without_budget": sum(d.bytes for d in no_budget.decisions if d.action == "keep"),
        "predicted": plan.predicted_peak_bytes,
        "recomputed": sum(d.action == "recompute" for d in plan.decisions),
        "measured": peak.peak_bytes + static,
        "eager_measured": eager_peak.peak_bytes + static,
    }))
    """
)
_WIDE_MLP_FIGURES: dict = {}


def _wide_mlp_figures() -> dict:
    """Run the measurement once (about 40 s) and share its figures between the two tests."""
    if not _WIDE_MLP_FIGURES:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", _WIDE_MLP_SCRIPT], env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-3000:]
        _WIDE_MLP_FIGURES.update(json.loads(result.stdout.strip().splitlines()[-1]))
        print(_WIDE_MLP_FIGURES)
    return _WIDE_MLP_FIGURES


def test_wide_mlp_measured_peak_stays_under_the_budget():
    figures = _wide_mlp_figures()
    budget = figures["budget"]
    room = budget - 2 * figures["parameters"]  # what parameters and gradients leave
    assert figures["saved_activations_without_budget"] > 100 * 10**6
    assert figures["saved_activations_without_budget"] > 2 * room, figures
    assert figures["eager_measured"] > budget, figures  # the budget really binds
    assert figures["recomputed"] > 0
    assert figures["predicted"] <= budget
    assert figures["measured"] <= budget, figures


def test_wide_mlp_predicted_peak_is_within_10_percent_of_the_measured():
    """Budgeted graphs keep their order through Inductor, so the simulation is the
    generated code's schedule (139.5 MB predicted, 139.2 MB measured; with Inductor's
    own peak-memory reordering the same plan measured 122.8 MB, 12% below what graphopt
    could predict)."""
    figures = _wide_mlp_figures()
    assert abs(figures["predicted"] - figures["measured"]) <= 0.10 * figures["measured"], figures


# A recompute-heavy plan on a small ViT (the suite's, docs/benchmarks.md) at a budget
# just above its least. It measured 39.6 MB against a 35.9 MB simulation while flash
# attention's gradients were counted as fused away and Inductor's buffer reuse, blind
# with its peak-memory reordering off, held dead MLP buffers across the backward.
_VIT_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from bench.models import build_vit
    from tests.compiled_step import measure_compiled_step

    torch.manual_seed(0)
    bench_model = build_vit("cpu", "full")
    print(json.dumps(measure_compiled_step(bench_model.module, bench_model.inputs, 38_000_000)))
    """
)


def test_vit_at_a_tight_budget_stays_under_it():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _VIT_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["grads_equal"], figures  # Inductor's fused sums: 1e-4 relative, as above
    assert figures["measured"] <= 38_000_000, figures
    assert abs(figures["predicted"] - figures["measured"]) <= 0.10 * figures["measured"], figures


# Budgets swept from the least budget graphopt can meet up to the no-budget peak, on two
# models; each plan compiled by Inductor and its peak measured with the CPU allocator.
_MONOTONIC_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import graphopt
    from torch import nn
    from examples.gpt import build

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128)) for _ in range(4)])

        def forward(self, x):
            return self.blocks(x).square().mean()

    def models():
        if sys.argv[1] == "mlp":
            torch.manual_seed(0)
            return MLP(), (torch.randn(2048, 128),)
        torch.manual_seed(0)
        return build(batch=4, seq=128, n_layers=2, d_model=128, n_heads=2, vocab=512)

    def compiled_peak(budget):
        torch._dynamo.reset()
        model, inputs = models()
        static = sum(t.numel() * t.element_size() for t in [*model.parameters(), *inputs])
        compiled = graphopt.compile(model, memory_budget=budget)
        step = lambda: compiled(*inputs).backward()
        step()
        model.zero_grad(set_to_none=True)
        _, peak = graphopt.measure_peak(step, device="cpu", cpu_method="allocated")
        return peak.peak_bytes + static, max(p.predicted_peak_bytes for p in graphopt.plans(compiled))

    model, inputs = models()
    probe = graphopt.compile(model, compiler="eager")
    probe(*inputs).backward()
    top = graphopt.plans(probe)[0].predicted_peak_bytes
    torch._dynamo.reset()
    model, inputs = models()
    try:
        graphopt.compile(model, memory_budget=1, compiler="eager")(*inputs).backward()
    except graphopt.BudgetInfeasibleError as error:
        least = error.least_peak_bytes
    least = int(least / (1 - 0.02)) + 1  # the least budget with Inductor's default headroom
    budgets = [least + (top - least) * i // 7 for i in range(8)]
    points = []
    for budget in reversed(budgets):
        try:
            measured, predicted = compiled_peak(budget)
        except graphopt.BudgetInfeasibleError:
            measured = predicted = None
        points.append({"budget": budget, "measured": measured, "predicted": predicted})
    print(json.dumps(points))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_lower_budgets_never_give_higher_measured_peaks(model):
    """Issue 15's monotonicity: 8 budgets from the least graphopt can meet to the
    no-budget peak; as the budget falls the measured peak never rises (beyond 1%) and
    each stays under its budget. PyTorch's own knob is not monotonic (pytorch#197838)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _MONOTONIC_SCRIPT, model], env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stderr[-3000:]
    points = json.loads(result.stdout.strip().splitlines()[-1])
    print(points)
    fitted = [p for p in points if p["measured"] is not None]
    assert len(fitted) >= 7, points  # only the lowest may be infeasible (the least budget is an eager plan's)
    for point in fitted:
        assert point["measured"] <= point["budget"], point
    for higher, lower in zip(fitted, fitted[1:]):  # budgets in falling order
        assert lower["measured"] <= higher["measured"] * 1.01, (higher, lower)


# A convolutional network with BatchNorm: on a CPU Inductor lays its activations and
# 3x3 weights out channels-last, saves copies of those weights for the backward, lowers
# the backward for the saved tensors' layouts and runs oneDNN convolutions that reorder
# weights into scratch of their own. The ResNet of the suite measured 5.5% over a
# prediction that missed all four.
_CNN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import graphopt
    from torch import nn
    from tests.compiled_step import measure_compiled_step

    def block(width):
        return nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )

    class CNN(nn.Module):
        def __init__(self, width=48):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.blocks = nn.ModuleList(block(width) for _ in range(3))
            self.head = nn.Linear(width, 10)

        def forward(self, images, labels):
            x = self.stem(images)
            for b in self.blocks:
                x = torch.relu(x + b(x))
            return nn.functional.cross_entropy(self.head(x.mean((2, 3))), labels)

    def fresh():
        torch.manual_seed(0)
        return CNN(), (torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,)))

    model, inputs = fresh()
    probe = graphopt.compile(model, compiler="eager")
    probe(*inputs).backward()
    budget = int(graphopt.plans(probe)[0].predicted_peak_bytes * float(sys.argv[1]))
    torch._dynamo.reset()
    figures = measure_compiled_step(*fresh(), budget)
    from graphopt.cost_models import wrapper_memory
    figures["probed"] = sorted({key[0] for key in wrapper_memory._PROBES})  # convolutions measured while planning
    print(json.dumps(figures))
    """
)


def test_cnn_prediction_counts_inductors_layouts_and_onednn_scratch():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _CNN_SCRIPT, "0.8"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["grads_equal"], figures
    assert figures["recomputed"] > 0, figures
    assert figures["measured"] <= figures["budget"], figures
    assert abs(figures["predicted"] - figures["measured"]) <= 0.02 * figures["measured"], figures
    assert figures["probed"] == ["convolution", "convolution_backward"], figures
