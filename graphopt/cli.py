"""graphopt plan model.py: the memory schedule of a training step, planned on fake tensors.

The command builds the model under torch.device("meta") (no weights, no activations),
traces one training step on fake tensors and prints graphopt's plan for a budget on a
target GPU, or, without a budget, the trade-off between budget and added time.
Exit codes: 0 planned, 1 no plan fits the budget, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import offline
from .blocks import ComposedPlanner
from .budget import format_bytes
from .config import Options, make_options
from .errors import BudgetInfeasibleError, GraphoptError
from .ops.quantize import FP8
from .passes import PASS_NAMES
from .plan import Plan, format_plan

JSON_SCHEMA = "graphopt.plans/1"
PARETO_POINTS = 6
# A budget no step can meet: planning for it reports the least budget that can be met.
IMPOSSIBLE_BUDGET_BYTES = 1

MODEL_FILE_CONVENTION = """\
model.py defines build(**overrides) returning (model, example_inputs) or
(model, example_inputs, loss_fn):
  model           a torch.nn.Module
  example_inputs  a tuple of the model's positional arguments, or a dict of keyword
                  arguments; make tensors by shape (torch.zeros, torch.randint, ...)
  loss_fn         optional: loss_fn(output) -> scalar loss. Without it the output is
                  the loss (a tensor, an object with .loss, or a tuple's first element)
graphopt plan calls build() under torch.device("meta"), so every tensor it makes is a
meta tensor: shapes and dtypes only, no memory. build() must not load data or read
tensor values. --set key=value passes keyword overrides to build() (ints, floats,
true/false and strings)."""

EXAMPLES = """\
examples:
  graphopt plan examples/llama7b.py --budget 60GB --hardware h100
  graphopt plan examples/gpt2_small.py --budget 80% --hardware l4 --json plan.json
  graphopt plan examples/resnet50.py --set batch=64      (no budget: the Pareto table)"""


class UsageError(GraphoptError):
    """Bad input to the command line: reported in one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphopt`` command (and ``python -m graphopt``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        with _quiet_torch(verbose=args.verbose):
            return plan_command(args)
    except BudgetInfeasibleError as error:
        print(f"graphopt: {error}", file=sys.stderr)
        return 1
    except GraphoptError as error:
        print(f"graphopt: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan = commands.add_parser(
        "plan",
        help="plan the memory of one training step of a model, without running it",
        description=__doc__.split("\n\n")[1],
        epilog=MODEL_FILE_CONVENTION + "\n\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("model_file", metavar="model.py", help="a Python file defining build(**overrides)")
    plan.add_argument(
        "--budget",
        help='peak memory of one training step: "6GB", "20 GiB", "1.5e9", or "80%%" of the hardware\'s '
        "memory. Without it: the baseline, the least reachable peak and a budget/time table",
    )
    plan.add_argument(
        "--hardware",
        default="auto",
        help="h100, a100, l4, rtx4090, orin, cpu, a JSON profile, or auto (this machine; default). "
        "Its roofline prices recomputation; its memory is what 80%% means",
    )
    plan.add_argument(
        "--json",
        metavar="PATH",
        help=f"also write the plans as JSON ({JSON_SCHEMA}); graphopt.compile(model, plan=PATH) applies them",
    )
    plan.add_argument("--plot", metavar="PNG", help="also draw the memory timeline (needs matplotlib: graphopt[plot])")
    plan.add_argument(
        "--full-trace",
        action="store_true",
        help="trace every block of a model with repeated blocks (default: trace 3 and compose the plan)",
    )
    plan.add_argument("--verbose", action="store_true", help="every decision, the planner's log and tracebacks")
    plan.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="keyword overrides for build(), e.g. --set batch=8 seq=4096",
    )
    plan.add_argument("--time-limit", type=float, default=30.0, metavar="S", help="planning time per graph, every solve of its repair rounds and sweep together (default 30)")
    plan.add_argument(
        "--trainable",
        metavar="SPEC",
        help='what fine-tuning trains, as graphopt.compile(trainable=): "bias", globs "a.*,b.*", '
        '"last_blocks=2", or "layers.*.mlp.up.weight=0.25" (the first quarter of its output channels)',
    )
    plan.add_argument(
        "--allow-lossy",
        action="store_true",
        help="let the planner save tensors quantized to 8, 4 or 2 bits (and fp8 on hardware with fp8 units)",
    )
    plan.add_argument(
        "--quantize-bits",
        type=quantize_width,
        choices=(8, 4, 2, FP8),
        help="let the planner quantize to this width only (fp8: float8_e4m3fn codes)",
    )
    plan.add_argument(
        "--disable-passes",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        metavar="NAMES",
        help="graph passes to skip, comma-separated, as graphopt.compile(disable_passes=): "
        + ", ".join(PASS_NAMES),
    )
    plan.add_argument(
        "--ddp",
        action="store_true",
        help="plan one DistributedDataParallel rank's step: build()'s batch is the rank's, the budget is per rank, "
        "and DDP's gradient buckets count (docs/distributed.md)",
    )
    plan.add_argument(
        "--fsdp",
        type=int,
        metavar="N",
        help="plan one rank of N under per-block FSDP2 (fully_shard on every block, as torchtitan does): build()'s "
        "batch is the rank's, the budget is per rank, block parameters are shards gathered around their uses "
        "(docs/distributed.md)",
    )
    return parser


def plan_command(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    build = load_build(args.model_file)
    # Checked before the model is built, so a typo in --budget or --hardware fails fast.
    features = {
        "trainable": parse_trainable_spec(args.trainable),
        "allow_lossy": args.allow_lossy,
        "quantize_bits": args.quantize_bits,
        "disable_passes": args.disable_passes,
    }
    options = make_options(
        memory_budget=args.budget, hardware=args.hardware, solver_time_limit_s=args.time_limit, **features
    )
    started = time.perf_counter()
    model, example_inputs, loss_fn = call_build(build, args.model_file, overrides)
    options = offline.options_for(
        model,
        ddp=args.ddp,
        fsdp=args.fsdp,
        memory_budget=options.memory_budget_bytes,
        hardware=options.hardware,
        solver_time_limit_s=options.solver_time_limit_s,
        **features,
    )
    device = offline.planning_device(options.hardware)
    print(describe_setup(args.model_file, overrides, model, example_inputs, options, device))
    if args.ddp:
        buckets = offline.static_memory(model)["gradients"]
        print(f"  ddp       one rank: its batch and DDP's gradient buckets ({format_bytes(buckets)}); the budget is per rank")
    if args.fsdp is not None:
        held = offline.fsdp_rank_memory(model, args.fsdp).by_kind()
        print(f"  fsdp      one rank of {args.fsdp}, per-block FSDP2 ({len(offline.planned_fsdp_units(model))} block units); "
              "the budget is per rank; it holds: " + ", ".join(f"{kind} {format_bytes(size)}" for kind, size in held.items()))

    def use(step: offline.TracedStep) -> dict[str, Any]:
        if options.memory_budget_bytes is not None:
            return {"plans": step.plan(options)}
        return pareto(step, options)

    def trace_and_plan(chunks: int, loss_regions: list) -> Any:
        return offline.with_planner(
            model, example_inputs, use, device=device, loss_fn=loss_fn,
            # A trainable= selection names the whole model's blocks: plan all of them.
            compose=not args.full_trace and args.trainable is None, chunks=chunks, loss_regions=loss_regions,
        )

    try:
        if options.memory_budget_bytes is None:
            result = trace_and_plan(1, [])
        else:  # the head + cross-entropy in chunks when the budget needs it (graphopt/chunking.py)
            result = {"plans": offline.plan_chunked(options, lambda *a: trace_and_plan(*a)["plans"])}
    except GraphoptError:
        raise
    except Exception as error:  # the model could not be traced on fake tensors
        if args.verbose:
            traceback.print_exc()
        raise UsageError(
            f"tracing one training step of {args.model_file} failed: {type(error).__name__}: {_one_line(error)} "
            "(the step is traced on fake tensors: no .item(), no data-dependent shapes; --verbose shows where)"
        ) from error
    elapsed_s = time.perf_counter() - started
    for plan in result["plans"]:
        print()
        print(format_plan(plan, max_rows=len(plan.decisions)) if args.verbose else str(plan))
    print()
    print(summarize(result, options, elapsed_s))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot_timeline(args.plot, result["plans"], options)
    return 0


# ----------------------------------------------------------------------------- input


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["batch=8", "dtype=float32"]`` -> ``{"batch": 8, "dtype": "float32"}``."""
    overrides = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.isidentifier():
            raise UsageError(f"--set takes key=value pairs (put model.py before --set), got {item!r}")
        overrides[key] = _value(text)
    return overrides


def quantize_width(text: str) -> int | str:
    """``--quantize-bits`` as graphopt.compile's ``quantize_bits=``: a bit count, or "fp8"."""
    return text if text == FP8 else int(text)


def parse_trainable_spec(text: str | None) -> Any:
    """``--trainable`` as graphopt.compile's ``trainable=``: ``"bias"`` stays a string,
    ``"a.*,b.*"`` is a list of globs, ``"last_blocks=2"`` and ``"x.weight=0.25"`` a dict."""
    if text is None:
        return "all"
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError("--trainable is empty; give all, bias, globs, last_blocks=K or pattern=fraction")
    if not any("=" in item for item in items):
        return items[0] if len(items) == 1 else items
    spec: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"--trainable mixes globs and key=value items ({item!r}); write {item}=1.0")
        spec[key] = _value(value)
    return spec


def _value(text: str) -> int | float | bool | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def load_build(model_file: str) -> Any:
    """The ``build`` function of a model file, imported with its directory and the current
    directory on ``sys.path`` (so it can import its neighbours and the current project)."""
    if not os.path.isfile(model_file):
        raise UsageError(f"model file {model_file!r} not found")
    directory = os.path.dirname(os.path.abspath(model_file))
    for path in (os.getcwd(), directory):
        if path not in sys.path:
            sys.path.insert(0, path)
    name = "graphopt_model_" + os.path.splitext(os.path.basename(model_file))[0]
    spec = importlib.util.spec_from_file_location(name, model_file)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {model_file!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise UsageError(f"importing {model_file} failed: {type(error).__name__}: {_one_line(error)}") from error
    build = getattr(module, "build", None)
    if not callable(build):
        raise UsageError(
            f"{model_file} defines no build(); define build(**overrides) returning "
            "(model, example_inputs) or (model, example_inputs, loss_fn) (see graphopt plan --help)"
        )
    return build


def call_build(build: Any, model_file: str, overrides: dict[str, Any]) -> tuple[torch.nn.Module, Any, Any]:
    """``build(**overrides)`` under the meta device, checked against the convention."""
    _check_overrides(build, model_file, overrides)
    try:
        with torch.device("meta"):
            built = build(**overrides)
    except Exception as error:
        raise UsageError(
            f"build() in {model_file} failed under torch.device('meta'): {type(error).__name__}: {_one_line(error)} "
            "(graphopt plan builds on the meta device: make tensors by shape, load no data, read no values)"
        ) from error
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise UsageError(
            f"build() in {model_file} returned {type(built).__name__}; return (model, example_inputs) "
            "or (model, example_inputs, loss_fn)"
        )
    model, example_inputs, loss_fn = built if len(built) == 3 else (*built, None)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"build() in {model_file} returned a {type(model).__name__} as the model; return a torch.nn.Module")
    if loss_fn is not None and not callable(loss_fn):
        raise UsageError(f"build() in {model_file} returned a {type(loss_fn).__name__} as loss_fn; return a callable or None")
    return model, example_inputs, loss_fn


def _check_overrides(build: Any, model_file: str, overrides: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(build)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise UsageError(f"build() in {model_file} takes no {', '.join(unknown)}; it accepts: {', '.join(accepted) or 'nothing'}")


# ----------------------------------------------------------------------------- planning


def pareto(step: offline.TracedStep | ComposedPlanner, options: Options) -> dict[str, Any]:
    """Without a budget: the baseline, the least reachable budget, and plans between them."""
    composing = not step.traced_whole
    baseline = step.plan(options)
    if not baseline:
        return {"plans": baseline}
    least_budget = least_budget_bytes(step, options)
    if composing and step.traced_whole:
        # Finding the least budget traced the whole model, and every plan below comes
        # from that trace: the baseline must too, or its line and row disagree.
        baseline = step.plan(options)
    headroom = options.prediction_headroom
    baseline_budget = math.ceil(max(p.predicted_peak_bytes for p in baseline) / (1 - headroom))
    budgets = sorted({_spaced(least_budget, baseline_budget, i) for i in range(PARETO_POINTS)})
    points = []
    for done, budget in enumerate(budgets):
        progress(f"planning {format_bytes(budget)}", done, len(budgets))
        try:
            plans = step.plan(dataclasses.replace(options, memory_budget_bytes=budget))
            points.append({"budget_bytes": budget, "plans": plans})
        except BudgetInfeasibleError as error:
            points.append({"budget_bytes": budget, "plans": None, "least_budget_bytes": error.least_budget_bytes})
    progress("planned", len(budgets), len(budgets))
    return {"plans": baseline, "least_budget_bytes": least_budget, "pareto": points}


def progress(what: str, done: int, total: int, *, width: int = 24) -> None:
    """A progress bar on stderr (one line rewritten in a terminal, a line per step otherwise)."""
    filled = width * done // max(total, 1)
    line = f"graphopt: [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line.ljust(78) + ("\n" if done == total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def least_budget_bytes(step: offline.TracedStep, options: Options) -> int:
    """The least budget graphopt can meet (the least reachable peak plus its headroom)."""
    try:
        step.plan(dataclasses.replace(options, memory_budget_bytes=IMPOSSIBLE_BUDGET_BYTES))
    except BudgetInfeasibleError as error:
        return error.least_budget_bytes
    return IMPOSSIBLE_BUDGET_BYTES


def _spaced(low: int, high: int, index: int) -> int:
    if PARETO_POINTS == 1 or high <= low:
        return high
    return low + (high - low) * index // (PARETO_POINTS - 1)


# ----------------------------------------------------------------------------- output


def describe_setup(
    model_file: str, overrides: dict, model: torch.nn.Module, example_inputs: Any, options: Options, device: torch.device
) -> str:
    static = offline.static_memory(model)
    parameters = list(model.parameters())
    count = sum(p.numel() for p in parameters)
    inputs_bytes = offline.inputs_bytes(example_inputs)
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
    hardware = options.hardware
    traced_as = f"traced as {device.type} tensors"
    if hardware.device_type == "cuda" and device.type != "cuda":
        traced_as += " (no CUDA device here; sizes are the same, attention kernels are CPU's)"
    budget = "none (baseline, least reachable peak, and added time at budgets between)"
    if options.memory_budget_bytes is not None:
        budget = f"{format_bytes(options.memory_budget_bytes)} (plans keep {options.prediction_headroom:.0%} of it free)"
    return "\n".join([
        f"graphopt plan {model_file}: build({settings})",
        f"  model     {type(model).__name__}: {_count(count)} parameters ({_dtypes(parameters)})",
        f"  static    parameters {format_bytes(static['parameters'])}, buffers {format_bytes(static['buffers'])}, "
        f"gradients {format_bytes(static['gradients'])}, inputs {format_bytes(inputs_bytes)}",
        f"  hardware  {hardware.name}: {format_bytes(hardware.memory_bytes)} ({hardware.memory_bytes / 2**30:.0f} GiB); "
        f"{traced_as}",
        f"  budget    {budget}",
    ])


def _count(count: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:.2f} {suffix}"
    return str(count)


def _dtypes(parameters: list[torch.Tensor]) -> str:
    by_dtype = collections.Counter()
    for parameter in parameters:
        by_dtype[str(parameter.dtype).removeprefix("torch.")] += parameter.numel()
    total = sum(by_dtype.values())
    if len(by_dtype) <= 1:
        return next(iter(by_dtype), "no parameters")
    return ", ".join(f"{name} {count / total:.0%}" for name, count in by_dtype.most_common())


def summarize(result: dict[str, Any], options: Options, elapsed_s: float) -> str:
    plans: list[Plan] = result["plans"]
    if not plans:
        return f"nothing to plan: the step has no backward to split (planned in {elapsed_s:.1f} s)"
    peak = max(p.predicted_peak_bytes for p in plans)
    added_ms = sum(p.predicted_added_ms for p in plans)
    if options.memory_budget_bytes is not None:
        budget = options.memory_budget_bytes
        return (
            f"predicted peak {format_bytes(peak)} of the {format_bytes(budget)} budget ({peak / budget:.0%}); "
            f"predicted added time {added_ms:.2f} ms per step; planned in {elapsed_s:.1f} s"
        )
    lines = [
        f"baseline (no budget, torch's min-cut): predicted peak {format_bytes(peak)}, added time {added_ms:.2f} ms",
        f"least reachable: the least budget graphopt can meet is {format_bytes(result['least_budget_bytes'])} "
        f"(a predicted peak of about {format_bytes(result['least_budget_bytes'] * (1 - options.prediction_headroom))} "
        f"plus {options.prediction_headroom:.0%} headroom)",
        "",
        f"  {'budget':>10}  {'predicted peak':>14}  {'added time':>12}  {'recomputed':>10}  method",
    ]
    for point in result["pareto"]:
        budget = format_bytes(point["budget_bytes"])
        if point["plans"] is None:
            lines.append(f"  {budget:>10}  infeasible (least budget {format_bytes(point['least_budget_bytes'])})")
            continue
        point_plans = point["plans"]
        recomputed = sum(d.bytes for p in point_plans for d in p.decisions if d.action == "recompute")
        lines.append(
            f"  {budget:>10}  {format_bytes(max(p.predicted_peak_bytes for p in point_plans)):>14}  "
            f"{sum(p.predicted_added_ms for p in point_plans):>9.2f} ms  {format_bytes(recomputed):>10}  "
            f"{', '.join(sorted({p.method for p in point_plans}))}"
        )
    lines.append(f"planned in {elapsed_s:.1f} s")
    return "\n".join(lines)


def write_json(path: str, result: dict[str, Any]) -> None:
    data: dict[str, Any] = {"schema": JSON_SCHEMA, "plans": [plan.to_json() for plan in result["plans"]]}
    if "pareto" in result:
        data["least_budget_bytes"] = result["least_budget_bytes"]
        data["pareto"] = [_pareto_json(point) for point in result["pareto"]]
    try:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from error


def _pareto_json(point: dict[str, Any]) -> dict[str, Any]:
    if point["plans"] is None:
        return {"budget_bytes": point["budget_bytes"], "feasible": False, "least_budget_bytes": point["least_budget_bytes"]}
    plans = point["plans"]
    return {
        "budget_bytes": point["budget_bytes"],
        "feasible": True,
        "predicted_peak_bytes": max(p.predicted_peak_bytes for p in plans),
        "predicted_added_ms": sum(p.predicted_added_ms for p in plans),
        "plans": [p.to_json() for p in plans],
    }


def plot_timeline(path: str, plans: Sequence[Plan], options: Options) -> None:
    """A PNG of each plan's memory timeline, forward then backward, peak and budget marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError as error:
        raise UsageError("--plot needs matplotlib: pip install 'graphopt[plot]'") from error
    figure, axes = pyplot.subplots(figsize=(10, 4))
    for plan in plans:
        gigabytes = [value / 1e9 for value in plan.timeline_bytes]
        axes.plot(gigabytes, label=f"{plan.graph}: {plan.method}")
        peak = max(range(len(gigabytes)), key=gigabytes.__getitem__)
        axes.annotate(f"peak {format_bytes(plan.timeline_bytes[peak])}", (peak, gigabytes[peak]))
        axes.axvline(plan.num_forward_steps, color="grey", linestyle=":", label=f"{plan.graph}: backward starts")
    if options.memory_budget_bytes is not None:
        axes.axhline(options.memory_budget_bytes / 1e9, color="red", linestyle="--", label="budget")
    axes.set_xlabel("step (forward, then backward)")
    axes.set_ylabel("memory in use (GB)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        pyplot.close(figure)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def _quiet_torch(*, verbose: bool) -> Iterator[None]:
    """Hide torch's warnings about its own kernels while tracing, unless verbose."""
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        yield
