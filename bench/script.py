"""What the single-purpose bench scripts share: one configuration per child process,
and the CSV they write (``python -m bench.<script>``; the suite has its own in
``bench/suite.py``)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.child import CHILD_ENVIRONMENT, REPO_ROOT


def run_child_script(
    module: str, child: str, args: Any, *, label: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """``python -m <module> --child <child> --steps S --warmup W`` in a fresh process
    (with the bench's allocator settings): its last JSON line, or the error as data,
    labelled with `label` (the configuration's keys)."""
    command = [sys.executable, "-m", module, "--child", child, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(f"running {child} ...", file=sys.stderr, flush=True)
    try:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env={**os.environ, **CHILD_ENVIRONMENT},
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {**label, "error": f"timed out after {timeout_s} s"}
    json_lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not json_lines:
        tail = " | ".join(completed.stderr.strip().splitlines()[-5:])
        return {**label, "error": f"exit {completed.returncode}: {tail}"}
    return json.loads(json_lines[-1])


def child_main(run: Callable[[], dict[str, Any]], label: dict[str, Any]) -> int:
    """In the child process: run one configuration and print its result as the JSON line
    `run_child_script` reads; an exception is reported as data (labelled with `label`)
    so the other configurations still run."""
    try:
        result = run()
    except Exception as error:
        result = {**label, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result), flush=True)
    return 0


def report(rows: list[dict[str, Any]], path: Path, fields: list[str], format_table: Callable[[list], str]) -> None:
    """Write the CSV and print the table."""
    write_csv(rows, path, fields)
    print(format_table(rows))
    print(f"wrote {path}")


def write_csv(rows: list[dict[str, Any]], path: Path, fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def script_parser(description: str, *, name: str, steps: int, child_timeout_s: float) -> argparse.ArgumentParser:
    """The arguments every single-purpose script takes; each adds ``--configs`` and its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring, the compiling one included")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / f"{name}.csv")
    parser.add_argument("--child-timeout-s", type=float, default=child_timeout_s, help="limit for one configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    return parser


def with_errors(row: dict[str, Any], line: str) -> list[str]:
    """A table line, and the row's error under it when it has one."""
    return [line, f"    error: {row['error']}"] if row["error"] else [line]
