"""The benchmark suite: every model x configuration, each in its own process, then tables and plots.

For each model the torch configurations run first; graphopt's budgets are then derived
from what torch measured in the same run (see ``bench.configs``), and every ratio is
against ``torch.compile``'s default measured in the same run. Every configuration
compiles cold, in an Inductor cache of its own (``bench.child.run_measuring``), so the
order does not favour the configurations that run last. Results are written as they
arrive (``results.jsonl``), so an interrupted run keeps what it measured; the CSV, the
summary table and the plots are written at the end.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.child import run_in_child
from bench.configs import CONFIGURATIONS, REFERENCE, is_graphopt

MEGABYTE = 1_000_000
_RAW_LOCK = threading.Lock()  # models measured in parallel append to one results.jsonl
CSV_FIELDS = (
    "suite", "model", "config", "method", "lossy", "budget_fraction", "budget_bytes", "static_bytes", "peak_bytes",
    "peak_with_static_bytes", "predicted_peak_bytes", "within_budget", "median_step_ms", "min_step_ms",
    "max_step_ms", "compile_s", "solve_s", "peak_ratio_vs_compile", "time_ratio_vs_compile", "loss", "error", "shape",
)  # fmt: skip


@dataclass(frozen=True)
class SuiteSettings:
    suite: str  # "cpu" or "gpu"
    size: str  # "quick" or "full"
    models: tuple[str, ...]
    configs: tuple[str, ...]
    steps: int
    warmup: int
    out: Path
    backend: str = "inductor"  # "eager": no code generation (smoke tests)
    child_timeout_s: float = 3600.0
    # Children run at once. More than 1 only where the machine is shared anyway: they
    # then compete for cores, which slows every step time alike.
    jobs: int = 1
    resume: bool = False  # keep the successful results already in results.jsonl; run the rest


def run_suite(settings: SuiteSettings) -> list[dict[str, Any]]:
    """Run every model and configuration; returns the CSV rows (also written under ``settings.out``)."""
    settings.out.mkdir(parents=True, exist_ok=True)
    raw_path = settings.out / "results.jsonl"
    previous = _previous_results(raw_path, settings) if settings.resume else {}
    if not settings.resume:
        raw_path.write_text("")
    started = time.perf_counter()
    slots = threading.Semaphore(settings.jobs)
    run = _Run(settings, raw_path, slots, previous)
    with ThreadPoolExecutor(max_workers=len(settings.models)) as pool:
        results = [result for model_results in pool.map(run.model, settings.models) for result in model_results]
    rows = summarize(results)
    write_csv(rows, settings.out / "results.csv")
    elapsed_s = time.perf_counter() - started
    (settings.out / "summary.md").write_text(format_summary(rows, settings, elapsed_s))
    from bench.plots import plot_all

    plot_all(rows, results, settings.out)
    return rows


def _previous_results(raw_path: Path, settings: SuiteSettings) -> dict[tuple[str, str], dict[str, Any]]:
    """Successful results of an earlier run of the same suite, size and backend, by (model, config)."""
    if not raw_path.exists():
        return {}
    results = [json.loads(line) for line in raw_path.read_text().splitlines() if line.strip()]
    return {
        (r["model"], r["config"]): r
        for r in results
        if "error" not in r and (r.get("suite"), r.get("size"), r.get("backend")) == (settings.suite, settings.size, settings.backend)
    }


@dataclass
class _Run:
    """One suite run: per model, its torch configurations, then graphopt's at budgets derived from them.

    Within a phase the configurations are independent, so up to ``settings.jobs`` children
    run at once (``slots``); with ``resume``, a configuration measured before is not rerun.
    """

    settings: SuiteSettings
    raw_path: Path
    slots: threading.Semaphore
    previous: dict[tuple[str, str], dict[str, Any]]

    def model(self, model: str) -> list[dict[str, Any]]:
        torch_configs = [c for c in self.settings.configs if not is_graphopt(c)]
        graphopt_configs = [c for c in self.settings.configs if is_graphopt(c)]
        results = self._phase([(model, config, {}) for config in torch_configs])
        budgets = graphopt_budgets(results)
        if budgets is None:
            why = "no torch.compile peak to derive a budget from"
            return results + [_skipped(model, config, self.settings, why) for config in graphopt_configs]
        specs, skipped = [], []
        for config in graphopt_configs:
            settings = CONFIGURATIONS[config].settings
            if "at" in settings:
                if settings["at"] not in budgets.peaks:
                    skipped.append(_skipped(model, config, self.settings, f"no {settings['at']} peak in this run"))
                    continue
                specs.append((model, config, {"budget_bytes": budgets.peaks[settings["at"]], "budget_at": settings["at"]}))
                continue
            fraction = settings["fraction"]
            specs.append((model, config, {"budget_bytes": budgets.bytes_at(fraction), "budget_fraction": fraction}))
        return results + skipped + self._phase(specs)

    def _phase(self, specs: list[tuple[str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=max(len(specs), 1)) as pool:
            return list(pool.map(lambda spec: self._one(*spec), specs))

    def _one(self, model: str, config: str, extra: dict[str, Any]) -> dict[str, Any]:
        earlier = self.previous.get((model, config))
        if earlier is not None and all(earlier.get(key) == value for key, value in extra.items()):
            return earlier
        with self.slots:
            return _run_one(model, config, extra, self.settings, self.raw_path)


def _run_one(model: str, config: str, extra: dict[str, Any], settings: SuiteSettings, raw_path: Path) -> dict[str, Any]:
    spec = {
        "model": model, "config": config, "suite": settings.suite, "size": settings.size,
        "steps": settings.steps, "warmup": settings.warmup, "backend": settings.backend, **extra,
    }  # fmt: skip
    print(f"[{time.strftime('%H:%M:%S')}] {model} {config} ...", flush=True)
    started = time.perf_counter()
    result = run_in_child(spec, timeout_s=settings.child_timeout_s)
    result["wall_s"] = time.perf_counter() - started
    with _RAW_LOCK, raw_path.open("a") as raw:
        raw.write(json.dumps(result) + "\n")
    outcome = result.get("error") or (
        f"peak {_megabytes(result.get('peak_bytes'))} MB, median {result.get('median_step_ms', 0):.0f} ms"
    )
    print(f"    {outcome} ({result['wall_s']:.0f} s)", flush=True)
    return result


def _skipped(model: str, config: str, settings: SuiteSettings, why: str) -> dict[str, Any]:
    return {"model": model, "config": config, "suite": settings.suite, "size": settings.size, "error": f"skipped: {why}"}


@dataclass(frozen=True)
class Budgets:
    """graphopt's budget at fraction f: torch's lowest peak + f x (torch.compile's peak - lowest), with static bytes."""

    compile_peak_bytes: int
    lowest_peak_bytes: int
    peaks: dict[str, int]  # every torch configuration's measured peak, with static bytes

    def bytes_at(self, fraction: float) -> int:
        return round(self.lowest_peak_bytes + fraction * (self.compile_peak_bytes - self.lowest_peak_bytes))


def graphopt_budgets(torch_results: list[dict[str, Any]]) -> Budgets | None:
    """Budgets from the peaks (with parameters and buffers) the torch configurations measured.

    The lowest is taken over the memory-saving configurations (activation budget, checkpointing,
    offload), not eager, whose peak is not what a compiled step is compared with.
    """
    measured = {r["config"]: r["peak_bytes"] + r["static_bytes"] for r in torch_results if "peak_bytes" in r}
    if REFERENCE not in measured:
        return None
    savers = [peak for config, peak in measured.items() if config != "eager"]
    return Budgets(compile_peak_bytes=measured[REFERENCE], lowest_peak_bytes=min(savers), peaks=measured)


# ---------------------------------------------------------------- tables


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per result, with peaks including static bytes and ratios against the same model's torch.compile."""
    references = {r["model"]: r for r in results if r["config"] == REFERENCE and "peak_bytes" in r}
    rows = []
    for result in results:
        row = {field: result.get(field) for field in CSV_FIELDS}
        configuration = CONFIGURATIONS.get(result["config"])
        row["method"] = configuration.method if configuration is not None else None
        row["lossy"] = configuration.lossy if configuration is not None else None
        if result.get("peak_bytes") is not None:
            row["peak_with_static_bytes"] = result["peak_bytes"] + result["static_bytes"]
        reference = references.get(result["model"])
        if reference is not None and row["peak_with_static_bytes"] is not None:
            row["peak_ratio_vs_compile"] = row["peak_with_static_bytes"] / (reference["peak_bytes"] + reference["static_bytes"])
            if result.get("median_step_ms") and reference.get("median_step_ms"):
                row["time_ratio_vs_compile"] = result["median_step_ms"] / reference["median_step_ms"]
        if row["budget_bytes"] is not None and row["peak_with_static_bytes"] is not None:
            row["within_budget"] = row["peak_with_static_bytes"] <= row["budget_bytes"]
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / MEGABYTE:.0f}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(rows: list[dict[str, Any]], settings: SuiteSettings, elapsed_s: float) -> str:
    """A markdown table per model (included by docs/benchmarks.md), its rows by measured
    peak, largest first: neighbours hold about the same memory, so their times compare
    (and a faster row below a slower one is less memory for less time). Lossy rows last."""
    lines = [
        f"Suite `{settings.suite}` ({settings.size}, backend {settings.backend}): {settings.steps} timed steps after "
        f"{settings.warmup} warm-up, {elapsed_s / 60:.1f} min wall time. Peaks include parameters and buffers; "
        "ratios are against `torch.compile` default in the same run. Every configuration compiled cold, in an "
        "Inductor cache of its own. Rows by measured peak; lossy rows (gradients differ from the exact step) last.",
        "",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        model_rows = sorted((row for row in rows if row["model"] == model), key=_table_order)
        shape = next((row["shape"] for row in model_rows if row["shape"]), "")
        lines += [f"**{model}** — {shape}", ""]
        lines.append("| config | budget MB | peak MB | x peak | median ms | x time | compile+solve s | solve s | note |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for row in model_rows:
            lines.append(
                f"| {row['config']} | {_megabytes(row['budget_bytes'])} | {_megabytes(row['peak_with_static_bytes'])} "
                f"| {_number(row['peak_ratio_vs_compile'], '.2f')} | {_number(row['median_step_ms'], '.0f')} "
                f"| {_number(row['time_ratio_vs_compile'], '.2f')} | {_number(row['compile_s'], '.0f')} "
                f"| {_number(row['solve_s'], '.1f')} | {_note(row)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _table_order(row: dict[str, Any]) -> tuple[bool, bool, int]:
    """Exact rows before lossy ones, measured before failed, larger peaks first."""
    peak = row["peak_with_static_bytes"]
    return bool(row["lossy"]), peak is None, -(peak or 0)


def _note(row: dict[str, Any]) -> str:
    notes = ["lossy"] if row["lossy"] else []
    if row["error"]:
        notes.append(row["error"].splitlines()[0][:160].replace("|", "/"))
    elif row["within_budget"] is False:
        notes.append("over budget")
    return "; ".join(notes)
