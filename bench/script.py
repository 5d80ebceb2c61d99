"""What the single-purpose bench scripts share: each configuration measured in fresh
child processes (memory and time apart, ``bench.child``), and the CSV they write (``python -m bench.<script>``; the suite has its own in
``bench/suite.py``)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.child import REPO_ROOT, run_measuring


def run_child_script(
    module: str, child: str, args: Any, *, label: dict[str, Any], timeout_s: float, runs: tuple[str, ...] = ("memory", "time")
) -> dict[str, Any]:
    """``python -m <module> --child <child> --steps S --warmup W`` in fresh processes, by
    default one measuring memory and one timing steps (``bench.child.run_measuring``):
    the merged JSON line, or the error as data, labelled with `label` (the configuration's keys)."""
    command = [sys.executable, "-m", module, "--child", child, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(f"running {child} ({', '.join(runs)}) ...", file=sys.stderr, flush=True)
    return run_measuring(command, label=label, timeout_s=timeout_s, runs=runs)


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
