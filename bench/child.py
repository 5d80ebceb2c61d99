"""Run one benchmark configuration in fresh processes and hand back one JSON line.

The suite (``bench.suite``) starts ``python -m bench.child '<json spec>'`` for every
configuration, and the single-purpose scripts start themselves with ``--child``
(``bench.script``), so compilation caches in memory, allocator state and global torch
settings never carry from one configuration to the next. Both go through ``run_measuring``.

On CPU a configuration runs twice, each time in a fresh process, and the two results are
merged (``run_measuring``):

- **memory**: started with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc reads it only at
  start-up) so freed tensors leave the process and the resident high-water mark tracks
  live tensors (see ``graphopt.measure``). Its peaks, compile time and predictions count.
- **time**: started with glibc's default allocator, as a user trains. The fixed threshold
  makes every tensor above 64 KiB a fresh ``mmap``, page-faulted on first touch and
  unmapped when freed: on the bench GPT (``examples.gpt``) that is ~110,000 page faults
  per step instead of ~24,000, and ``torch.compile``'s step takes 1069 ms instead of
  955 ms. Timing there would time the measurement, so step times come from this run.

A child learns which it is from ``GRAPHOPT_BENCH_MEASURES`` (``measures``); without it
(CUDA, where the caching allocator is unaffected, or a child started by hand) it does both.

Every configuration compiles cold: ``run_measuring`` gives each call a fresh Inductor
cache directory of its own (``TORCHINDUCTOR_CACHE_DIR``; Triton's cache lives inside it),
which the memory run fills first, so no configuration's compile time profits from
another's, whatever order they run in. The time run reuses it (its compile is not reported).

One training step is ``module.zero_grad(set_to_none=True); loss = step_fn(*inputs);
loss.backward()``. The child times the first step (compilation and graphopt's solve
happen there) and runs ``warmup - 1`` more. The memory run then measures the peak of one
step above the memory resident before it (parameters, inputs and compiled code are outside
it; the step's gradients inside); the time run times ``steps`` steps and reports their median.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MEASURES_VARIABLE = "GRAPHOPT_BENCH_MEASURES"
# Compilation caches a child must not inherit: each configuration gets fresh ones.
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


# ---------------------------------------------------------------- parent side


def run_in_child(spec: dict[str, Any], *, timeout_s: float, environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure `spec` in fresh ``python -m bench.child`` processes; failures come back as ``{"error": ...}``."""
    command = [sys.executable, "-m", "bench.child", json.dumps(spec)]
    runs = ("both",) if spec.get("suite") == "gpu" else ("memory", "time")
    return run_measuring(command, label=spec, timeout_s=timeout_s, environment=environment, runs=runs)


def run_measuring(
    command: list[str],
    *,
    label: dict[str, Any],
    timeout_s: float,
    environment: dict[str, str] | None = None,
    runs: tuple[str, ...] = ("memory", "time"),
) -> dict[str, Any]:
    """Run `command`, a child that prints its result as a JSON line, once per entry of
    `runs`: ``"memory"``, ``"time"`` (see the module's docstring) or ``"both"`` in one
    process (CUDA). The results are merged, an earlier run's value winning where two
    report one. Failures come back as data, labelled with `label`.

    The runs share a fresh Inductor cache made for this call (the first compiles cold);
    `environment` may name another ``TORCHINDUCTOR_CACHE_DIR``."""
    merged: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        extra = {"TORCHINDUCTOR_CACHE_DIR": cache, **(environment or {})}
        for run in runs:
            result = _run_child(command, label, timeout_s, _environment(run, extra))
            if "error" in result:
                return {**merged, **result, "error": f"{run} run: {result['error']}"} if merged else result
            merged = {**result, **merged}
    return merged


def _environment(run: str, extra: dict[str, str] | None) -> dict[str, str]:
    replaced = (*MEMORY_ENVIRONMENT, MEASURES_VARIABLE, *CACHE_VARIABLES)
    environment = {name: value for name, value in os.environ.items() if name not in replaced}
    if run in ("memory", "both"):
        environment.update(MEMORY_ENVIRONMENT)
    if run != "both":
        environment[MEASURES_VARIABLE] = run
    return {**environment, **(extra or {})}


def _run_child(command: list[str], label: dict[str, Any], timeout_s: float, environment: dict[str, str]) -> dict[str, Any]:
    try:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {**label, "error": f"timed out after {timeout_s:.0f} s"}
    json_lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not json_lines:
        tail = " | ".join(completed.stderr.strip().splitlines()[-5:])
        return {**label, "error": f"exit {completed.returncode}: {tail}"}
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


def measures(what: str) -> bool:
    """In a child: whether this process measures `what`, ``"memory"`` or ``"time"``."""
    return os.environ.get(MEASURES_VARIABLE, what) == what


def measure_training(module: Any, step_fn: Any, inputs: tuple, *, steps: int, warmup: int, device: str) -> dict[str, Any]:
    """Compile time (the first step), then the peak of one step or the median of `steps`
    timed steps, or both (see ``measures``)."""
    start = time.perf_counter()
    loss = train_step(module, step_fn, inputs)
    _synchronize(device)
    result = {"loss": loss, "compile_s": time.perf_counter() - start}
    for _ in range(max(warmup - 1, 0)):
        train_step(module, step_fn, inputs)
    # Dropping the last step's gradients first, the baseline holds parameters and inputs
    # only and the measured peak includes the gradients this step makes.
    result.update(
        measure_step(
            lambda: train_step(module, step_fn, inputs),
            steps=steps,
            device=device,
            reset=lambda: module.zero_grad(set_to_none=True),
        )
    )
    return result


def measure_step(
    step: Callable[[], object], *, steps: int, device: str = "cpu", reset: Callable[[], object] | None = None
) -> dict[str, Any]:
    """What this process measures of a warmed-up `step` (``measures``): in a memory run
    the peak of one call above the memory before it (``reset`` first, when given), in a
    time run the median, least and most of `steps` timed calls."""
    from graphopt.measure import measure_peak

    result: dict[str, Any] = {}
    if measures("memory"):
        if reset is not None:
            reset()
        # On CPU the allocator's peak (the analogue of CUDA's max_memory_allocated): the
        # resident high-water mark read 20-40% below it on this suite (docs/benchmarks.md).
        _, memory = measure_peak(step, device=device, cpu_method="allocated")
        result.update(peak_bytes=memory.peak_bytes, baseline_bytes=memory.baseline_bytes, peak_method=memory.method)
    if measures("time"):
        step_ms = []
        for _ in range(steps):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            step_ms.append((time.perf_counter() - start) * 1000)
        result.update(
            median_step_ms=statistics.median(step_ms) if step_ms else None,
            min_step_ms=min(step_ms, default=None),
            max_step_ms=max(step_ms, default=None),
        )
    return result


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
