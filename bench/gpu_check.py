"""One prepared GPU check: graphopt on CUDA beside torch's own memory tools, in one CSV.

    make gpu-check                                    # = python -m bench.gpu_check
    python -m bench.gpu_check [--out bench/results/gpu_check.csv] [--deadline-s 360] [--rows a,b] [--steps 5]

Sized for well under 8 minutes on one H100/H200. Without CUDA it says it skipped and
exits 0, writing nothing (``--dry-run-cpu`` runs the same rows on a tiny GPT on the CPU,
with no code generation and no budgets, to check the script itself; its memory figures
mean little).

Model: the bench GPT at its GPU shape (``bench.models``: ``examples/gpt.py``, 4 layers,
d 256, vocab 2048, batch 8 x 512, fp32), the same weights (seed 0) in every row. Rows, in
this order (``ROWS``, most telling first); each is compiled cold (an Inductor cache of its
own) after ``torch._dynamo.reset()``:

| row | what |
|---|---|
| ``eager`` | no compilation: the reference gradients |
| ``compile`` | ``torch.compile`` (min-cut) |
| ``torch-amb-0.5`` | torch's knob, ``activation_memory_budget = 0.5`` |
| ``graphopt-at-torch-amb-0.5`` | ``graphopt.compile`` (Inductor, Triton) with torch-amb-0.5's measured peak as budget |
| ``graphopt-offload`` | every matmul output tagged ``MUST_CPU_OFFLOAD`` (a selective-checkpoint policy), budget as above: the side stream and hoisted prefetches |
| ``graphopt-fp8``, ``graphopt-int8`` | ``quantize_bits="fp8"`` / ``8`` at 0.8 of torch-amb-0.5's peak (lossy) |
| ``torch-offload`` | torch's activation offload (every saved activation tagged), side stream, sunk waits, prefetched reloads |
| ``torch-fp8`` | torch's ``activation_quantization_aten_pass``: saved fp32/bf16 activations of 1 MB or more as scaled float8_e5m2 (lossy) |
| ``graphopt-below-torch-amb-0.5`` | graphopt at 0.9 of torch-amb-0.5's peak: its own plan, offload on the table (an H100/H200 profile offers it) |

Each row: the first step (compilation, timed), one warm-up step, one measured step
(``torch.cuda.reset_peak_memory_stats`` before it, ``max_memory_allocated`` after, less
what earlier rows left allocated, ``earlier_rows_bytes``, which should be 0), then
``--steps`` timed steps (median). ``peak_bytes`` is a whole step's peak with parameters
and inputs, the number a budget bounds; ``within_budget`` compares it with the row's budget. Gradients of the measured step are
compared with eager's: ``grad_error`` is the largest relative L2 error over the
parameters, ``grad_ok`` whether it is within the row's tolerance (1e-3 exact, 0.1 lossy
graphopt, 0.25 torch's e5m2). A row that fails records its error and the next runs;
rows left when ``--deadline-s`` has passed are recorded as skipped. The CSV is rewritten
after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.child import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "gpu_check.csv"
EXACT_TOLERANCE = 1e-3
LOSSY_TOLERANCE = 0.1
TORCH_FP8_TOLERANCE = 0.25  # e5m2 keeps 2 mantissa bits
CSV_FIELDS = (
    "row", "lossy", "device", "budget_bytes", "peak_bytes", "within_budget", "predicted_peak_bytes", "compile_s",
    "median_step_ms", "loss", "grad_error", "grad_tolerance", "grad_ok", "offload_decisions", "quantize_decisions",
    "side_stream", "torch_fp8_passes", "earlier_rows_bytes", "error", "torch_version",
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    name: str
    prepare: Callable[..., Any]  # (model, budget_bytes, stack, backend) -> the step's callable
    budget: tuple[str, float] | None = None  # (row whose measured peak it scales, factor)
    lossy: bool = False
    tolerance: float = EXACT_TOLERANCE


# ---------------------------------------------------------------- how each row prepares the model


def _eager(model, budget_bytes, stack, backend):
    return model


def _torch_compile(model, budget_bytes, stack, backend):
    import torch

    return torch.compile(model, backend="aot_eager" if backend == "eager" else "inductor")


def _torch_amb(model, budget_bytes, stack, backend):
    import torch._functorch.config

    # Compilation is lazy: the setting must hold through the first step, so the stack keeps it.
    stack.enter_context(torch._functorch.config.patch(activation_memory_budget=0.5))
    return _torch_compile(model, budget_bytes, stack, backend)


def _torch_offload(model, budget_bytes, stack, backend):
    import torch._functorch.config
    import torch._inductor.config

    from bench.configs import TagAllForOffload

    offload = {
        "enable_activation_offloading": True,
        "activation_offload_separate_stream": True,
        "activation_offload_sink_wait": True,
        "activation_reload_prefetch": True,
    }
    stack.enter_context(torch._functorch.config.patch(**offload))
    stack.enter_context(torch._inductor.config.patch(joint_custom_post_pass=TagAllForOffload()))
    return _torch_compile(model, budget_bytes, stack, backend)


def _torch_fp8(model, budget_bytes, stack, backend):
    import torch._inductor.config

    fp8 = {
        "allowed_dtypes": "torch.bfloat16;torch.float32", "size_in_mb": 1, "quant_type": "torch.float8_e5m2",
        "use_scaling": True,
    }  # fmt: skip
    options = {**torch._inductor.config.post_grad_fusion_options, "activation_quantization_aten_pass": fp8}
    stack.enter_context(torch._inductor.config.patch(post_grad_fusion_options=options))
    return _torch_compile(model, budget_bytes, stack, backend)


def _graphopt(model, budget_bytes, stack, backend, **options):
    import graphopt

    compiler = "eager" if backend == "eager" else "inductor"
    return graphopt.compile(model, memory_budget=budget_bytes, compiler=compiler, **options)


def _offload_matmuls(ctx, op, *args, **kwargs):
    import torch
    from torch.utils.checkpoint import CheckpointPolicy

    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
        return CheckpointPolicy.MUST_CPU_OFFLOAD
    return CheckpointPolicy.PREFER_SAVE


def _graphopt_offload(model, budget_bytes, stack, backend):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from bench.configs import CheckpointedBlock

    context = functools.partial(create_selective_checkpoint_contexts, _offload_matmuls)
    for index, block in enumerate(model.blocks):
        model.blocks[index] = CheckpointedBlock(block, context)
    return _graphopt(model, budget_bytes, stack, backend)


AMB = "torch-amb-0.5"
# Most telling first: a run cut short by its deadline loses the last rows.
ROWS = (
    Row("eager", _eager),
    Row("compile", _torch_compile),
    Row(AMB, _torch_amb),
    Row(f"graphopt-at-{AMB}", _graphopt, budget=(AMB, 1.0)),
    Row("graphopt-offload", _graphopt_offload, budget=(AMB, 1.0)),
    Row("graphopt-fp8", functools.partial(_graphopt, quantize_bits="fp8"), budget=(AMB, 0.8), lossy=True, tolerance=LOSSY_TOLERANCE),
    Row("graphopt-int8", functools.partial(_graphopt, quantize_bits=8), budget=(AMB, 0.8), lossy=True, tolerance=LOSSY_TOLERANCE),
    Row("torch-offload", _torch_offload),
    Row("torch-fp8", _torch_fp8, lossy=True, tolerance=TORCH_FP8_TOLERANCE),
    Row(f"graphopt-below-{AMB}", _graphopt, budget=(AMB, 0.9)),
)  # fmt: skip


# ---------------------------------------------------------------- one row


@dataclass(frozen=True)
class Setting:
    device: str
    backend: str  # "inductor", or "eager" for --dry-run-cpu
    steps: int


def build(device: str):
    """The bench GPT (seed 0) and its inputs, on `device`; tiny for a CPU dry run."""
    import torch

    torch.manual_seed(0)
    if device == "cuda":
        from bench.models import build_model

        bench_model = build_model("gpt", suite="gpu", size="full")
        return bench_model.module, bench_model.inputs
    from examples.gpt import build as build_gpt

    return build_gpt(batch=2, seq=64, n_layers=2, d_model=64, n_heads=2, vocab=256)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _allocated_bytes(device: str) -> int:
    import torch

    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _peak_bytes(step: Callable[[], Any], device: str, static_bytes: int, earlier_bytes: int) -> tuple[Any, int]:
    """A step's peak as ``torch.cuda.max_memory_allocated`` reads it, less what earlier
    rows left allocated (`earlier_bytes`, 0 when they left nothing). On the CPU (dry
    run) the allocator's peak during the step plus parameters and inputs (`static_bytes`)."""
    import torch

    if device != "cuda":
        from graphopt.measure import measure_peak

        result, memory = measure_peak(step, device="cpu", cpu_method="allocated")
        return result, memory.peak_bytes + static_bytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = step()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - earlier_bytes


