"""Sparse fine-tuning of a small GPT with graphopt: backward memory and time vs full fine-tuning.

    cd <repo root> && python -m bench.sparse_finetune [--steps 10] [--warmup 2] \\
        [--out bench/results/sparse_finetune.csv] [--configs full,bias,last-2-blocks]

Model: ``examples.gpt.build()`` defaults (4 layers, d_model 256, 4 heads, vocab 2048,
batch 8 x seq 512), fp32, CPU, ``torch.manual_seed(0)``, compiled with
``graphopt.compile(model, trainable=...)`` (Inductor, no memory budget). One step is
``model.zero_grad(set_to_none=True); loss = compiled(*inputs); loss.backward()``.

Configurations (``trainable=``):
  full            ``"all"``
  bias            ``"bias"`` (every bias; the LM head has none)
  last-2-blocks   ``{"last_blocks": 2}`` (blocks 2 and 3; embeddings, final norm and head frozen)
  up-quarter      ``{"blocks.*.mlp.up.weight": 0.25, "blocks.*.mlp.up.bias": 0.25}`` (partial
                  channels; not in the default run)

Each configuration runs twice, each time in a fresh process (``bench.child``): once
started with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the process (see
``graphopt.measure``) to measure memory, once with glibc's default allocator to time steps.
After warm-up (the first step compiles), the memory child measures one step in two parts: the forward's peak above the
resident size before it (parameters, inputs and code excluded), and the backward's peak
measured from the same starting point, so it includes the saved activations the backward
starts with, the gradients it makes and its temporaries (``backward_added_bytes`` is the
part above what it started with). The time child times ``--steps`` steps,
forward and backward separately (medians of wall time, and of the process's CPU time,
all threads, which a machine shared with other jobs disturbs less). Ratios are full /
sparse (higher is better);
PockEngine reports 5.6x less backward memory for sparse backpropagation on its models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from bench.child import measures
from bench.script import child_main, report, run_child_script, script_parser, with_errors

CONFIGS = {
    "full": "all",
    "bias": "bias",
    "last-2-blocks": {"last_blocks": 2},
    "up-quarter": {"blocks.*.mlp.up.weight": 0.25, "blocks.*.mlp.up.bias": 0.25},
}
DEFAULT_CONFIGS = ("full", "bias", "last-2-blocks")
REFERENCE = "full"
MEGABYTE = 1_000_000
CSV_FIELDS = (
    "config", "trainable", "forward_peak_bytes", "backward_peak_bytes", "backward_memory_ratio", "backward_added_bytes",
    "median_forward_ms", "median_backward_ms", "backward_time_ratio", "median_backward_cpu_ms", "backward_cpu_time_ratio",
    "saved_bytes_before", "saved_bytes_after",
    "backward_gflops_before", "backward_gflops_after", "trained_parameters", "compile_s", "error",
)  # fmt: skip


# ---------------------------------------------------------------- child: one configuration


def run_child(config: str, steps: int, warmup: int) -> dict[str, Any]:
    """Compile, measure and time one configuration in this process."""
    import torch

    import graphopt
    from examples.gpt import build
    from graphopt.measure import measure_peak

    torch.manual_seed(0)
    model, inputs = build()
    model.train()
    compiled = graphopt.compile(model, trainable=CONFIGS[config])

    def forward() -> Any:
        model.zero_grad(set_to_none=True)
        return compiled(*inputs)

    start = time.perf_counter()
    forward().backward()
    result: dict[str, Any] = {"config": config, "compile_s": time.perf_counter() - start}
    for _ in range(max(warmup - 1, 0)):
        forward().backward()

    if measures("memory"):
        model.zero_grad(set_to_none=True)
        loss, forward_memory = measure_peak(forward, device="cpu")
        _, backward_memory = measure_peak(loss.backward, device="cpu")
        del loss
        result["forward_peak_bytes"] = forward_memory.peak_bytes
        # From the step's starting point: what the forward left (saved tensors) plus the backward's own peak.
        result["backward_peak_bytes"] = backward_memory.baseline_bytes + backward_memory.peak_bytes - forward_memory.baseline_bytes
        result["backward_added_bytes"] = backward_memory.peak_bytes  # above what the backward started with
    if measures("time"):
        forward_ms, backward_ms, backward_cpu_ms = [], [], []
        for _ in range(steps):
            start = time.perf_counter()
            loss = forward()
            middle, middle_cpu = time.perf_counter(), time.process_time()
            loss.backward()
            end, end_cpu = time.perf_counter(), time.process_time()
            forward_ms.append((middle - start) * 1000)
            backward_ms.append((end - middle) * 1000)
            backward_cpu_ms.append((end_cpu - middle_cpu) * 1000)
        result["median_forward_ms"] = statistics.median(forward_ms)
        result["median_backward_ms"] = statistics.median(backward_ms)
        result["median_backward_cpu_ms"] = statistics.median(backward_cpu_ms)
    result["trained_parameters"] = sum(p.grad.count_nonzero().item() for p in model.parameters() if p.grad is not None)
    pruning = [plan.pruning for plan in graphopt.plans(compiled) if plan.pruning is not None]
    if pruning:
        result["saved_bytes_before"] = sum(p.saved_bytes_before for p in pruning)
        result["saved_bytes_after"] = sum(p.saved_bytes_after for p in pruning)
        result["backward_gflops_before"] = sum(p.backward_flops_before for p in pruning) / 1e9
        result["backward_gflops_after"] = sum(p.backward_flops_after for p in pruning) / 1e9
    return result


# ---------------------------------------------------------------- parent


def run_config(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process and return its JSON line."""
    return run_child_script("bench.sparse_finetune", config, args, label={"config": config}, timeout_s=args.child_timeout_s)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per configuration, with full / sparse ratios of backward peak and time."""
    reference = next((r for r in results if r["config"] == REFERENCE and "error" not in r), None)
    rows = []
    for result in results:
        row = {field: result.get(field) for field in CSV_FIELDS}
        row["trainable"] = json.dumps(CONFIGS.get(result["config"]))
        if reference is not None and "error" not in result:
            row["backward_memory_ratio"] = reference["backward_peak_bytes"] / result["backward_peak_bytes"]
            row["backward_time_ratio"] = reference["median_backward_ms"] / result["median_backward_ms"]
            row["backward_cpu_time_ratio"] = reference["median_backward_cpu_ms"] / result["median_backward_cpu_ms"]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def number(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
        return "-" if value is None else f"{value / scale:.{digits}f}"

    lines = [
        f"{'config':<14} {'fwd peak MB':>11} {'bwd peak MB':>11} {'mem x':>6} {'bwd added MB':>12} {'fwd ms':>7} {'bwd ms':>7} "
        f"{'time x':>6} {'cpu x':>6} {'saved MB':>13} {'bwd GFLOP':>13}"
    ]
    for row in rows:
        saved = f"{number(row['saved_bytes_before'], MEGABYTE)}->{number(row['saved_bytes_after'], MEGABYTE)}"
        flops = f"{number(row['backward_gflops_before'], digits=1)}->{number(row['backward_gflops_after'], digits=1)}"
        lines += with_errors(
            row,
            f"{row['config']:<14} {number(row['forward_peak_bytes'], MEGABYTE):>11} "
            f"{number(row['backward_peak_bytes'], MEGABYTE):>11} {number(row['backward_memory_ratio'], digits=2):>6} "
            f"{number(row['backward_added_bytes'], MEGABYTE):>12} "
            f"{number(row['median_forward_ms']):>7} {number(row['median_backward_ms']):>7} "
            f"{number(row['backward_time_ratio'], digits=2):>6} {number(row['backward_cpu_time_ratio'], digits=2):>6} "
            f"{saved:>13} {flops:>13}"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0], name="sparse_finetune", steps=10, child_timeout_s=3600.0)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        return child_main(lambda: run_child(args.child, args.steps, args.warmup), {"config": args.child})
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    rows = summarize([run_config(config, args) for config in configs])
    report(rows, args.out, CSV_FIELDS, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
