"""Peak memory and step time of a small GPT: torch's activation-memory budget vs graphopt.

    cd <repo root> && python -m bench.gpt_budget_frontier [--steps 10] [--warmup 2] [--rounds 1] \\
        [--out bench/results/gpt_budget_frontier.csv] [--configs torch-amb-1.0,graphopt-300000000]

Model: ``examples.gpt.build()`` defaults (4 layers, d_model 256, 4 heads, vocab 2048,
batch 8 x seq 512), fp32, CPU, ``torch.manual_seed(0)``. One training step is
``model.zero_grad(set_to_none=True); loss = compiled(*inputs); loss.backward()``.

Each configuration's peak is measured in its own process, started with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the process and the resident
high-water mark tracks live tensors (see ``graphopt.measure``): the child warms up (the
first step compiles) and measures the peak of one step above the resident size before it
(parameters, inputs and the compiled code are outside it; the step's gradients are inside).

Step times come from other processes, started with glibc's default allocator (the fixed
threshold page-faults every large tensor afresh: torch's amb-1.0 step takes ~1069 ms there
against ~955 ms; ``bench.child``). A torch point and its graphopt counterpart are timed side
by side: one process compiles both, each on its own model, warms both up and runs
``--steps`` rounds of one step of each, reversing the order every other round.
``--rounds R`` runs R such processes, alternating which configuration comes first, and
pools their steps; each median is over the pool. Timed in separate processes, one
configuration's median moved by up to ~7% between processes here, more than the
differences the verdict reads. A configuration given alone (``--configs``) is timed alone.

Configurations:
  torch-amb-<v>     ``torch.compile(model)`` with ``torch._functorch.config.activation_memory_budget = v``
  graphopt-<bytes>  ``graphopt.compile(model, memory_budget=<bytes>)``
  graphopt-int8-<bytes>   the same with ``quantize_bits=8`` (int8 saved activations allowed)
  graphopt-lossy-<bytes>  the same with ``allow_lossy=True`` (int8 / int4 / int2 allowed)

``--lossy F`` adds, after the torch points, graphopt-int8 and graphopt-lossy at a budget of
F x the lowest peak (with parameters) torch measured in the same run, each compared with
that torch point (the three timed together): ok when its measured peak is within the
budget and its median step is no slower than torch's there.

Each configuration compiles cold, in an Inductor cache of its own (``bench.child``), so
``compile_s`` compares across configurations.

The table reads as a user compares: **same memory -> time** first, each torch point
followed by graphopt at that point's peak, torch points by peak (largest first); a torch
point another torch point beats (about the same peak, within ``SAME_PEAK``, and a faster
step) comes after the others, marked ``dominated by``, since no user would pick it and a
ratio against it flatters graphopt. Lossy graphopt rows (``graphopt-int8``,
``graphopt-lossy``: gradients differ from the exact step) come last, marked ``lossy``:
their reference is an exact torch point (torch has no lossy CPU counterpart). Then **same
time -> memory**: per torch point, graphopt's least measured peak among exact points no
slower than it (times from different processes there, so within ~7%).

The whole comparison, on more models and configurations, is ``python -m bench`` (docs/benchmarks.md).
The default run measures torch at 1.0, 0.5, 0.2 and 0.0, then graphopt once per torch
point with budget = parameter bytes + the peak torch measured there. A graphopt point is
ok when its measured peak (with parameters) is within its budget and its median step is no
slower than that torch point's, timed beside it (``torch ms``, ``x torch`` in the table).

Anchors, torch measured on this kind of machine (2-core CPU, peak with parameters / median
step): amb 1.0: 302 MB / 899 ms; 0.5: 206 MB / 996 ms; 0.2: 190 MB / 1656 ms; 0.0: 298 MB / 1246 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench.child import measure_step, measures
from bench.script import child_main, report, run_child_script, script_parser, with_errors

TORCH_AMB_VALUES = (1.0, 0.5, 0.2, 0.0)
GRAPHOPT_KINDS = {"graphopt": {}, "graphopt-int8": {"quantize_bits": 8}, "graphopt-lossy": {"allow_lossy": True}}
LOSSY_KINDS = ("graphopt-int8", "graphopt-lossy")
# Two peaks this close count as the same memory when one torch point dominates another.
SAME_PEAK = 0.01
MEGABYTE = 1_000_000
CSV_FIELDS = (
    "config", "reference", "lossy", "dominated_by", "budget_bytes", "param_bytes", "peak_bytes",
    "peak_with_params_bytes", "median_step_ms", "reference_median_step_ms", "time_ratio_vs_reference", "compile_s",
    "predicted_peak_bytes", "ok", "error",
)  # fmt: skip


# ---------------------------------------------------------------- child: one configuration


def _compile_torch(model: Any, inputs: tuple, amb: float, train_step) -> tuple[Any, float]:
    import torch
    import torch._functorch.config

    # Compilation is lazy: the budget must be set while the first step traces and partitions.
    with torch._functorch.config.patch(activation_memory_budget=amb):
        compiled = torch.compile(model)
        start = time.perf_counter()
        train_step(model, compiled, inputs)
        compile_s = time.perf_counter() - start
    return compiled, compile_s


def _compile_graphopt(model: Any, inputs: tuple, budget_bytes: int, train_step, graphopt_compile, **lossy: Any) -> tuple[Any, float]:
    compiled = graphopt_compile(model, memory_budget=budget_bytes, **lossy)
    start = time.perf_counter()
    train_step(model, compiled, inputs)
    return compiled, time.perf_counter() - start


def _predicted_peaks(compiled: Any) -> list[int] | None:
    import graphopt

    try:
        return [plan.predicted_peak_bytes for plan in graphopt.plans(compiled)]
    except (AttributeError, graphopt.GraphoptError):
        return None


def _train_step(model: Any, compiled: Any, inputs: tuple) -> None:
    model.zero_grad(set_to_none=True)
    loss = compiled(*inputs)
    loss.backward()


def _prepare(config: str) -> tuple[dict[str, Any], Any, Any, tuple]:
    """Build the model, compile it as `config` says and run the first step: the result so
    far (an ``error`` key when it failed), the model, the compiled step and the inputs."""
    import torch

    from examples.gpt import build

    torch.manual_seed(0)
    model, inputs = build()
    model.train()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result: dict[str, Any] = {"config": config, "param_bytes": param_bytes}

    kind, _, value = config.rpartition("-")
    if kind == "torch-amb":
        compiled, compile_s = _compile_torch(model, inputs, float(value), _train_step)
    elif kind in GRAPHOPT_KINDS:
        try:  # graphopt.compile is written alongside this benchmark; report, don't crash
            from graphopt import compile as graphopt_compile
        except ImportError as error:
            return {**result, "error": f"graphopt.compile unavailable: {error}"}, model, None, inputs
        compiled, compile_s = _compile_graphopt(model, inputs, int(value), _train_step, graphopt_compile, **GRAPHOPT_KINDS[kind])
        result["predicted_peak_bytes"] = _predicted_peaks(compiled)
    else:
        return {**result, "error": f"unknown configuration {config!r}"}, model, None, inputs
    result["compile_s"] = compile_s
    return result, model, compiled, inputs


def run_child(config: str, steps: int, warmup: int) -> dict[str, Any]:
    """Compile one configuration in this process and measure its peak; or, in a time run
    (``bench.child.measures``), time ``A+B+...`` side by side (one configuration alone too)."""
    if not measures("memory"):
        return _time_together(config.split("+"), steps, warmup)
    result, model, compiled, inputs = _prepare(config)
    if "error" in result:
        return result
    for _ in range(max(warmup - 1, 0)):
        _train_step(model, compiled, inputs)
    # Dropping the last step's gradients first, the baseline holds parameters and inputs
    # only and the measured peak includes the gradients this step makes.
    measured = measure_step(
        lambda: _train_step(model, compiled, inputs), steps=steps, reset=lambda: model.zero_grad(set_to_none=True)
    )
    return {**result, **measured}


def _time_together(configs: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Compile every configuration in this process (each on its own model), then time
    `steps` rounds of one step of each, the order reversed every other round, so that
    a change in the machine's speed lands on all of them alike."""
    prepared = [_prepare(config) for config in configs]
    for result, *_ in prepared:
        if "error" in result:
            return result
    for _ in range(max(warmup - 1, 0)):
        for _, model, compiled, inputs in prepared:
            _train_step(model, compiled, inputs)
    step_ms: dict[str, list[float]] = {config: [] for config in configs}
    for round_index in range(steps):
        for result, model, compiled, inputs in prepared if round_index % 2 == 0 else prepared[::-1]:
            start = time.perf_counter()
            _train_step(model, compiled, inputs)
            step_ms[result["config"]].append((time.perf_counter() - start) * 1000)
    return {"config": "+".join(configs), "step_ms": step_ms}


