"""Measured peak memory with graphopt's memory-aware reordering on vs off (Inductor's own order).

    cd <repo root> && python -m bench.reorder [--models gpt,resnet] [--steps 10] [--warmup 2] \\
        [--out bench/results/reorder.csv]

Models (fp32, CPU, ``torch.manual_seed(0)``):
  gpt     ``examples.gpt.build()`` defaults (4 layers, d_model 256, batch 8 x seq 512)
  resnet  a ResNet-like CNN built here (basic residual blocks 2-2-2-2 with BatchNorm and
          ReLU, widths 32-256, batch 16 of 64x64 images, 10 classes), train mode
  heads   a shared Linear-tanh trunk (d 128) under four 4096-class Linear heads, the sum
          of their cross-entropies, batch 2048: independent branches whose big logit
          gradients graphopt's simulation can free one head at a time

Configurations, each run twice in fresh processes (``bench.child``): started with
``MALLOC_MMAP_THRESHOLD_=65536`` (see ``graphopt.measure``) to measure memory, with glibc's
default allocator to time steps; all compiled with Inductor and no memory budget (torch's
min-cut partition, so only the order differs):
  inductor-order   ``graphopt.compile(model, reorder=False)`` (the default): the
                   partitioner's order, then Inductor's own ``reorder_for_peak_memory``
  graphopt-order   ``graphopt.compile(model, reorder=True)``: graphopt's reordering; where
                   it beat Inductor's heuristics on graphopt's simulation, Inductor keeps it
  no-reorder       ``reorder=False`` and Inductor's ``reorder_for_peak_memory`` off: the
                   partitioner's order as is (what either reordering starts from)

A child warms up (the first step compiles); the memory child measures the peak of one
step above the resident size before it (``graphopt.measure_peak``; parameters and inputs
are outside it, the step's gradients inside), the time child times ``--steps`` steps (median). Times are
reported only as ratios to ``inductor-order`` of the same model, in the same run. Each
configuration compiles cold, in an Inductor cache of its own (``bench.child``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench.child import measure_step
from bench.script import child_main, report, run_child_script, script_parser, with_errors

MODELS = ("gpt", "resnet", "heads")
CONFIGS = ("inductor-order", "graphopt-order", "no-reorder")
REFERENCE = "inductor-order"
MEGABYTE = 1_000_000
CSV_FIELDS = (
    "model", "config", "param_bytes", "peak_bytes", "peak_vs_inductor_order", "predicted_peak_bytes",
    "forward_reorder", "backward_reorder", "median_step_ms", "time_ratio_vs_inductor_order", "compile_s", "error",
)  # fmt: skip


# ---------------------------------------------------------------- the ResNet-like model


def build_resnet(batch: int = 16, image_size: int = 64, classes: int = 10):
    """A small ResNet (basic blocks) returning the cross-entropy loss, and its inputs."""
    import torch
    import torch.nn.functional as functional
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, in_channels: int, channels: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.shortcut = nn.Identity()
            if stride != 1 or in_channels != channels:
                self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))

        def forward(self, x):
            out = functional.relu(self.bn1(self.conv1(x)))
            return functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class ResNetLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            blocks, in_channels = [], 32
            for channels, stride in ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)):
                blocks.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(in_channels, classes)

        def forward(self, images, labels):
            features = self.blocks(self.stem(images)).mean(dim=(2, 3))
            return functional.cross_entropy(self.head(features), labels)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return ResNetLike(), (images, labels)


def build_heads(batch: int = 2048, d_model: int = 128, classes: int = 4096, heads: int = 4):
    """Several classifier heads on one trunk, returning the summed loss, and its inputs."""
    import torch
    import torch.nn.functional as functional
    from torch import nn

    class MultiHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(d_model, d_model)
            self.heads = nn.ModuleList(nn.Linear(d_model, classes) for _ in range(heads))

        def forward(self, features, labels):
            hidden = torch.tanh(self.trunk(features))
            logits = [head(hidden) for head in self.heads]
            return sum(functional.cross_entropy(each, labels) for each in logits)

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, d_model, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return MultiHead(), (features, labels)


def build(model_name: str):
    if model_name == "gpt":
        from examples.gpt import build as build_gpt

        return build_gpt()
    if model_name == "resnet":
        return build_resnet()
    if model_name == "heads":
        return build_heads()
    raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")


# ---------------------------------------------------------------- child: one configuration


def _train_step(model: Any, compiled: Any, inputs: tuple) -> None:
    model.zero_grad(set_to_none=True)
    compiled(*inputs).backward()


def _compile(model: Any, config: str):
    """The compiled model and a context to run the compiling first step in."""
    import contextlib

    import torch

    import graphopt

    if config == "inductor-order":
        return graphopt.compile(model, reorder=False), contextlib.nullcontext()
    if config == "graphopt-order":
        return graphopt.compile(model, reorder=True), contextlib.nullcontext()
    if config == "no-reorder":
        # Compilation is lazy (the backward at the first backward): patch around the first step.
        return graphopt.compile(model, reorder=False), torch._inductor.config.patch(reorder_for_peak_memory=False)
    raise ValueError(f"unknown configuration {config!r}; choose from {CONFIGS}")


def _describe_reordering(reordering) -> str:
    return f"{reordering.peak_before_bytes}->{reordering.peak_after_bytes} {reordering.method}" + (
        "" if reordering.inductor_reorder else " (inductor keeps it)"
    )


def run_child(model_name: str, config: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    import graphopt

    torch.manual_seed(0)
    model, inputs = build(model_name)
    model.train()
    result: dict[str, Any] = {
        "model": model_name,
        "config": config,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    compiled, first_step_context = _compile(model, config)
    start = time.perf_counter()
    with first_step_context:
        _train_step(model, compiled, inputs)
    result["compile_s"] = time.perf_counter() - start
    plans = graphopt.plans(compiled)
    result["predicted_peak_bytes"] = max((p.predicted_peak_bytes for p in plans), default=None)
    for graph in ("forward", "backward"):
        entries = [r for p in plans for r in p.reordering if r.graph == graph]
        result[f"{graph}_reorder"] = "; ".join(_describe_reordering(r) for r in entries) or None

    for _ in range(max(warmup - 1, 0)):
        _train_step(model, compiled, inputs)
    measured = measure_step(
        lambda: _train_step(model, compiled, inputs),
        steps=steps,
        reset=lambda: model.zero_grad(set_to_none=True),  # the baseline holds parameters and inputs only
    )
    return {**result, **measured}


# ---------------------------------------------------------------- parent


def run_config(model_name: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a fresh process; its JSON line, or an error as data."""
    label = {"model": model_name, "config": config}
    return run_child_script("bench.reorder", f"{model_name}:{config}", args, label=label, timeout_s=args.child_timeout_s)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSV rows with each peak and time as a ratio to the same model's inductor-order run."""
    reference = {r["model"]: r for r in results if r["config"] == REFERENCE and "error" not in r}
    rows = []
    for result in results:
        row = {field: result.get(field) for field in CSV_FIELDS}
        base = reference.get(result["model"])
        if base and result.get("peak_bytes") is not None:
            row["peak_vs_inductor_order"] = result["peak_bytes"] / base["peak_bytes"]
            row["time_ratio_vs_inductor_order"] = result["median_step_ms"] / base["median_step_ms"]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"{'model':<7} {'config':<15} {'peak MB':>8} {'x inductor':>10} {'pred MB':>8} {'time x':>7}  reordering (fwd | bwd)"]
    for row in rows:
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / MEGABYTE:.1f}"
        predicted = "-" if row["predicted_peak_bytes"] is None else f"{row['predicted_peak_bytes'] / MEGABYTE:.1f}"
        lines += with_errors(
            row,
            f"{row['model']:<7} {row['config']:<15} {peak:>8} {ratio(row['peak_vs_inductor_order']):>10} {predicted:>8} "
            f"{ratio(row['time_ratio_vs_inductor_order']):>7}  {row['forward_reorder'] or '-'} | {row['backward_reorder'] or '-'}"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0], name="reorder", steps=10, child_timeout_s=1800.0)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        model_name, _, config = args.child.partition(":")
        return child_main(lambda: run_child(model_name, config, args.steps, args.warmup), {"model": model_name, "config": config})
    results = [run_config(m, c, args) for m in args.models.split(",") for c in args.configs.split(",")]
    rows = summarize(results)
    report(rows, args.out, CSV_FIELDS, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
