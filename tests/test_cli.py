"""``graphopt plan``: the command line, and ``plan_model`` on fake tensors.

The command runs in a subprocess as users run it; error cases call ``main`` in-process
(each subprocess pays several seconds of imports).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from examples.gpt import GPT, GPTConfig
from graphopt import BudgetInfeasibleError, Plan
from graphopt.cli import main, parse_overrides
from graphopt.cost_models import get_hardware
from graphopt.offline import options_for, plan_model, planning_device, with_traced_step

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x


    def build(batch=64, width=32):
        return Net(width), (torch.randn(batch, width),), lambda output: output.square().mean()
    """
)
TINY_GPT = GPTConfig(vocab=64, d_model=32, n_heads=2, n_layers=2, seq=16)
TINY_GPT_FILE = textwrap.dedent(
    """
    from examples.gpt import build as build_gpt


    def build(batch=2):
        return build_gpt(batch=batch, seq=16, n_layers=1, d_model=32, n_heads=2, vocab=64)
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return path


# The console script pip installed next to this interpreter (pyproject's [project.scripts]).
CONSOLE_SCRIPT = Path(sys.executable).parent / "graphopt"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} is missing: pip install -e . installs it"
    return subprocess.run(
        [str(CONSOLE_SCRIPT), "plan", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )


def test_plan_prints_the_plan_and_writes_json_that_round_trips(model_file, tmp_path):
    out = tmp_path / "plans.json"
    result = run_cli(str(model_file), "--budget", "1GB", "--hardware", "h100", "--json", str(out), "--set", "batch=32")
    assert result.returncode == 0, result.stderr
    assert "predicted peak" in result.stdout
    assert "build(batch=32)" in result.stdout
    assert "layers.2: addmm" in result.stdout and "[tiny.py:" in result.stdout  # module path, source line
    data = json.loads(out.read_text())
    assert data["schema"] == "graphopt.plans/1"
    plans = [Plan.from_json(plan) for plan in data["plans"]]
    assert len(plans) == 1
    assert plans[0].budget_bytes == 10**9
    assert Plan.from_json(plans[0].to_json()) == plans[0]


def test_missing_file_exits_2_with_one_line(tmp_path):
    result = run_cli(str(tmp_path / "nowhere.py"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "not found" in result.stderr


def _bad_build(tmp_path, body: str):
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_build", "defines no build()"),
        ("build_raises", "failed under torch.device('meta')"),
        ("reads_values", "failed under torch.device('meta')"),
        ("unknown_hardware", "unknown hardware 'tpu9'"),
        ("bad_budget", "cannot read memory_budget='lots'"),
        ("unknown_override", "takes no depth"),
        ("plain_tensor_attribute", "register_buffer"),
    ],
)
def test_errors_exit_2_with_one_line(case, expected, model_file, tmp_path, capsys):
    bad_files = {
        "no_build": "import torch\nmodel = torch.nn.Linear(2, 2)\n",
        "build_raises": "def build():\n    raise RuntimeError('no checkpoint here')\n",
        "reads_values": "import torch\ndef build():\n    torch.ones(2).sum().item()\n",
        "plain_tensor_attribute": (
            "import torch\n"
            "class Scaled(torch.nn.Linear):\n"
            "    def forward(self, x):\n"
            "        return (super().forward(x) * self.scale).sum()\n"
            "def build():\n"
            "    model = Scaled(4, 4)\n"
            "    model.scale = torch.ones(4)\n"
            "    return model, (torch.zeros(2, 4),)\n"
        ),
    }
    argv = {
        "unknown_hardware": [str(model_file), "--hardware", "tpu9"],
        "bad_budget": [str(model_file), "--budget", "lots"],
        "unknown_override": [str(model_file), "--set", "depth=3"],
    }.get(case) or [_bad_build(tmp_path, bad_files[case])]
    assert main(["plan", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("graphopt: error: ")
    assert error.strip().count("\n") == 0, error
    assert expected in error


def test_set_values_are_typed():
    assert parse_overrides(["batch=8", "lr=0.5", "rope=false", "dtype=bfloat16"]) == {
        "batch": 8, "lr": 0.5, "rope": False, "dtype": "bfloat16"
    }


def test_without_budget_prints_baseline_least_and_pareto_table(tmp_path, capsys):
    gpt_file = tmp_path / "tiny_gpt.py"
    gpt_file.write_text(TINY_GPT_FILE)
    assert main(["plan", str(gpt_file), "--hardware", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "baseline (no budget" in out
    assert "least reachable" in out
    rows = [line for line in out.splitlines() if line.strip().endswith(("milp-optimal", "torch-min-cut", "greedy"))
            or "infeasible" in line]
    assert len(rows) >= 2


def _tiny_gpt(device: str):
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(TINY_GPT)
        idx = torch.randint(0, TINY_GPT.vocab, (2, TINY_GPT.seq))
    return model, (idx, idx)


def _comparable(plans: list[Plan]) -> list[Plan]:
    """Plans without the solver's wall time, the one field two identical plans may differ in."""
    return [dataclasses.replace(plan, solve_s=0.0) for plan in plans]


def _outcome(model, inputs, budget):
    try:
        return _comparable(plan_model(model, inputs, memory_budget=budget, hardware="cpu"))
    except BudgetInfeasibleError as error:
        return error.least_peak_bytes


@pytest.mark.parametrize("budget", [None, "300KB"])
def test_meta_model_plans_like_the_real_one(budget):
    real_model, real_inputs = _tiny_gpt("cpu")
    before = {name: p.detach().clone() for name, p in real_model.named_parameters()}
    real = _outcome(real_model, real_inputs, budget)
    meta = _outcome(*_tiny_gpt("meta"), budget)
    assert real == meta
    if isinstance(real, list):
        assert real[0].decisions and any(d.tensor.startswith("blocks.0") for d in real[0].decisions)
    # The real model was read for shapes only: nothing moved, changed, or left hooked.
    for name, parameter in real_model.named_parameters():
        assert parameter.device.type == "cpu" and torch.equal(parameter, before[name]), name
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in real_model.modules())


