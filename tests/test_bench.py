"""The benchmark suite's plumbing: one tiny configuration end-to-end, budgets and ratios on synthetic results.

No timing is asserted (timed claims live in bench/ results, not in tests). The end-to-end
run uses ``--backend eager`` (aot_eager, no code generation) so it takes seconds.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from bench import __main__ as bench_main
from bench.child import run_measuring
from bench.configs import CONFIGURATIONS, CPU_DEFAULT, QUICK_DEFAULT, supported_variants
from bench.models import MODELS, build_model
from bench.suite import CSV_FIELDS, Budgets, graphopt_budgets, summarize


def test_one_configuration_end_to_end_writes_the_csv(tmp_path):
    command = [
        sys.executable, "-m", "bench", "--quick", "--backend", "eager", "--models", "vit", "--configs", "compile",
        "--steps", "1", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    with (tmp_path / "results.csv").open() as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_FIELDS
    assert [(row["model"], row["config"], row["error"]) for row in rows] == [("vit", "compile", "")]
    (row,) = rows
    assert int(row["peak_with_static_bytes"]) == int(row["peak_bytes"]) + int(row["static_bytes"]) > 0
    assert float(row["peak_ratio_vs_compile"]) == 1.0 and float(row["time_ratio_vs_compile"]) == 1.0
    assert float(row["median_step_ms"]) > 0 and float(row["compile_s"]) > 0
    assert "| compile |" in (tmp_path / "summary.md").read_text()
    plots_expected = importlib.util.find_spec("matplotlib") is not None  # the optional "plot" extra
    assert (tmp_path / "pareto_vit.png").exists() == plots_expected


_CHILD = """
import json, os
from bench.child import measures
result = {"threshold_" + which: os.environ.get("MALLOC_MMAP_THRESHOLD_") for which in ("memory", "time") if measures(which)}
if measures("memory"):
    result.update(peak_bytes=1, compile_s=30.0)
if measures("time"):
    result.update(median_step_ms=2.0, compile_s=3.0)
print(json.dumps(result))
"""


def test_memory_is_measured_with_the_fixed_mmap_threshold_and_steps_are_timed_without_it(monkeypatch):
    """The threshold page-faults every large tensor afresh; a parent started with it (as
    `make test` is) must still time its children under glibc's default allocator."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    command = [sys.executable, "-c", _CHILD]
    result = run_measuring(command, label={"config": "c"}, timeout_s=60)
    # Where both report a value (compile time), the memory run's, which compiled cold, is kept.
    assert result == {
        "threshold_memory": "65536", "threshold_time": None, "peak_bytes": 1, "median_step_ms": 2.0, "compile_s": 30.0,
    }  # fmt: skip
    both = run_measuring(command, label={"config": "c"}, timeout_s=60, runs=("both",))  # CUDA: one process does both
    assert both["threshold_memory"] == both["threshold_time"] == "65536" and both["median_step_ms"] == 2.0
    failing = run_measuring([sys.executable, "-c", "raise SystemExit(3)"], label={"config": "c"}, timeout_s=60)
    assert failing["config"] == "c" and failing["error"].startswith("exit 3")


def _result(config: str, peak_bytes: int, median_step_ms: float, **extra) -> dict:
    return {"model": "m", "config": config, "peak_bytes": peak_bytes, "static_bytes": 100,
            "median_step_ms": median_step_ms, **extra}  # fmt: skip


def test_graphopt_budgets_span_torch_lowest_to_torch_compile():
    results = [
        _result("eager", 50, 1.0),  # eager's peak is not a memory-saving configuration: ignored
        _result("compile", 900, 1.0),
        _result("torch-amb-0.5", 500, 1.0),
        _result("checkpoint-full", 300, 1.0),
        {"model": "m", "config": "checkpoint-selective", "error": "failed"},
    ]
    budgets = graphopt_budgets(results)
    peaks = {"eager": 150, "compile": 1000, "torch-amb-0.5": 600, "checkpoint-full": 400}
    assert budgets == Budgets(compile_peak_bytes=1000, lowest_peak_bytes=400, peaks=peaks)
    assert [budgets.bytes_at(f) for f in (1.0, 0.5, 0.0, -0.2)] == [1000, 700, 400, 280]
    assert graphopt_budgets([_result("eager", 50, 1.0)]) is None


def test_summary_ratios_are_against_the_same_models_torch_compile():
    results = [
        _result("compile", 900, 200.0),
        _result("graphopt-0.5", 400, 300.0, budget_bytes=450, budget_fraction=0.5),
        {**_result("compile", 100, 10.0), "model": "other"},
    ]
    rows = summarize(results)
    graphopt_row = rows[1]
    assert graphopt_row["peak_with_static_bytes"] == 500
    assert graphopt_row["peak_ratio_vs_compile"] == pytest.approx(0.5)
    assert graphopt_row["time_ratio_vs_compile"] == pytest.approx(1.5)
    assert graphopt_row["within_budget"] is False
    assert rows[2]["peak_ratio_vs_compile"] == 1.0


