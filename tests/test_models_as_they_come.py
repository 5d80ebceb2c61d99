"""Models as users bring them (issue 16, item 5): Hugging Face T5 (encoder-decoder),
Qwen2 (grouped-query attention), GPT-2 with ``gradient_checkpointing_enable()``, a peft
LoRA model (frozen base, trainable adapters) and ResNet-18 as torchvision defines it.
Each is built from a config (no download), tiny, with dropout off.

Two checks per model:

- ``test_training_step_equals_eager`` (``compiler="eager"``): loss and gradients equal
  eager's, without a budget and at a tight one that makes graphopt recompute.
- ``test_measured_peak_meets_half_of_eagers_activation_peak`` (Inductor, a process of
  its own under ``MALLOC_MMAP_THRESHOLD_=65536``): measured with
  ``measure_peak(cpu_method="allocated")`` plus what is resident before the step
  (parameters, buffers, inputs), a warmed-up step's peak, gradients allocated anew;

      eager's activation peak = eager's measured peak - resident - parameter gradients
      budget = resident + parameter gradients + eager's activation peak / 2

  (gradients count in full: no plan drops them without ``optimizer=``). graphopt's
  measured peak must be at most the budget; or graphopt raises ``BudgetInfeasibleError``,
  whose least reachable peak must then be at most the measured peak of per-block
  checkpointing (``torch.utils.checkpoint`` around every block, eager, measured the same
  way): a budget graphopt refuses should be one the standard alternative misses too.

``python tests/test_models_as_they_come.py --table`` measures every model again, adds
the step time against ``torch.compile`` (alternating steps in one process; never a test
assertion) and prints the table of docs/models.md.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import graphopt

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- models


class LossOf(nn.Module):
    """A Hugging Face (or peft) model called with its labels; returns the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.model.train()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs).loss


def t5() -> nn.Module:
    import transformers

    config = transformers.T5Config(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return LossOf(transformers.T5ForConditionalGeneration(config))


def qwen2() -> nn.Module:
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
    )  # fmt: skip
    return LossOf(transformers.Qwen2ForCausalLM(config))


def gpt2_checkpointed() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias is what users call
        model.gradient_checkpointing_enable()
    # transformers 5 maps no loss type to the class name GPT2LMHeadModel and logs a
    # warning inside the traced forward, which Dynamo cannot trace: five graph breaks
    # (issue 16, item 1, tested elsewhere). Naming the loss keeps one graph.
    model.loss_type = "ForCausalLM"
    return LossOf(model)


def mistral_lora() -> nn.Module:
    import peft
    import transformers

    config = transformers.MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
    )  # fmt: skip
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return LossOf(peft.get_peft_model(transformers.MistralForCausalLM(config), lora))


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (torchvision does not import beside CPU torch 2.13 here)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18: BasicBlock, [2, 2, 2, 2], torchvision's initialisation."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18Loss(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ResNet18()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(images), labels)


class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (non-reentrant, as Hugging Face does)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def checkpoint_hugging_face(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.model.gradient_checkpointing_enable()
    return model


def checkpoint_resnet(model: nn.Module) -> nn.Module:
    for stage in (model.net.layer1, model.net.layer2, model.net.layer3, model.net.layer4):
        for index, block in enumerate(stage):
            stage[index] = Checkpointed(block)
    return model


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def t5_inputs() -> tuple[tuple, dict]:
    generator = _generator()
    input_ids = torch.randint(2, 256, (4, 64), generator=generator)
    return (), {"input_ids": input_ids, "labels": torch.randint(2, 256, (4, 32), generator=generator)}


def token_inputs() -> tuple[tuple, dict]:
    input_ids = torch.randint(0, 256, (4, 64), generator=_generator())
    return (), {"input_ids": input_ids, "labels": input_ids}


def image_inputs() -> tuple[tuple, dict]:
    generator = _generator()
    return (torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)), {}


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    checkpoint_blocks: Callable[[nn.Module], nn.Module]  # per-block checkpointing of a built model
    needs: str  # the package the model comes from


