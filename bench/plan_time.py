"""How long ``graphopt plan`` takes: GPT-2 small, the Llama-7B shape and a ViT-L, on the
h100 profile, at budgets and for the budget/time table (no ``--budget``).

    python -m bench.plan_time [--budgets 0.7,0.5] [--timeout-s 300]

Each run is the CLI in its own process, timed from start to exit (tracing on fake
tensors, planning, printing). A budget is given as a fraction of the model's no-budget
peak, which the table run prints. Issue 15's goals: GPT-2 small under 5 s, a 7B-class
model or ViT-L under 30 s at any budget, and the table under 60 s.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "gpt2-small": "examples/gpt2_small.py",
    "llama-7b": "examples/llama7b.py",
    "vit-large": "examples/vit_large.py",
}
_BASELINE = re.compile(r"baseline[^\n]*?peak[^\d]*([\d.]+)\s*(GB|MB)", re.IGNORECASE)


def timed(arguments: list[str], timeout_s: float) -> tuple[float, int | None, str]:
    """Wall seconds, exit code (None when it timed out) and output of one CLI run."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "graphopt", "plan", *arguments],
            cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, None, ""
    return time.perf_counter() - started, done.returncode, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.7,0.5", help="fractions of the no-budget peak (default 0.7,0.5)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    print("| model | run | seconds | outcome |\n|---|---|---:|---|")
    for name in args.models.split(","):
        path = MODELS[name]
        seconds, code, output = timed([path, "--hardware", "h100"], args.timeout_s)
        print(f"| {name} | budget/time table | {seconds:.1f} | {_outcome(code, output)} |", flush=True)
        peak = _baseline_bytes(output)
        for fraction in (float(f) for f in args.budgets.split(",")):
            if peak is None:
                print(f"| {name} | budget {fraction} | - | no baseline peak to scale |")
                continue
            budget = f"{peak * fraction / 1e9:.2f}GB"
            seconds, code, output = timed([path, "--hardware", "h100", "--budget", budget], args.timeout_s)
            print(f"| {name} | budget {budget} ({fraction} x baseline) | {seconds:.1f} | {_outcome(code, output)} |", flush=True)
    return 0


def _outcome(code: int | None, output: str) -> str:
    if code is None:
        return "timed out"
    if code == 0:
        return "planned"
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
    return f"exit {code}: {last[0][:120]}"


def _baseline_bytes(output: str) -> float | None:
    match = _BASELINE.search(output)
    if match is None:
        return None
    return float(match.group(1)) * (1e9 if match.group(2).upper() == "GB" else 1e6)


if __name__ == "__main__":
    sys.exit(main())