def _gradients(model) -> list[Any]:
    """Each parameter's gradient (on the CPU) or None, in ``model.parameters()`` order,
    which wrapping blocks for checkpointing keeps (their names change)."""
    return [None if p.grad is None else p.grad.detach().float().cpu() for p in model.parameters()]


def _grad_error(model, reference: list[Any]) -> float:
    """The largest relative L2 error of a parameter's gradient against `reference`."""
    parameters = list(model.parameters())
    if len(parameters) != len(reference):
        return float("inf")
    worst = 0.0
    for parameter, expected in zip(parameters, reference):
        if expected is None and parameter.grad is None:
            continue
        if expected is None or parameter.grad is None or expected.shape != parameter.grad.shape:
            return float("inf")
        difference = (parameter.grad.detach().float().cpu() - expected).norm().item()
        worst = max(worst, difference / max(expected.norm().item(), 1e-30))
    return worst


def _plans(step_fn) -> list:
    import graphopt

    try:
        return graphopt.plans(step_fn)
    except graphopt.GraphoptError:
        return []  # not a graphopt row


def _side_stream_used(device: str) -> bool | None:
    try:
        from graphopt.ops import offload as offload_ops
    except ImportError:
        return None
    return any(getattr(key, "type", None) == device for key in getattr(offload_ops, "_side_streams", {}))


