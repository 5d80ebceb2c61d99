"""The benchmark's configurations: one table of named ways to train a model, applied in a child process.

Each entry turns a ``BenchModel`` into the callable a training step calls
(``loss = step_fn(*inputs)``), with whatever global setting it needs held for the whole
run (torch compiles lazily, on the first step, so a setting must outlive ``torch.compile``;
the child process exits after one configuration, so nothing leaks into the next).

| name | what it is |
|---|---|
| ``eager`` | no compilation |
| ``compile`` | ``torch.compile`` default (min-cut partitioner): the reference every ratio is against |
| ``torch-amb-<v>`` | ``torch._functorch.config.activation_memory_budget = v``, then ``torch.compile`` |
| ``checkpoint-full`` | ``torch.utils.checkpoint`` around every block, then ``torch.compile`` |
| ``checkpoint-selective`` | the same with a selective policy: save matmul / attention / convolution outputs, recompute the rest |
| ``torch-offload`` | GPU: PyTorch's in-tree activation offload, every saved activation tagged ``should_offload`` |
| ``torch-fp8`` | GPU: Inductor's fp8 saved-activation pass (``activation_quantization_aten_pass``) on bf16 tensors |
| ``graphopt-<f>`` | ``graphopt.compile`` with a byte budget: torch's lowest peak + f x (torch.compile's peak - lowest) |
| ``graphopt-<variant>`` | the same at the tightest fraction, with the options of ``GRAPHOPT_VARIANTS[variant]`` |

Lossy configurations (``torch-fp8``, ``graphopt-int8``, ``graphopt-lossy``: gradients
differ from the exact step) say so (``Configuration.lossy``); the tables mark them, since
they trade accuracy for memory and compare with the exact rows only with that said.

``f`` is a fraction: 1 is torch.compile's own peak, 0 the lowest peak any torch
configuration of the same run reached, below 0 lower still. The parent turns it into bytes
(``budget_bytes``) after the torch configurations have run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from bench.models import BenchModel

# The torch.compile default is activation_memory_budget 1.0; the sweep adds these points.
TORCH_AMB_SWEEP = (0.5, 0.2, 0.0)
GRAPHOPT_FRACTIONS = (1.0, 0.5, 0.0, -0.2)
# What `python -m bench --suite cpu` runs when --configs is not given: one point of each
# kind, so that three models fit in 20 minutes on an idle 2-core machine (each compiled
# configuration costs a cold Inductor compile). `--configs all` runs the whole table.
# Torch configurations whose measured peak is also a graphopt budget (`graphopt-at-<name>`).
AT_CONFIGURATIONS = ("checkpoint-full", "checkpoint-selective")
CPU_DEFAULT = ("compile", "torch-amb-0.5", "checkpoint-full", "graphopt-0.5", "graphopt-0.0")
# `--quick`: tiny shapes of every model, the reference and a checkpointing policy to set
# graphopt's budget against.
QUICK_DEFAULT = ("compile", "checkpoint-selective", "graphopt-0.0")
REFERENCE = "compile"

# Ops whose outputs the selective policy saves: the expensive ones to redo.
_SELECTIVE_SAVE_OPS = (
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.convolution.default",
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default", "aten._scaled_dot_product_cudnn_attention.default",
)  # fmt: skip

# graphopt with options beyond the budget, each at the tightest budget fraction of the sweep.
# A variant runs only where this graphopt accepts all its options (`supported_variants`).
# `trainable=` and `optimizer=` change the workload itself (fewer gradients, an optimizer
# step inside the backward), so they need torch baselines of their own and are not here.
GRAPHOPT_VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"quantize_bits": 8},  # lossy: saved activations may be stored as int8
    "lossy": {"allow_lossy": True},  # lossy: int8, int4 or int2, priced by their error
    "reorder": {"reorder": True},  # graphopt's memory-aware reordering on (off by default)
}
LOSSY_VARIANTS = ("int8", "lossy")


@dataclass(frozen=True)
class Configuration:
    name: str
    method: str  # the series it belongs to in the plots and tables
    prepare: Callable[[BenchModel, dict[str, Any], contextlib.ExitStack], Callable[..., torch.Tensor]]
    gpu_only: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    lossy: bool = False  # the step's gradients differ from the exact step's


# ---------------------------------------------------------------- how each kind prepares a model


def _prepare_eager(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    return bench_model.module


def _prepare_compile(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    return torch.compile(bench_model.module, backend=_torch_backend(spec))


def _prepare_torch_amb(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    stack.enter_context(torch._functorch.config.patch(activation_memory_budget=spec["settings"]["amb"]))
    return _prepare_compile(bench_model, spec, stack)


def _prepare_checkpoint(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    context_fn = _selective_context if spec["settings"]["selective"] else None
    for index, block in enumerate(bench_model.blocks):
        bench_model.blocks[index] = CheckpointedBlock(block, context_fn)
    return _prepare_compile(bench_model, spec, stack)


def _prepare_torch_offload(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    stack.enter_context(torch._functorch.config.patch(enable_activation_offloading=True))
    stack.enter_context(torch._inductor.config.patch(joint_custom_post_pass=TagAllForOffload()))
    return _prepare_compile(bench_model, spec, stack)


def _prepare_torch_fp8(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    # Quantize every saved bf16 activation of at least 1 MB to scaled float8_e5m2.
    fp8 = {"allowed_dtypes": "torch.bfloat16", "size_in_mb": 1, "quant_type": "torch.float8_e5m2", "use_scaling": True}
    options = {**torch._inductor.config.post_grad_fusion_options, "activation_quantization_aten_pass": fp8}
    stack.enter_context(torch._inductor.config.patch(post_grad_fusion_options=options))
    return _prepare_compile(bench_model, spec, stack)


def _prepare_graphopt(bench_model: BenchModel, spec: dict[str, Any], stack: contextlib.ExitStack):
    import graphopt

    compiler = "eager" if spec.get("backend") == "eager" else "inductor"
    options = spec["settings"].get("options", {})
    return graphopt.compile(bench_model.module, memory_budget=spec["budget_bytes"], compiler=compiler, **options)


def _torch_backend(spec: dict[str, Any]) -> str:
    """Inductor, or ``aot_eager`` (same partition, no code generation) for smoke tests."""
    return "aot_eager" if spec.get("backend") == "eager" else "inductor"


class CheckpointedBlock(nn.Module):
    """A block run under non-reentrant ``torch.utils.checkpoint``, optionally with a selective policy."""

    def __init__(self, block: nn.Module, context_fn: Callable | None):
        super().__init__()
        self.block = block
        self.context_fn = context_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        # Dynamo traces `context_fn` only when given: pass none for full checkpointing.
        options = {"context_fn": self.context_fn} if self.context_fn is not None else {}
        return checkpoint(self.block, *args, use_reentrant=False, **options, **kwargs)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if str(op) in _SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy)


class TagAllForOffload(CustomGraphPass):
    """A joint-graph pass that asks torch's activation offload to move every saved activation.

    ``enable_activation_offloading`` offloads only nodes whose ``meta["should_offload"]`` is
    set, and itself skips those it cannot offload (views, graph outputs, static inputs).
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function":
                node.meta["should_offload"] = True

    def uuid(self) -> str:
        return "bench.configs.TagAllForOffload/1"


