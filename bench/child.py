"""Run one benchmark configuration in a fresh process and hand back one JSON line.

The parent (``bench.suite``, ``bench.gpt_budget_frontier``) starts ``python -m bench.child
'<json spec>'`` for every configuration, so compilation caches in memory, allocator state
and global torch settings never carry from one configuration to the next. On CPU the child
starts with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc reads it only at start-up) so freed
tensors leave the process and the resident high-water mark tracks live tensors (see
``graphopt.measure``).

One training step is ``module.zero_grad(set_to_none=True); loss = step_fn(*inputs);
loss.backward()``. The child times the first step (compilation and graphopt's solve
happen there), runs ``warmup - 1`` more, measures the peak of one step above the memory
resident before it (parameters, inputs and compiled code are outside it; the step's
gradients inside), then times ``steps`` steps and reports their median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ---------------------------------------------------------------- parent side


def run_in_child(spec: dict[str, Any], *, timeout_s: float, environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `spec` in a fresh ``python -m bench.child`` process; failures come back as ``{"error": ...}``."""
    command = [sys.executable, "-m", "bench.child", json.dumps(spec)]
    env = {**os.environ, **CHILD_ENVIRONMENT, **(environment or {})}
    try:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    json_lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not json_lines:
        tail = " | ".join(completed.stderr.strip().splitlines()[-5:])
        return {**spec, "error": f"exit {completed.returncode}: {tail}"}
    return json.loads(json_lines[-1])


# ---------------------------------------------------------------- child side


def train_step(module: Any, step_fn: Any, inputs: tuple) -> float:
    """One training step; returns the loss."""
    module.zero_grad(set_to_none=True)
    loss = step_fn(*inputs)
    loss.backward()
    return loss.item()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_training(module: Any, step_fn: Any, inputs: tuple, *, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Compile time (the first step), the peak of one step, and the median of `steps` timed steps."""
    from graphopt.measure import measure_peak

    start = time.perf_counter()
    loss = train_step(module, step_fn, inputs)
    _synchronize(device)
    compile_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        train_step(module, step_fn, inputs)
    # Drop the last step's gradients first, so the baseline holds parameters and inputs
    # only and the measured peak includes the gradients this step makes.
    module.zero_grad(set_to_none=True)
    _, memory = measure_peak(lambda: train_step(module, step_fn, inputs), device=device)
    step_ms = []
    for _ in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        train_step(module, step_fn, inputs)
        _synchronize(device)
        step_ms.append((time.perf_counter() - start) * 1000)
    return {
        "loss": loss,
        "compile_s": compile_s,
        "peak_bytes": memory.peak_bytes,
        "baseline_bytes": memory.baseline_bytes,
        "median_step_ms": statistics.median(step_ms) if step_ms else None,
        "min_step_ms": min(step_ms, default=None),
        "max_step_ms": max(step_ms, default=None),
    }


def graphopt_report(step_fn: Any) -> dict[str, Any]:
    """What graphopt planned: predicted peak, solve time, and the largest plan's memory timeline."""
    import graphopt

    plans = graphopt.plans(step_fn)
    if not plans:
        return {}
    largest = max(plans, key=lambda plan: plan.predicted_peak_bytes)
    return {
        "predicted_peak_bytes": largest.predicted_peak_bytes,
        "solve_s": sum(plan.solve_s for plan in plans),
        "plan_methods": sorted({plan.method for plan in plans}),
        "timeline_bytes": list(largest.timeline_bytes),
        "num_forward_steps": largest.num_forward_steps,
        "graphs": len(plans),
    }


def run_configuration(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model, prepare the configuration, and measure it, in this process."""
    import torch

    from bench.configs import is_graphopt, prepared
    from bench.models import build_model

    bench_model = build_model(spec["model"], suite=spec["suite"], size=spec["size"])
    module = bench_model.module
    static = list(module.parameters()) + list(module.buffers())
    result = {
        **spec,
        "shape": bench_model.shape,
        "static_bytes": sum(t.numel() * t.element_size() for t in static),
        "input_bytes": sum(t.numel() * t.element_size() for t in bench_model.inputs),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    device = "cuda" if spec["suite"] == "gpu" else "cpu"
    with prepared(bench_model, spec) as step_fn:
        result.update(
            measure_training(module, step_fn, bench_model.inputs, steps=spec["steps"], warmup=spec["warmup"], device=device)
        )
        if is_graphopt(spec["config"]):
            result.update(graphopt_report(step_fn))
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        result = run_configuration(spec)
    except Exception as error:  # reported as data, so the suite goes on
        result = {**spec, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