def run_row(row: Row, budget_bytes: int | None, setting: Setting, reference: list[Any] | None) -> tuple[dict[str, Any], list]:
    """Compile and measure one row; its CSV fields, and its gradients (for ``eager``)."""
    from torch._dynamo.utils import counters

    earlier_bytes = _allocated_bytes(setting.device)
    model, inputs = build(setting.device)
    model.train()
    static_bytes = _nbytes(list(model.parameters()) + list(model.buffers()) + list(inputs))
    result: dict[str, Any] = {"budget_bytes": budget_bytes, "earlier_rows_bytes": earlier_bytes}
    fp8_passes_before = counters["inductor"]["activation_quantization_fwd_aten_pass"]
    with contextlib.ExitStack() as stack:
        step_fn = row.prepare(model, budget_bytes, stack, setting.backend)

        def step():
            model.zero_grad(set_to_none=True)
            loss = step_fn(*inputs)
            loss.backward()
            return loss

        started = time.perf_counter()
        step()
        _synchronize(setting.device)
        result["compile_s"] = time.perf_counter() - started
        step()  # warm-up
        model.zero_grad(set_to_none=True)
        gc.collect()
        loss, result["peak_bytes"] = _peak_bytes(step, setting.device, static_bytes, earlier_bytes)
        result["loss"] = loss.item()
        gradients = _gradients(model)
        if reference is not None:
            result["grad_error"] = _grad_error(model, reference)
            result["grad_ok"] = result["grad_error"] <= row.tolerance
        result["median_step_ms"] = _median_step_ms(step, setting)
        plans = _plans(step_fn)
    if plans:
        actions = [d.action for plan in plans for d in plan.decisions]
        result["predicted_peak_bytes"] = max(plan.predicted_peak_bytes for plan in plans)
        result["offload_decisions"] = sum(a.startswith("offload") for a in actions)
        result["quantize_decisions"] = sum(a == "quantize" or a == "offload-quantized" for a in actions)
        result["side_stream"] = _side_stream_used(setting.device)
    result["torch_fp8_passes"] = counters["inductor"]["activation_quantization_fwd_aten_pass"] - fp8_passes_before
    if budget_bytes is not None:
        result["within_budget"] = result["peak_bytes"] <= budget_bytes
    return result, gradients


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_step_ms(step: Callable[[], Any], setting: Setting) -> float | None:
    times = []
    for _ in range(setting.steps):
        _synchronize(setting.device)
        started = time.perf_counter()
        step()
        _synchronize(setting.device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times) if times else None