CASES = {
    "t5": Case(t5, t5_inputs, checkpoint_hugging_face, "transformers"),
    "qwen2_gqa": Case(qwen2, token_inputs, checkpoint_hugging_face, "transformers"),
    "gpt2_gradient_checkpointing": Case(gpt2_checkpointed, token_inputs, lambda model: model, "transformers"),
    "mistral_lora": Case(mistral_lora, token_inputs, checkpoint_hugging_face, "peft"),
    "resnet18": Case(ResNet18Loss, image_inputs, checkpoint_resnet, "torch"),
}

# ----------------------------------------------------------------------------- equal to eager


def _max_errors(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Per parameter: the largest gradient difference, relative to the reference's largest entry."""
    errors = {}
    for (name, parameter), other in zip(model.named_parameters(), reference.parameters()):
        if other.grad is not None:
            errors[name] = ((parameter.grad - other.grad).abs().max() / other.grad.abs().max().clamp_min(1e-30)).item()
    return errors


def _assert_as_close_as_torch_compile(name: str, inputs: tuple, kwargs: dict, model: nn.Module) -> None:
    """ResNet-18 at batch 4: layer4's BatchNorm normalises over 4 values, and the
    decomposed BatchNorm backward torch.compile and graphopt run differs from eager's
    fused one by up to 4e-5 of a gradient's largest entry (aot_eager_decomp_partition,
    measured). graphopt changes no arithmetic: it must equal that backend within fp32
    tolerance, and be no further from eager than it."""
    from conftest import ATOL, RTOL, assert_grads_equal, training_step

    torch.manual_seed(0)
    fresh = CASES[name].build()
    eager = copy.deepcopy(fresh)
    torch_compiled = copy.deepcopy(fresh)
    training_step(eager, inputs, kwargs)
    torch._dynamo.reset()
    training_step(torch.compile(torch_compiled, backend="aot_eager_decomp_partition"), inputs, kwargs)
    assert_grads_equal(torch_compiled, model, rtol=RTOL, atol=ATOL)
    theirs, ours = _max_errors(torch_compiled, eager), _max_errors(model, eager)
    for parameter, error in ours.items():
        assert error <= theirs[parameter] * 1.01 + 1e-7, (parameter, error, theirs[parameter])


# Gradient equality needs a plan that recomputes, not the best one: planning stops after
# 10 s (the default 30 s, spent on repair rounds and a sweep, would triple these tests).
_SOLVER_TIME_LIMIT_S = 10


@pytest.mark.parametrize("name", list(CASES))
def test_training_step_equals_eager(name):
    """Without a budget, then at static memory plus 3/4 of what the no-budget plan adds
    (halfway between the least budget graphopt meets and the no-budget peak where that
    is infeasible): loss and gradients equal eager's."""
    from conftest import assert_same_training_step

    case = CASES[name]
    pytest.importorskip(case.needs)
    args, kwargs = case.inputs()
    tolerances = {"rtol": 1e-3, "atol": 1e-3} if name == "resnet18" else {}  # checked tightly below

    def step_equals_eager(budget: int | None):
        return assert_same_training_step(
            case.build, args, input_kwargs=kwargs, memory_budget=budget,
            solver_time_limit_s=_SOLVER_TIME_LIMIT_S, **tolerances,
        )  # fmt: skip

    plans = graphopt.plans(step_equals_eager(None))
    assert len(plans) == 1, f"{name}: {len(plans)} graphs; models as they come should compile to one here"
    (free_plan,) = plans
    static = sum(free_plan.memory[kind] for kind in ("parameters", "inputs", "gradients"))
    budget = static + (free_plan.predicted_peak_bytes - static) * 3 // 4
    torch._dynamo.reset()
    try:
        compiled = step_equals_eager(budget)
    except graphopt.BudgetInfeasibleError as error:  # raised while compiling, before any step
        torch._dynamo.reset()
        assert error.least_budget_bytes < free_plan.predicted_peak_bytes, f"{name}: nothing to recompute"
        budget = (error.least_budget_bytes + free_plan.predicted_peak_bytes) // 2
        compiled = step_equals_eager(budget)
    (plan,) = graphopt.plans(compiled)
    assert plan.predicted_peak_bytes <= budget
    assert any(decision.action == "recompute" for decision in plan.decisions), plan
    if name == "resnet18":
        _assert_as_close_as_torch_compile(name, args, kwargs, compiled._orig_mod)


# ----------------------------------------------------------------------------- memory


def _storage_bytes(tensors) -> int:
    """Bytes of the tensors' storages, each storage counted once."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def _step_peak(model: Any, args: tuple, kwargs: dict, parameters: nn.Module) -> int:
    """The allocator's peak during one warmed-up step, gradients allocated anew."""

    def step() -> None:
        model(*args, **kwargs).backward()

    parameters.zero_grad(set_to_none=True)
    step()
    parameters.zero_grad(set_to_none=True)
    _, peak = graphopt.measure_peak(step, device="cpu", cpu_method="allocated")
    return peak.peak_bytes


def _step_ms_ratio(first: tuple[Any, nn.Module], second: tuple[Any, nn.Module], args: tuple, kwargs: dict) -> float:
    """Median of first's step time over the median of second's, their warmed-up steps
    alternating; each item is (compiled model, the module holding its parameters)."""
    times: list[list[float]] = [[], []]
    for _ in range(7):
        for index, (model, parameters) in enumerate((first, second)):
            parameters.zero_grad(set_to_none=True)
            start = time.perf_counter()
            model(*args, **kwargs).backward()
            times[index].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def _compile_at_a_least_budget(model: nn.Module, args: tuple, kwargs: dict, error: graphopt.BudgetInfeasibleError):
    """graphopt at 2% over the least budget an infeasible compile reported. Planning is
    time-limited, so that budget may be refused again with a higher least budget (T5:
    3.38 MB reported, 3.45 MB refused): up to three tries. Returns (compiled model, its
    module, the budget)."""
    for _ in range(3):
        torch._dynamo.reset()
        budget = int(error.least_budget_bytes * 1.02)
        ours = copy.deepcopy(model)
        compiled = graphopt.compile(ours, memory_budget=budget)
        try:
            compiled(*args, **kwargs).backward()  # plans and compiles
            return compiled, ours, budget
        except graphopt.BudgetInfeasibleError as again:
            error = again
    raise error


def measure(name: str, *, table: bool = False) -> dict:
    """Eager's peak, the budget, and graphopt's measured and predicted peaks (or its
    least reachable peak beside per-block checkpointing's measured one). With `table`,
    also graphopt at 2% over its least budget when the budget is infeasible, and the
    step time against torch.compile."""
    case = CASES[name]
    args, kwargs = case.inputs()
    torch.manual_seed(0)
    model = case.build()
    # Resident before the step (outside measure_peak's figure): parameters, buffers, inputs.
    static = _storage_bytes([*model.parameters(), *model.buffers()]) + _storage_bytes([*args, *kwargs.values()])
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    eager = copy.deepcopy(model)
    figures: dict[str, Any] = {"model": name, "static": static, "gradients": gradients}
    figures["eager"] = static + _step_peak(eager, args, kwargs, eager)
    activations = figures["eager"] - static - gradients
    figures["budget"] = budget = static + gradients + activations // 2
    torch._dynamo.reset()
    try:
        ours = copy.deepcopy(model)
        compiled = graphopt.compile(ours, memory_budget=budget)
        figures["measured"] = static + _step_peak(compiled, args, kwargs, ours)
    except graphopt.BudgetInfeasibleError as error:
        figures["least_peak"], figures["least_budget"] = error.least_peak_bytes, error.least_budget_bytes
        checkpointed = case.checkpoint_blocks(copy.deepcopy(model))
        figures["checkpointed"] = static + _step_peak(checkpointed, args, kwargs, checkpointed)
        if not table:
            return figures
        compiled, ours, figures["budget_used"] = _compile_at_a_least_budget(model, args, kwargs, error)
        figures["measured"] = static + _step_peak(compiled, args, kwargs, ours)
    plans = graphopt.plans(compiled)
    figures["predicted"] = max(plan.predicted_peak_bytes for plan in plans)
    figures["graphs"] = len(plans)
    figures["assumptions"] = [assumption[:300] for plan in plans for assumption in plan.assumptions]
    if table:
        theirs = copy.deepcopy(model)
        torch_compiled = torch.compile(theirs)
        figures["torch_compile"] = static + _step_peak(torch_compiled, args, kwargs, theirs)
        figures["time_vs_torch_compile"] = _step_ms_ratio((compiled, ours), (torch_compiled, theirs), args, kwargs)
    return figures


def _measure_in_a_process(name: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, __file__, "--measure", name], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)
    return figures


