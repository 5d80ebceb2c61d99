"""Peak memory of a training step with AdamW run inside the backward vs ``opt.step()`` after it.

    cd <repo root> && python -m bench.optimizer_in_backward [--steps 5] [--warmup 2] \\
        [--out bench/results/optimizer_in_backward.csv] [--configs mlp-graphopt-in-backward,...]

Configurations are ``<model>-<how>``:

  models  ``mlp``: 24 x (Linear(1024, 1024) + ReLU), batch 64: gradients (101 MB) dwarf
          the activations (6 MB). ``gpt``: ``examples.gpt.build(batch=1, seq=128)`` (4 layers,
          d_model 256, vocab 2048; 18 MB of gradients). ``gpt8x512``: the bench GPT
          (``build()`` defaults, batch 8 x 512), where activations dominate.
  how     ``torch-step``: ``torch.compile(model)``, then ``opt.step(); opt.zero_grad()``.
          ``graphopt-step``: ``graphopt.compile(model)``, the same loop.
          ``graphopt-in-backward``: ``graphopt.compile(model, optimizer=opt)``, the loop is
          ``loss = cm(x); loss.backward()``.

Every configuration trains ``torch.optim.AdamW(lr=1e-3, weight_decay=0.01)`` from
``torch.manual_seed(0)``, fp32, CPU, Inductor, twice, each time in a fresh process
(``bench.child``): started with ``MALLOC_MMAP_THRESHOLD_=65536`` (see ``graphopt.measure``)
to measure memory, with glibc's default allocator to time steps. A child warms up (the
first step compiles and creates the optimizer state); the memory child measures the peak
of one whole step above the resident size before it (parameters, optimizer state and
inputs are outside; the step's gradients, activations and the optimizer's temporaries are
inside), the time child times ``--steps`` steps (median). Each reports how far its
parameters are from an eager copy trained the same number of steps with
``opt.zero_grad(); loss.backward(); opt.step()`` (the memory child's figure is kept).

The claim checked, per model: the peak with the optimizer in the backward is lower than
with ``graphopt-step`` by at least 90% of the gradient bytes (``drop_share_of_gradients``
>= 0.9), with the same parameters after the same steps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

from bench.child import measure_step
from bench.script import child_main, report, run_child_script, script_parser, with_errors

MODELS = ("mlp", "gpt", "gpt8x512")
HOWS = ("torch-step", "graphopt-step", "graphopt-in-backward")
DEFAULT_CONFIGS = [f"{model}-{how}" for model in ("mlp", "gpt") for how in HOWS]
REFERENCE_HOW = "graphopt-step"
TARGET_SHARE = 0.9
MEGABYTE = 1_000_000
MLP_WIDTH, MLP_DEPTH, MLP_BATCH = 1024, 24, 64
CSV_FIELDS = (
    "config", "gradient_bytes", "optimizer_state_bytes", "peak_bytes", "drop_vs_graphopt_step_bytes",
    "drop_share_of_gradients", "median_step_ms", "time_ratio_vs_graphopt_step", "max_parameter_diff_vs_eager",
    "predicted_peak_bytes", "ok", "error",
)  # fmt: skip


# ---------------------------------------------------------------- child: one configuration


def _build(model_name: str):
    """(model, inputs) with the loss as the model's output."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model_name == "mlp":

        class WideMLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.Sequential(*[m for _ in range(MLP_DEPTH) for m in (nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.ReLU())])

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.layers(x).square().mean()

        return WideMLP(), (torch.randn(MLP_BATCH, MLP_WIDTH, generator=torch.Generator().manual_seed(0)),)
    from examples.gpt import build

    if model_name == "gpt":
        return build(batch=1, seq=128)
    if model_name == "gpt8x512":
        return build()
    raise ValueError(f"unknown model {model_name!r}; choose one of {MODELS}")


