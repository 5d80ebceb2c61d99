"""measure_peak sees real allocations and only those made during the call."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from graphopt.measure import PeakMemory, measure_peak

MB = 1_000_000
REPO_ROOT = Path(__file__).resolve().parent.parent

linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peaks need /proc (Linux)")

# glibc reads MALLOC_MMAP_THRESHOLD_ only at process start, so real CPU measurements run
# in a child process started with it set.
_MEASURE_200_MB = """
import json, torch
from graphopt.measure import measure_peak

stale = torch.empty(50_000_000).fill_(1)  # 200 MB allocated and freed before the call
del stale
result, memory = measure_peak(lambda: float(torch.empty(50_000_000).fill_(1).sum()), device="cpu")
print(json.dumps({"result": result, "peak_bytes": memory.peak_bytes, "baseline_bytes": memory.baseline_bytes,
                  "device": memory.device, "method": memory.method}))
"""


def _run_with_mmap_threshold(code: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@linux_only
def test_cpu_peak_sees_a_200_mb_allocation_and_not_one_freed_before():
    measured = _run_with_mmap_threshold(_MEASURE_200_MB)
    assert measured["result"] == 50_000_000.0
    assert 190 * MB <= measured["peak_bytes"] < 260 * MB
    assert measured["baseline_bytes"] > 0
    assert (measured["device"], measured["method"]) == ("cpu", "VmHWM")


@linux_only
@pytest.mark.filterwarnings("ignore:MALLOC_MMAP_THRESHOLD_")
def test_measure_peak_returns_the_function_result():
    result, memory = measure_peak(lambda: ("answer", 42), device="cpu")
    assert result == ("answer", 42)
    assert isinstance(memory, PeakMemory)
    assert memory.peak_bytes >= 0


@linux_only
def test_freed_allocation_before_the_call_is_not_counted():
    code = """
import json, torch
from graphopt.measure import measure_peak

before = torch.empty(50_000_000).fill_(1)
del before
_, memory = measure_peak(lambda: None, device="cpu")
print(json.dumps({"peak_bytes": memory.peak_bytes}))
"""
    measured = _run_with_mmap_threshold(code)
    assert measured["peak_bytes"] < 20 * MB


@linux_only
def test_warns_once_without_the_mmap_threshold():
    code = """
import json, warnings
from graphopt.measure import measure_peak

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    measure_peak(lambda: None, device="cpu")
    measure_peak(lambda: None, device="cpu")
print(json.dumps({"messages": [str(warning.message) for warning in caught]}))
"""
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_MMAP_THRESHOLD_"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    messages = json.loads(completed.stdout.strip().splitlines()[-1])["messages"]
    assert len(messages) == 1
    assert "MALLOC_MMAP_THRESHOLD_=65536" in messages[0]


def test_without_proc_clear_refs_it_says_to_use_linux(monkeypatch):
    import graphopt.measure as measure
    from graphopt.errors import GraphoptError

    monkeypatch.setattr(measure, "_CLEAR_REFS_PATH", "/nonexistent/clear_refs")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with pytest.raises(GraphoptError, match="Linux"):
        measure_peak(lambda: None, device="cpu")


def test_allocated_peak_counts_the_tensors_a_call_holds_at_once():
    """cpu_method="allocated": the CPU allocator's peak during the call above what was
    allocated before it, as max_memory_allocated is on CUDA."""
    import graphopt

    kept = torch.ones(1_000_000)  # allocated before: not counted

    def step():
        a = torch.ones(1_000_000)
        b = torch.ones(2_000_000)
        del a
        c = torch.ones(500_000)
        return float(b.sum() + c.sum())

    result, memory = measure_peak(step, device="cpu", cpu_method="allocated")
    assert result == 2_500_000.0
    assert memory.peak_bytes >= 12_000_000  # a and b together
    assert memory.peak_bytes < 12_000_000 + 100_000  # not c on top, not `kept`
    assert memory.method == "allocator (profiler)"
    assert kept.numel() == 1_000_000
    with pytest.raises(graphopt.GraphoptError):
        measure_peak(step, device="cpu", cpu_method="rss")
