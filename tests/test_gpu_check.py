"""The prepared GPU check (``make gpu-check``, ``bench/gpu_check.py``) where CI runs: without
CUDA it skips cleanly, the torch settings it patches still exist, and its rows run on a
tiny CPU model without code generation. What it measures needs a GPU; nothing is timed here."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without a GPU")
def test_without_cuda_it_says_it_skipped_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu_check.csv"
    command = [sys.executable, "-m", "bench.gpu_check", "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "GPU check is skipped" in completed.stdout
    assert not out.exists()


def test_its_rows_and_the_torch_settings_they_patch_exist():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters  # noqa: F401 - torch's fp8 pass counts itself there
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir  # noqa: F401 - cold compiles

    names = [row.name for row in gpu_check.ROWS]
    assert len(names) == len(set(names))
    for index, row in enumerate(gpu_check.ROWS):
        assert callable(row.prepare)
        if row.budget is not None:
            assert row.budget[0] in names[:index], f"{row.name}'s budget comes from a row run after it"
    for setting in ("activation_memory_budget", "enable_activation_offloading", "activation_offload_separate_stream",
                    "activation_offload_sink_wait", "activation_reload_prefetch"):  # fmt: skip
        assert hasattr(functorch_config, setting), setting
    assert hasattr(inductor_config, "joint_custom_post_pass")
    assert isinstance(inductor_config.post_grad_fusion_options, dict)


@pytest.mark.slow
def test_a_dry_run_on_the_cpu_measures_every_row_it_is_given(tmp_path):
    out = tmp_path / "gpu_check.csv"
    rows = "eager,compile,graphopt-offload,graphopt-fp8"
    assert gpu_check.main(["--dry-run-cpu", "--steps", "1", "--rows", rows, "--out", str(out)]) == 0
    with out.open() as file:
        reader = csv.DictReader(file)
        results = {row["row"]: row for row in reader}
    assert tuple(reader.fieldnames) == gpu_check.CSV_FIELDS
    assert list(results) == rows.split(",")
    assert all(row["error"] == "" for row in results.values()), {r["row"]: r["error"] for r in results.values()}
    assert all(results[name]["grad_ok"] == "True" for name in ("compile", "graphopt-offload", "graphopt-fp8"))
    assert int(results["graphopt-offload"]["offload_decisions"]) > 0
    assert results["graphopt-fp8"]["lossy"] == "True" and results["compile"]["lossy"] == "False"