def test_one_trace_plans_every_budget_like_separate_calls():
    model, inputs = _tiny_gpt("meta")
    budgets = [None, "300KB", "310KB"]
    options = [{"memory_budget": b, "hardware": "cpu"} for b in budgets]
    shared = with_traced_step(
        model, inputs, lambda step: [_comparable(step.plan(options_for(model, **o))) for o in options],
        device=planning_device(get_hardware("cpu")),
    )
    separate = [_comparable(plan_model(model, inputs, memory_budget=b, hardware="cpu")) for b in budgets]
    # plan_model also weighs chunking the head + loss (none here, whose note a shared
    # trace's plans do not carry); everything else must be the same plan.
    assert all(chunking.chunks == 1 for plans in separate for plan in plans for chunking in plan.chunking)
    assert shared == [[dataclasses.replace(plan, chunking=()) for plan in plans] for plans in separate]


def test_offline_plan_equals_the_plan_graphopt_compile_makes():
    """Tracing without Dynamo gives the joint graph Dynamo + AOTAutograd give: same nodes,
    module paths and source lines, so the same plan (Inductor's 7% headroom on both).
    Only the order of a few leading nodes differs, which moves the program's timeline."""
    from graphopt.backend import session_for_options
    from graphopt.planner import EAGER_MEMORY

    model, inputs = _tiny_gpt("cpu")
    offline = _outcome(model, inputs, "300KB")
    settings = {"compiler": "eager", "prediction_headroom": 0.07, "memory_budget": "300KB", "hardware": "cpu"}
    compiled = torch.compile(model, backend="graphopt", options=settings)
    compiled(*inputs).backward()
    # compiler="eager" under a budget says its graphs run unfused; offline planning runs nothing.
    untimed = [
        dataclasses.replace(plan, timeline_bytes=(), assumptions=tuple(a for a in plan.assumptions if a != EAGER_MEMORY))
        for plan in _comparable(session_for_options(settings).plans)
    ]
    assert untimed == [dataclasses.replace(plan, timeline_bytes=()) for plan in offline]


def test_plot_writes_a_png_timeline(model_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "timeline.png"
    assert main(["plan", str(model_file), "--hardware", "cpu", "--budget", "1MB", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_cli_plan_applies_to_the_compiled_model(tmp_path):
    """``graphopt plan --json`` then ``graphopt.compile(model, plan=...)``: the same decisions."""
    import graphopt

    gpt_file = tmp_path / "gpt_tiny.py"
    gpt_file.write_text(TINY_GPT_FILE)
    out = tmp_path / "plans.json"
    assert main(["plan", str(gpt_file), "--hardware", "cpu", "--budget", "270KB", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())["plans"]
    with torch.device("cpu"):
        from examples.gpt import build

        model, inputs = build(batch=2, seq=16, n_layers=1, d_model=32, n_heads=2, vocab=64)
    compiled = graphopt.compile(model, plan=str(out), compiler="eager", hardware="cpu")
    compiled(*inputs).backward()
    (applied,) = graphopt.plans(compiled)
    assert {(d.key, d.action) for d in applied.decisions} == {(d["key"], d["action"]) for d in saved[0]["decisions"]}


def test_trainable_and_lossy_flags_reach_the_plan(tmp_path, capsys):
    gpt_file = tmp_path / "gpt_tiny.py"
    gpt_file.write_text(TINY_GPT_FILE)
    assert main(["plan", str(gpt_file), "--hardware", "cpu", "--budget", "1MB", "--trainable", "bias"]) == 0
    assert "sparse backward:" in capsys.readouterr().out
    assert main(["plan", str(gpt_file), "--hardware", "cpu", "--budget", "1MB", "--quantize-bits", "8"]) == 0


@pytest.mark.parametrize(
    "text, spec",
    [(None, "all"), ("bias", "bias"), ("a.*,b.*", ["a.*", "b.*"]), ("last_blocks=2", {"last_blocks": 2}),
     ("x.weight=0.25", {"x.weight": 0.25})],
)
def test_trainable_spec_is_read_as_compile_takes_it(text, spec):
    from graphopt.cli import parse_trainable_spec

    assert parse_trainable_spec(text) == spec


def test_an_attention_output_is_priced_with_the_attention_that_makes_it():
    """The output's own node is a free ``getitem`` of the attention op's tuple; redoing it
    means redoing the attention, and the plan's reason says what that costs."""
    import re

    model, inputs = _tiny_gpt("meta")
    (plan,) = plan_model(model, inputs, memory_budget="300KB", hardware="cpu")
    outputs = [d for d in plan.decisions if d.tensor.endswith("attention: getitem") and d.action in ("keep", "recompute")]
    assert outputs
    for decision in outputs:
        assert float(re.search(r"(\d+\.\d+) ms", decision.reason).group(1)) > 0, decision.reason