@contextlib.contextmanager
def _fresh_process_state(device: str):
    """Around a row: Dynamo's caches dropped, a cold Inductor cache of its own, memory freed."""
    import torch

    torch._dynamo.reset()
    with tempfile.TemporaryDirectory(prefix="gpu-check-inductor-") as directory:
        try:
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

            cold = temporary_cache_dir(directory)
        except ImportError:  # another torch: compile times may read a warm cache
            cold = contextlib.nullcontext()
        with cold:
            try:
                yield
            finally:
                torch._dynamo.reset()
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()


# ---------------------------------------------------------------- the run


def budget_for(row: Row, results: dict[str, dict[str, Any]], setting: Setting) -> tuple[int | None, str | None]:
    """The row's budget from the peak its reference row measured, or why there is none.

    A dry run has none: without code generation nothing is freed early, so budgets from
    its peaks would mean nothing; its graphopt rows plan without one."""
    if row.budget is None or setting.backend == "eager":
        return None, None
    reference, factor = row.budget
    peak = results.get(reference, {}).get("peak_bytes")
    if peak is None:
        return None, f"skipped: no {reference} peak to set the budget from"
    return int(peak * factor), None


def run_check(setting: Setting, rows: tuple[Row, ...], out: Path, deadline_s: float) -> list[dict[str, Any]]:
    """Every row in order, each recorded (or its failure) as it finishes."""
    import torch

    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    reference = None
    for row in rows:
        record = {"row": row.name, "lossy": row.lossy, "device": _device_name(setting.device), "torch_version": torch.__version__}
        budget_bytes, why_not = budget_for(row, results, setting)
        if time.perf_counter() - started > deadline_s:
            why_not = f"skipped: past the {deadline_s:.0f} s deadline"
        if why_not is not None:
            results[row.name] = {**record, "error": why_not}
        else:
            print(f"[{time.perf_counter() - started:6.0f} s] {row.name} ...", flush=True)
            try:
                with _fresh_process_state(setting.device):
                    measured, gradients = run_row(row, budget_bytes, setting, reference)
                results[row.name] = {**record, **measured, "grad_tolerance": row.tolerance}
                if row.name == "eager":
                    reference = gradients
            except Exception as error:  # recorded per row; the next row still runs
                results[row.name] = {**record, "budget_bytes": budget_bytes, "error": f"{type(error).__name__}: {error}"[:500]}
        print(f"    {_outcome(results[row.name])}", flush=True)
        write_csv(list(results.values()), out)
    return list(results.values())


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _outcome(result: dict[str, Any]) -> str:
    if result.get("error"):
        return result["error"]
    budget = result.get("budget_bytes")
    return (
        f"peak {result['peak_bytes'] / 1e6:.1f} MB"
        + (f" (budget {budget / 1e6:.1f} MB, {'within' if result.get('within_budget') else 'OVER'})" if budget else "")
        + f", compile {result['compile_s']:.1f} s, median {result.get('median_step_ms') or 0:.1f} ms"
        + (f", grad error {result['grad_error']:.2e} ({'ok' if result['grad_ok'] else 'NOT ok'})" if "grad_error" in result else "")
    )


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the CSV (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--rows", help=f"comma-separated, from {[row.name for row in ROWS]} (default: all, in order)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row after the measured one (median)")
    parser.add_argument("--deadline-s", type=float, default=360.0,
                        help="rows not started this many seconds in are recorded as skipped (default 360: the run stays under 8 min)")  # fmt: skip
    parser.add_argument("--dry-run-cpu", action="store_true", help="the rows on a tiny CPU GPT without code generation (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    import torch

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}): the GPU check is skipped (nothing written)")
        return 0
    names = args.rows.split(",") if args.rows else [row.name for row in ROWS]
    unknown = sorted(set(names) - {row.name for row in ROWS})
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {[row.name for row in ROWS]}")
    rows = tuple(row for row in ROWS if row.name in names)
    setting = Setting("cpu", "eager", args.steps) if args.dry_run_cpu else Setting("cuda", "inductor", args.steps)
    results = run_check(setting, rows, args.out, args.deadline_s)
    failed = [r["row"] for r in results if r.get("error") or r.get("grad_ok") is False or r.get("within_budget") is False]
    print(f"wrote {args.out}; {len(results) - len(failed)} of {len(results)} rows clean" + (f", not: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