def test_configuration_table_defaults_name_real_configurations():
    assert set(CPU_DEFAULT) <= set(CONFIGURATIONS) and set(QUICK_DEFAULT) <= set(CONFIGURATIONS)
    assert not any(CONFIGURATIONS[name].gpu_only for name in CPU_DEFAULT)
    assert {"eager", "compile", "graphopt-1.0"} <= supported_variants()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_build_with_blocks_and_a_scalar_loss(name):
    bench_model = build_model(name, suite="cpu", size="quick")
    assert len(bench_model.blocks) >= 1 and bench_model.shape
    loss = bench_model.module(*bench_model.inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_gpu_suite_skips_cleanly_without_cuda(capsys):
    assert bench_main.main(["--suite", "gpu"]) == 0
    assert "GPU suite is skipped" in capsys.readouterr().out


def test_suite_derives_budgets_then_resumes_without_rerunning(tmp_path, monkeypatch):
    """The parent's flow with children faked: torch first, graphopt at derived budgets, resume skips done work."""
    from bench import suite

    peaks = {"compile": 900, "checkpoint-full": 300}
    calls = []

    def fake_child(spec, *, timeout_s, environment=None):
        calls.append(spec["config"])
        peak = peaks.get(spec["config"], spec.get("budget_bytes", 0) - 200)
        return {**spec, "peak_bytes": peak, "static_bytes": 100, "median_step_ms": 10.0}

    monkeypatch.setattr(suite, "run_in_child", fake_child)
    monkeypatch.setattr("bench.plots.plot_all", lambda rows, results, out: None)
    settings = suite.SuiteSettings(
        suite="cpu", size="quick", models=("gpt",), configs=("compile", "checkpoint-full", "graphopt-0.5"),
        steps=1, warmup=1, out=tmp_path, backend="eager", jobs=2,
    )  # fmt: skip
    rows = suite.run_suite(settings)
    assert sorted(calls) == ["checkpoint-full", "compile", "graphopt-0.5"]
    graphopt_row = next(row for row in rows if row["config"] == "graphopt-0.5")
    assert graphopt_row["budget_bytes"] == 700 and graphopt_row["within_budget"] is True

    calls.clear()
    resumed = suite.run_suite(dataclasses.replace(settings, resume=True))
    assert calls == [] and [row["config"] for row in resumed] == [row["config"] for row in rows]


def test_the_frontier_times_each_torch_point_beside_its_graphopt_counterpart(monkeypatch):
    """Peaks come from one process per configuration; times from processes that run the
    pair side by side, alternating which goes first, and the verdict reads those times."""
    from bench import gpt_budget_frontier as frontier

    calls = []
    step_ms = {"torch-amb-1.0": [10.0, 12.0], "graphopt-400": [11.0, 11.0]}

    def fake_run_config(config, args, runs=("memory", "time")):
        calls.append((config, runs))
        if runs == ("memory",):
            peak = 300 if config.startswith("torch") else 250
            return {"config": config, "param_bytes": 100, "peak_bytes": peak}
        return {"config": config, "step_ms": {name: step_ms[name] for name in config.split("+")}}

    monkeypatch.setattr(frontier, "run_config", fake_run_config)
    args = frontier.parse_arguments(["--rounds", "2"])
    args.default_sweep = True
    rows = frontier.summarize(frontier.run_sweep(["torch-amb-1.0"], args))
    assert calls == [
        ("torch-amb-1.0", ("memory",)), ("graphopt-400", ("memory",)),
        ("torch-amb-1.0+graphopt-400", ("time",)), ("graphopt-400+torch-amb-1.0", ("time",)),
    ]  # fmt: skip
    torch_row, graphopt_row = rows
    assert torch_row["median_step_ms"] == 11.0 and torch_row["ok"] is None  # median of 10, 12, 10, 12
    assert graphopt_row["reference_median_step_ms"] == 11.0 and graphopt_row["time_ratio_vs_reference"] == 1.0
    assert graphopt_row["peak_with_params_bytes"] == 350 <= graphopt_row["budget_bytes"] == 400
    assert graphopt_row["ok"] == "ok"  # within budget and as fast
    step_ms["graphopt-400"] = [11.5, 11.5]
    slower = frontier.summarize(frontier.run_sweep(["torch-amb-1.0"], args))[1]
    assert slower["time_ratio_vs_reference"] > 1 and slower["ok"] == "not-ok"


_CACHE_CHILD = """
import json, os
print(json.dumps({"cache_" + os.environ["GRAPHOPT_BENCH_MEASURES"]: os.environ.get("TORCHINDUCTOR_CACHE_DIR")}))
"""


def test_every_configuration_compiles_in_a_fresh_inductor_cache(monkeypatch):
    """Compile times are cold whatever ran before: each call its own cache, shared by its
    memory and time runs, never the parent's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/a-warm-cache")
    command = [sys.executable, "-c", _CACHE_CHILD]
    first = run_measuring(command, label={"config": "a"}, timeout_s=60)
    second = run_measuring(command, label={"config": "b"}, timeout_s=60)
    assert first["cache_memory"] == first["cache_time"] != second["cache_memory"]
    assert "/tmp/a-warm-cache" not in (first["cache_memory"], second["cache_memory"])


def test_the_frontier_table_puts_dominated_torch_points_and_lossy_rows_last():
    from bench import gpt_budget_frontier as frontier

    def result(config, peak, ms, reference=None):
        row = {"config": config, "param_bytes": 0, "peak_bytes": peak, "median_step_ms": ms}
        return row if reference is None else {**row, "reference": reference, "reference_median_step_ms": 1.0}

    rows = frontier.summarize([
        result("torch-amb-1.0", 300, 10.0), result("graphopt-300", 250, 10.0, "torch-amb-1.0"),
        result("torch-amb-0.0", 299, 14.0), result("graphopt-299", 250, 11.0, "torch-amb-0.0"),
        result("torch-amb-0.5", 200, 12.0), result("graphopt-200", 180, 11.0, "torch-amb-0.5"),
        result("graphopt-int8-150", 140, 11.0, "torch-amb-0.5"),
    ])  # fmt: skip
    assert [row["config"] for row in rows] == [
        "torch-amb-1.0", "graphopt-300", "torch-amb-0.5", "graphopt-200", "torch-amb-0.0", "graphopt-299",
        "graphopt-int8-150",
    ]  # fmt: skip
    by_config = {row["config"]: row for row in rows}
    assert by_config["torch-amb-0.0"]["dominated_by"] == "torch-amb-1.0" and by_config["torch-amb-0.5"]["dominated_by"] is None
    assert by_config["graphopt-int8-150"]["lossy"] and not by_config["graphopt-200"]["lossy"]
    same_time = {pair["torch"]["config"]: pair["graphopt"] for pair in frontier.same_time_rows(rows)}
    assert same_time["torch-amb-0.5"]["config"] == "graphopt-200"  # the lossy point is not counted
    assert same_time["torch-amb-1.0"]["config"] == "graphopt-300"
    assert "lossy (vs exact torch)" in frontier.format_table(rows)


def test_graph_breaks_bench_runs_each_configuration_step_by_step(tmp_path):
    """bench/graph_breaks.py on a small batch without code generation: every step of both
    graphopt configurations is a row, and the first-step configuration plans again only
    after its first step. (Measured peaks are not checked: without Inductor's fusion
    the graphs run op by op and may exceed the plan, which EAGER_MEMORY says.)"""
    from bench import graph_breaks

    out = tmp_path / "graph_breaks.csv"
    graph_breaks.main(
        ["--compiler", "eager", "--steps", "2", "--batch", "4", "--seq", "128", "--fraction", "0.7", "--out", str(out)]
    )
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["config"], row["step"]) for row in rows] == [
        ("eager", "1"), ("first-step", "1"), ("first-step", "2"), ("rerun", "1"), ("rerun", "2"),
    ]
    replans = {(row["config"], row["step"]): int(row["replans_so_far"]) for row in rows[1:]}
    assert replans[("first-step", "1")] == 0
    for row in rows[1:]:
        assert float(row["predicted_mb"]) <= float(row["budget_mb"])


def test_distributed_bench_runs_every_configuration_on_two_ranks(tmp_path):
    """bench/distributed.py on a small batch without code generation: every wrap x
    configuration is a row, graphopt runs at the larger of the two ranks' peaks of the
    torch configuration it is timed against, and every configuration's step equals
    torch.compile's. (Measured peaks are not checked against the budget: without
    Inductor's fusion the graphs run op by op, which EAGER_MEMORY says.)"""
    from bench import distributed

    out = tmp_path / "distributed.csv"
    distributed.main(["--compiler", "eager", "--steps", "1", "--warmup", "1", "--batch", "1", "--seq", "64", "--out", str(out)])
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    configs = [*distributed.TORCH_CONFIGS, *(f"graphopt-at-{at}" for at in distributed.AT_CONFIGS)]
    assert [(row["wrap"], row["config"]) for row in rows] == [(wrap, config) for wrap in distributed.WRAPS for config in configs]
    for row in rows:
        if row["config"].startswith("graphopt"):
            (at,) = [r for r in rows if r["wrap"] == row["wrap"] and r["config"] == row["vs"]]
            assert float(row["budget_mb"]) == pytest.approx(max(float(at["rank0_mb"]), float(at["rank1_mb"])))
            if row["error"]:  # a peak graphopt cannot reach is a row saying so
                assert row["error"].startswith("BudgetInfeasibleError: "), row
                continue
            assert float(row["predicted_mb"]) <= float(row["budget_mb"])
        assert not row["error"], row
        assert float(row["loss_vs_compile"]) <= 1e-5, row
        assert float(row["gradient_vs_compile"]) <= 1e-4, row
    # At this size a rank's fixed memory outweighs the activations, and under FSDP2 the
    # reserves graphopt counts for the whole step may put torch's peaks out of its reach.
    assert any(row["config"].startswith("graphopt") and not row["error"] for row in rows)