_XFAIL = {
    "t5": (
        "graphopt's least reachable peak on T5 (3.26-3.44 MB over runs: planning stops at its 30 s limit) is above "
        "per-block checkpointing's measured 2.90 MB; the program's budget and the simulated peak of its split "
        "disagree by ~0.9 MB (program 2.48 MB -> simulated 3.38 MB) and each repair round takes ~35 s here"
    ),
    "resnet18": (
        "graphopt's least reachable peak on ResNet-18 (117.5 MB) is above per-block checkpointing's measured 90.6 MB "
        "and eager's whole step (90.6 MB): Inductor's CPU convolutions keep weight copies (torch.compile's own step "
        "measures 118.6 MB) that no plan recomputes or frees"
    ),
}


# T5's outcome depends on how far its 30 s planning clock gets on a loaded machine: since
# solves are bounded by the best plan found, some runs meet the budget (2026-12-02, full
# suite: one pass, one fail). It stays marked until it passes every run.
_SOMETIMES_PASSES = {"t5"}


def _known_bug(name: str):
    return pytest.mark.xfail(strict=name not in _SOMETIMES_PASSES, raises=AssertionError, reason=_XFAIL[name])


@pytest.mark.inductor
@pytest.mark.parametrize("name", [pytest.param(name, marks=_known_bug(name)) if name in _XFAIL else name for name in CASES])
def test_measured_peak_meets_half_of_eagers_activation_peak(name):
    pytest.importorskip(CASES[name].needs)
    figures = _measure_in_a_process(name)
    assert figures["eager"] > figures["budget"]
    if "measured" in figures:
        assert figures["predicted"] <= figures["budget"], figures
        assert figures["measured"] <= figures["budget"], figures
    else:
        assert figures["least_budget"] > figures["budget"], figures
        assert figures["least_peak"] <= figures["checkpointed"], figures