def _adamw(model: Any):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def _compile(model: Any, how: str, optimizer: Any):
    """The compiled model and one training step for it."""
    import torch

    import graphopt

    if how == "graphopt-in-backward":
        compiled = graphopt.compile(model, optimizer=optimizer)

        def step(inputs: tuple) -> None:
            compiled(*inputs).backward()

        return compiled, step
    compiled = torch.compile(model) if how == "torch-step" else graphopt.compile(model)

    def step_after_backward(inputs: tuple) -> None:
        compiled(*inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return compiled, step_after_backward


def _eager_reference(initial: Any, inputs: tuple, steps: int) -> Any:
    """The model after `steps` eager AdamW steps from the same start."""
    optimizer = _adamw(initial)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        initial(*inputs).backward()
        optimizer.step()
    return initial


def run_child(config: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    import graphopt

    model_name, _, how = config.partition("-")
    if how not in HOWS:
        return {"config": config, "error": f"unknown configuration; use <model>-<how> with how in {HOWS}"}
    model, inputs = _build(model_name)
    initial = copy.deepcopy(model)
    optimizer = _adamw(model)
    compiled, train = _compile(model, how, optimizer)
    taken = 0  # steps trained, for the eager reference

    def step(inputs: tuple) -> None:
        nonlocal taken
        train(inputs)
        taken += 1

    result: dict[str, Any] = {"config": config, "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    start = time.perf_counter()
    step(inputs)
    result["compile_s"] = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step(inputs)
    result["optimizer_state_bytes"] = sum(
        t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    result.update(measure_step(lambda: step(inputs), steps=steps))
    if how.startswith("graphopt"):
        result["predicted_peak_bytes"] = max(plan.predicted_peak_bytes for plan in graphopt.plans(compiled))

    reference = _eager_reference(initial, inputs, taken)
    result["max_parameter_diff_vs_eager"] = max(
        (a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters())
    )
    return result


# ---------------------------------------------------------------- parent


def run_config(config: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_child_script(
        "bench.optimizer_in_backward", config, args, label={"config": config}, timeout_s=args.child_timeout_s
    )


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration; each against its model's ``graphopt-step``."""
    by_config = {r["config"]: r for r in results}
    rows = []
    for result in results:
        row = {field: result.get(field) for field in CSV_FIELDS}
        model_name, _, how = result["config"].partition("-")
        reference = by_config.get(f"{model_name}-{REFERENCE_HOW}", {})
        if result.get("peak_bytes") is not None and reference.get("peak_bytes") is not None:
            drop = reference["peak_bytes"] - result["peak_bytes"]
            row["drop_vs_graphopt_step_bytes"] = drop
            row["drop_share_of_gradients"] = drop / result["gradient_bytes"]
            row["time_ratio_vs_graphopt_step"] = result["median_step_ms"] / reference["median_step_ms"]
        if how == "graphopt-in-backward" and not row["error"]:
            row["ok"] = "ok" if (row["drop_share_of_gradients"] or 0) >= TARGET_SHARE else "not-ok"
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def megabytes(value: int | None) -> str:
        return "-" if value is None else f"{value / MEGABYTE:.1f}"

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"{'config':<30} {'grads MB':>8} {'peak MB':>8} {'drop MB':>8} {'drop/grads':>10} {'x step ms':>9} {'param diff':>10}  ok"
    ]
    for row in rows:
        lines += with_errors(
            row,
            f"{row['config']:<30} {megabytes(row['gradient_bytes']):>8} {megabytes(row['peak_bytes']):>8} "
            f"{megabytes(row['drop_vs_graphopt_step_bytes']):>8} {number(row['drop_share_of_gradients'], '.2f'):>10} "
            f"{number(row['time_ratio_vs_graphopt_step'], '.2f'):>9} {number(row['max_parameter_diff_vs_eager'], '.1e'):>10}  "
            f"{row['ok'] or ''}"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__.splitlines()[0], name="optimizer_in_backward", steps=5, child_timeout_s=1800.0)
    parser.add_argument("--configs", help=f"comma-separated configurations (default: {','.join(DEFAULT_CONFIGS)})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.child:
        return child_main(lambda: run_child(args.child, args.steps, args.warmup), {"config": args.child})
    configs = args.configs.split(",") if args.configs else DEFAULT_CONFIGS
    rows = summarize([run_config(config, args) for config in configs])
    report(rows, args.out, CSV_FIELDS, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