# ---------------------------------------------------------------- the table


def _torch_configurations() -> list[Configuration]:
    configurations = [
        Configuration("eager", "eager", _prepare_eager),
        Configuration(REFERENCE, "torch.compile", _prepare_compile),
    ]
    configurations += [
        Configuration(f"torch-amb-{amb}", "torch activation_memory_budget", _prepare_torch_amb, settings={"amb": amb})
        for amb in TORCH_AMB_SWEEP
    ]
    configurations += [
        Configuration("checkpoint-full", "checkpointing", _prepare_checkpoint, settings={"selective": False}),
        Configuration("checkpoint-selective", "checkpointing", _prepare_checkpoint, settings={"selective": True}),
        Configuration("torch-offload", "torch offload / fp8", _prepare_torch_offload, gpu_only=True),
        Configuration("torch-fp8", "torch offload / fp8", _prepare_torch_fp8, gpu_only=True, lossy=True),
    ]
    return configurations


def _graphopt_configurations() -> list[Configuration]:
    configurations = [
        Configuration(f"graphopt-{fraction}", "graphopt", _prepare_graphopt, settings={"fraction": fraction})
        for fraction in GRAPHOPT_FRACTIONS
    ]
    tightest = min(GRAPHOPT_FRACTIONS)
    configurations += [
        Configuration(
            f"graphopt-{variant}", f"graphopt {variant}", _prepare_graphopt,
            settings={"fraction": tightest, "options": options}, lossy=variant in LOSSY_VARIANTS,
        )  # fmt: skip
        for variant, options in GRAPHOPT_VARIANTS.items()
    ]
    # graphopt asked for exactly the peak a checkpointing configuration measured.
    configurations += [
        Configuration(f"graphopt-at-{name}", "graphopt", _prepare_graphopt, settings={"at": name})
        for name in AT_CONFIGURATIONS
    ]
    return configurations


CONFIGURATIONS: dict[str, Configuration] = {c.name: c for c in _torch_configurations() + _graphopt_configurations()}


def is_graphopt(name: str) -> bool:
    settings = CONFIGURATIONS[name].settings
    return "fraction" in settings or "at" in settings


def supported_variants() -> set[str]:
    """Names of graphopt configurations whose options this graphopt accepts."""
    from graphopt.config import make_options
    from graphopt.errors import GraphoptError

    supported = set()
    for configuration in CONFIGURATIONS.values():
        try:
            make_options(**configuration.settings.get("options", {}))
        except (GraphoptError, TypeError, ValueError):
            continue
        supported.add(configuration.name)
    return supported


@contextlib.contextmanager
def prepared(bench_model: BenchModel, spec: dict[str, Any]) -> Iterator[Callable[..., torch.Tensor]]:
    """The step function of configuration ``spec["config"]``, its settings held while in use."""
    configuration = CONFIGURATIONS[spec["config"]]
    with contextlib.ExitStack() as stack:
        yield configuration.prepare(bench_model, {**spec, "settings": configuration.settings}, stack)
