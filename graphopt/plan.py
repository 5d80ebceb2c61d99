"""The memory schedule graphopt chose: plain data that prints, explains and round-trips to JSON.

JSON schema (``Plan.to_json``), version 1::

    {"schema": "graphopt.plan/1", "graph": str, "budget_bytes": int|null,
     "predicted_peak_bytes": int, "predicted_added_ms": float, "method": str, "solve_s": float,
     "memory": {"parameters": int, "inputs": int, "gradients": int, "other_graphs": int},
     "timeline_bytes": [int, ...], "num_forward_steps": int,
     "decisions": [{"node": str, "tensor": str, "action": "keep"|"recompute", "bytes": int,
                    "added_ms": float, "reason": str, "source": str|null}, ...]}
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .budget import format_bytes

SCHEMA = "graphopt.plan/1"
ACTIONS = ("keep", "recompute")


@dataclasses.dataclass(frozen=True)
class Decision:
    node: str  # FX node name in the joint graph (what a saved plan is matched by)
    tensor: str  # user-facing name: module path and op
    action: str  # "keep" or "recompute"
    bytes: int
    added_ms: float
    reason: str
    source: str | None = None  # "model.py:41" when known

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")


@dataclasses.dataclass(frozen=True)
class Plan:
    graph: str
    budget_bytes: int | None
    predicted_peak_bytes: int
    predicted_added_ms: float
    method: str
    solve_s: float
    memory: dict[str, int]
    decisions: tuple[Decision, ...]
    timeline_bytes: tuple[int, ...] = ()
    num_forward_steps: int = 0

    def saved_nodes(self) -> set[str]:
        return {d.node for d in self.decisions if d.action == "keep"}

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["decisions"] = [dataclasses.asdict(d) for d in self.decisions]
        data["timeline_bytes"] = list(self.timeline_bytes)
        return {"schema": SCHEMA, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a graphopt plan (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        fields = {k: v for k, v in data.items() if k != "schema"}
        fields["decisions"] = tuple(Decision(**d) for d in fields["decisions"])
        fields["timeline_bytes"] = tuple(fields.get("timeline_bytes", ()))
        return cls(**fields)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def __str__(self) -> str:
        return format_plan(self)


def format_plan(plan: Plan, *, max_rows: int = 40) -> str:
    budget = format_bytes(plan.budget_bytes) if plan.budget_bytes is not None else "none"
    lines = [
        f"graphopt plan for {plan.graph}: budget {budget}, predicted peak {format_bytes(plan.predicted_peak_bytes)}, "
        f"added time {plan.predicted_added_ms:.2f} ms ({plan.method}, solved in {plan.solve_s:.2f} s)",
        "  static: " + ", ".join(f"{kind} {format_bytes(size)}" for kind, size in plan.memory.items()),
    ]
    kept = [d for d in plan.decisions if d.action == "keep"]
    recomputed = [d for d in plan.decisions if d.action == "recompute"]
    lines.append(
        f"  {len(kept)} tensors kept ({format_bytes(sum(d.bytes for d in kept))}), "
        f"{len(recomputed)} recomputed ({format_bytes(sum(d.bytes for d in recomputed))})"
    )
    rows = sorted(plan.decisions, key=lambda d: d.bytes, reverse=True)
    for decision in rows[:max_rows]:
        where = f"  [{decision.source}]" if decision.source else ""
        lines.append(
            f"  {decision.action:<9} {format_bytes(decision.bytes):>10}  {decision.tensor}: {decision.reason}{where}"
        )
    if len(rows) > max_rows:
        lines.append(f"  ... {len(rows) - max_rows} smaller decisions")
    if plan.timeline_bytes:
        lines.append(format_timeline(plan))
    return "\n".join(lines)


def format_timeline(plan: Plan, *, width: int = 60, height: int = 8) -> str:
    """An ASCII memory timeline, forward then backward, with the peak marked."""
    values = plan.timeline_bytes
    buckets = [max(values[i * len(values) // width : max((i + 1) * len(values) // width, i * len(values) // width + 1)]) for i in range(width)]
    top = max(buckets)
    peak_column = buckets.index(top)
    boundary = plan.num_forward_steps * width // max(len(values), 1)
    rows = []
    for level in range(height, 0, -1):
        threshold = top * (level - 0.5) / height
        row = "".join("#" if v >= threshold else " " for v in buckets)
        label = format_bytes(top * level / height)
        rows.append(f"  {label:>10} |{row}|")
    axis = [" "] * width
    axis[min(boundary, width - 1)] = "|"
    axis[peak_column] = "^"
    rows.append(f"  {'':>10}  {''.join(axis)}  forward | backward, ^ peak {format_bytes(top)}")
    return "\n".join(rows)
