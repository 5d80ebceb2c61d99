"""PNG plots of a suite run: a memory-time Pareto plot per model and a graphopt memory timeline per model.

Needs matplotlib (``pip install -e ".[plot]"``); without it the suite still writes its
tables and says that the plots were skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MEGABYTE = 1_000_000
# Series drawn as lines (a sweep, in order of peak); the others are single points.
SWEEPS = ("torch activation_memory_budget", "graphopt")
STYLE = {
    "eager": ("black", "x"),
    "torch.compile": ("tab:blue", "*"),
    "torch activation_memory_budget": ("tab:blue", "o"),
    "checkpointing": ("tab:orange", "s"),
    "torch offload / fp8": ("tab:purple", "D"),
    "graphopt": ("tab:green", "o"),
}


def plot_all(rows: list[dict[str, Any]], results: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install -e '.[plot]')", file=sys.stderr)
        return
    for model in dict.fromkeys(row["model"] for row in rows):
        model_rows = [row for row in rows if row["model"] == model]
        if any(row["peak_with_static_bytes"] is not None and row["median_step_ms"] for row in model_rows):
            plot_pareto(model, model_rows, out / f"pareto_{model}.png")
        plan = _tightest_plan([r for r in results if r["model"] == model])
        if plan is not None:
            plot_timeline(model, plan, out / f"timeline_{model}.png")


def plot_pareto(model: str, rows: list[dict[str, Any]], path: Path) -> None:
    """Peak memory (x) against median step time (y), one series per method; lower-left is better."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    measured = [row for row in rows if row["peak_with_static_bytes"] is not None and row["median_step_ms"]]
    for method in dict.fromkeys(row["method"] for row in measured):
        points = sorted((row for row in measured if row["method"] == method), key=lambda r: r["peak_with_static_bytes"])
        color, marker = STYLE.get(method, ("gray", "o"))
        line = "-" if method in SWEEPS else ""
        axes.plot(
            [p["peak_with_static_bytes"] / MEGABYTE for p in points], [p["median_step_ms"] for p in points],
            linestyle=line, marker=marker, color=color, label=method, markersize=7,
        )  # fmt: skip
        for point in points:
            axes.annotate(
                point["config"].removeprefix("torch-").removeprefix("checkpoint-"),
                (point["peak_with_static_bytes"] / MEGABYTE, point["median_step_ms"]),
                textcoords="offset points", xytext=(4, 4), fontsize=7, color=color,
            )  # fmt: skip
    for row in rows:  # graphopt budgets, so a point left of its budget line is within it
        if row["method"] == "graphopt" and row["budget_bytes"]:
            axes.axvline(row["budget_bytes"] / MEGABYTE, color="tab:green", alpha=0.15, linewidth=1)
    shape = next((row["shape"] for row in rows if row["shape"]), "")
    axes.set_title(f"{model}: peak memory vs step time\n{shape}", fontsize=8)
    axes.set_xlabel("measured peak of one training step, MB (with parameters)")
    axes.set_ylabel("median step time, ms")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_timeline(model: str, result: dict[str, Any], path: Path) -> None:
    """graphopt's simulated memory over the forward and backward of its tightest plan, with the budget."""
    import matplotlib.pyplot as plt

    values = [v / MEGABYTE for v in result["timeline_bytes"]]
    forward = result["num_forward_steps"]
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.fill_between(range(len(values)), values, step="post", color="tab:green", alpha=0.4)
    axes.plot(range(len(values)), values, drawstyle="steps-post", color="tab:green", label="graphopt plan (simulated)")
    axes.axvline(forward, color="black", linestyle=":", label="forward | backward")
    axes.axhline(result["budget_bytes"] / MEGABYTE, color="tab:red", linestyle="--", label="budget")
    if result.get("peak_bytes") is not None:
        measured = (result["peak_bytes"] + result["static_bytes"]) / MEGABYTE
        axes.axhline(measured, color="tab:blue", linestyle="-.", label="measured peak")
    axes.set_title(f"{model}: memory timeline of {result['config']} (budget {result['budget_bytes'] / MEGABYTE:.0f} MB)")
    axes.set_xlabel("graph step (forward, then backward)")
    axes.set_ylabel("MB")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _tightest_plan(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The successful graphopt result with the smallest budget and a timeline."""
    planned = [r for r in results if r.get("timeline_bytes") and r.get("budget_bytes") and "error" not in r]
    return min(planned, key=lambda r: r["budget_bytes"], default=None)
