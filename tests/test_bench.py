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
    assert budgets == Budgets(compile_peak_bytes=1000, lowest_peak_bytes=400)
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

    def fake_child(spec, *, timeout_s, environment):
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