# ---------------------------------------------------------------- parent: the sweep


def run_config(config: str, args: argparse.Namespace, runs: tuple[str, ...] = ("memory", "time")) -> dict[str, Any]:
    """Run one configuration in fresh processes (by default one measuring memory, one
    timing steps) and return its merged JSON line."""
    return run_child_script(
        "bench.gpt_budget_frontier", config, args, label={"config": config}, timeout_s=args.child_timeout_s, runs=runs
    )


def time_together(configs: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Median step times of `configs` timed side by side (``_time_together``), pooled over
    `args.rounds` processes that alternate which configuration compiles and runs first."""
    samples: dict[str, list[float]] = {config: [] for config in configs}
    for round_index in range(args.rounds if configs else 0):
        order = configs if round_index % 2 == 0 else configs[::-1]
        result = run_config("+".join(order), args, runs=("time",))
        if "error" in result:
            return {config: {"error": f"timed with {'+'.join(order)}: {result['error']}"} for config in configs}
        for config in configs:
            samples[config] += result["step_ms"][config]
    return {config: {"median_step_ms": statistics.median(samples[config])} for config in configs}


def graphopt_config_for(torch_result: dict[str, Any]) -> str | None:
    """The graphopt configuration whose budget is what torch reached: parameters + its peak."""
    if "error" in torch_result:
        return None
    return f"graphopt-{torch_result['param_bytes'] + torch_result['peak_bytes']}"


def run_sweep(configs: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run `configs`; after each torch point of a default sweep, its graphopt counterpart.

    Each configuration's peak is measured in its own process; a torch point and its
    graphopt counterpart are then timed side by side (``time_together``): on this 2-core
    VM one configuration's median moves by up to ~7% from one process to the next,
    more than the differences the verdict reads.
    """
    results = []
    for config in configs:
        group = {config: run_config(config, args, runs=("memory",))}
        reference = None
        if args.default_sweep and config.startswith("torch-amb-"):
            graphopt_config = graphopt_config_for(group[config])
            if graphopt_config is not None:
                group[graphopt_config] = run_config(graphopt_config, args, runs=("memory",))
                reference = config
        results += _with_times(group, reference, args)
    return results


def run_lossy(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """graphopt with lossy saving allowed, at `args.lossy` x the lowest peak torch reached,
    timed beside that torch point."""
    measured = [r for r in results if r["config"].startswith("torch-amb-") and "error" not in r]
    if not measured:
        return []
    lowest = min(measured, key=lambda r: r["peak_bytes"] + r["param_bytes"])
    budget = int((lowest["peak_bytes"] + lowest["param_bytes"]) * args.lossy)
    group = {lowest["config"]: lowest}
    for kind in ("graphopt-int8", "graphopt-lossy"):
        group[f"{kind}-{budget}"] = run_config(f"{kind}-{budget}", args, runs=("memory",))
    return [row for row in _with_times(group, lowest["config"], args) if row["config"] != lowest["config"]]


def _with_times(group: dict[str, dict[str, Any]], reference: str | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`group`'s results (by configuration) with their step times, timed together; the
    others than `reference` carry it and its median of the same runs."""
    times = time_together([name for name, result in group.items() if "error" not in result], args)
    rows = []
    for name, result in group.items():
        row = {**result, **times.get(name, {})}
        if reference is not None and name != reference:
            row.update(reference=reference, reference_median_step_ms=times.get(reference, {}).get("median_step_ms"))
        rows.append(row)
    return rows


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per result, with peaks including parameters, time ratios and the
    verdict, in the table's order (``table_order``)."""
    rows = []
    for result in results:
        row = {field: result.get(field) for field in CSV_FIELDS}
        row["lossy"] = result["config"].rpartition("-")[0] in LOSSY_KINDS
        if result.get("peak_bytes") is not None:
            row["peak_with_params_bytes"] = result["peak_bytes"] + result["param_bytes"]
        if result.get("reference_median_step_ms") and result.get("median_step_ms") is not None:
            row["time_ratio_vs_reference"] = result["median_step_ms"] / result["reference_median_step_ms"]
        if result["config"].startswith("graphopt-") and result["config"].rpartition("-")[2].isdigit():
            row["budget_bytes"] = int(result["config"].rpartition("-")[2])
            row["ok"] = _verdict(row)
        if isinstance(row["predicted_peak_bytes"], list):
            row["predicted_peak_bytes"] = max(row["predicted_peak_bytes"], default=None)
        rows.append(row)
    _mark_dominated(rows)
    return table_order(rows)


def _mark_dominated(rows: list[dict[str, Any]]) -> None:
    """Set ``dominated_by`` on each torch point another torch point beats: about the same
    peak or less (``SAME_PEAK``) and a faster median step."""
    measured = [r for r in rows if r["config"].startswith("torch-amb-") and r["peak_with_params_bytes"] and r["median_step_ms"]]
    for row in measured:
        for other in measured:
            less_memory = other["peak_with_params_bytes"] <= row["peak_with_params_bytes"] * (1 + SAME_PEAK)
            if other is not row and less_memory and other["median_step_ms"] < row["median_step_ms"]:
                row["dominated_by"] = other["config"]
                break


def table_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same memory -> time: each torch point, then graphopt at its peak; torch points by
    peak, largest first, dominated ones after the rest; lossy rows last."""
    by_config = {row["config"]: row for row in rows}

    def key(row: dict[str, Any]) -> tuple:
        anchor = by_config.get(row["reference"] or row["config"], row)
        peak = anchor["peak_with_params_bytes"] or 0
        return row["lossy"], anchor["dominated_by"] is not None, -peak, anchor["config"], row is not anchor

    return sorted(rows, key=key)


def same_time_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Same time -> memory: per torch point that no other dominates, the exact graphopt
    point of least measured peak whose median step is no slower (None if there is none)."""
    exact = [r for r in rows if r["budget_bytes"] and not r["lossy"] and r["peak_with_params_bytes"] and r["median_step_ms"]]
    found = []
    for torch_row in rows:
        if not torch_row["config"].startswith("torch-amb-") or torch_row["dominated_by"] or not torch_row["median_step_ms"]:
            continue
        as_fast = [r for r in exact if r["median_step_ms"] <= torch_row["median_step_ms"]]
        best = min(as_fast, key=lambda r: r["peak_with_params_bytes"], default=None)
        found.append({"torch": torch_row, "graphopt": best})
    return found


def _verdict(row: dict[str, Any]) -> str:
    if row["error"] or row["peak_with_params_bytes"] is None or row["median_step_ms"] is None:
        return "not-ok"
    within_budget = row["peak_with_params_bytes"] <= row["budget_bytes"]
    as_fast = row["reference"] is None or row["median_step_ms"] <= (row["reference_median_step_ms"] or float("inf"))
    return "ok" if within_budget and as_fast else "not-ok"


def format_table(rows: list[dict[str, Any]]) -> str:
    def megabytes(value: int | None) -> str:
        return "-" if value is None else f"{value / MEGABYTE:.0f}"

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def note(row: dict[str, Any]) -> str:
        if row["lossy"]:
            return "lossy (vs exact torch)"
        return f"dominated by {row['dominated_by']}" if row["dominated_by"] else ""

    lines = [
        "same memory -> time (graphopt at each torch point's peak, timed beside it):",
        f"{'config':<24} {'budget MB':>9} {'peak MB':>8} {'pred MB':>8} {'median ms':>10} {'torch ms':>9} {'x torch':>8}  {'ok':<6}  note",
    ]
    for row in rows:
        lines += with_errors(
            row,
            f"{row['config']:<24} {megabytes(row['budget_bytes']):>9} {megabytes(row['peak_with_params_bytes']):>8} "
            f"{megabytes(row['predicted_peak_bytes']):>8} {number(row['median_step_ms'], '.0f'):>10} "
            f"{number(row['reference_median_step_ms'], '.0f'):>9} {number(row['time_ratio_vs_reference'], '.3f'):>8}  "
            f"{row['ok'] or '':<6}  {note(row)}",
        )
    lines += ["", "same time -> memory (graphopt's least exact peak at no slower a step; times from different processes):"]
    for pair in same_time_rows(rows):
        torch_row, best = pair["torch"], pair["graphopt"]
        found = "none as fast" if best is None else (
            f"{best['config']}: {megabytes(best['peak_with_params_bytes'])} MB, {number(best['median_step_ms'], '.0f')} ms, "
            f"x {best['peak_with_params_bytes'] / torch_row['peak_with_params_bytes']:.2f} memory"
        )
        lines.append(
            f"  {torch_row['config']:<15} {megabytes(torch_row['peak_with_params_bytes'])} MB, "
            f"{number(torch_row['median_step_ms'], '.0f')} ms -> {found}"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0], name="gpt_budget_frontier", steps=10, child_timeout_s=3600.0)
    parser.add_argument("--configs", help="comma-separated configurations (default: the torch sweep + graphopt)")
    parser.add_argument("--rounds", type=int, default=1, help="processes timing each torch/graphopt pair; their steps are pooled")
    parser.add_argument("--lossy", type=float, help="also run int8 / lossy graphopt at this fraction of torch's lowest peak")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        return child_main(lambda: run_child(args.child, args.steps, args.warmup), {"config": args.child})
    args.default_sweep = args.configs is None
    configs = [f"torch-amb-{v}" for v in TORCH_AMB_VALUES] if args.default_sweep else args.configs.split(",")
    results = run_sweep(configs, args)
    if args.lossy:
        results += run_lossy(results, args)
    rows = summarize(results)
    report(rows, args.out, CSV_FIELDS, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