# ----------------------------------------------------------------------------- docs table


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} MB"


def table_rows(all_figures: list[dict]) -> str:
    """docs/models.md's table: one row per model's figures from ``measure(..., table=True)``."""
    lines = [
        "| model | eager peak | `torch.compile` peak | budget: 50% of eager's activations | graphopt measured peak "
        "| predicted peak | least reachable peak / per-block checkpointing | step time vs `torch.compile` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for figures in all_figures:
        budget, least = _megabytes(figures["budget"]), "-"
        if "least_peak" in figures:
            budget += f": infeasible; measured at {_megabytes(figures['budget_used'])}"
            least = f"{_megabytes(figures['least_peak'])} / {_megabytes(figures['checkpointed'])}"
        cells = [
            figures["model"], _megabytes(figures["eager"]), _megabytes(figures.get("torch_compile")), budget,
            _megabytes(figures.get("measured")), _megabytes(figures.get("predicted")), least,
            f"{figures.get('time_vs_torch_compile', float('nan')):.2f}x",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "tests"))
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
    elif sys.argv[1:2] == ["--table"]:
        results = []
        for case_name in sys.argv[2:] or CASES:
            torch._dynamo.reset()
            results.append(measure(case_name, table=True))
            print(json.dumps(results[-1]), flush=True)
        print(table_rows(results))
    else:
        sys.exit("usage: python tests/test_models_as_they_come.py --measure NAME | --table [NAME ...]")
