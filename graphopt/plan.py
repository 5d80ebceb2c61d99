"""The memory schedule graphopt chose: plain data that prints, explains and round-trips to JSON.

JSON schema (``Plan.to_json``), version 2::

    {"schema": "graphopt.plan/2", "graph": str, "budget_bytes": int|null,
     "predicted_peak_bytes": int, "predicted_added_ms": float, "method": str, "solve_s": float,
     "torch_version": str, "assumptions": [str, ...],
     "memory": {"parameters": int, "inputs": int, "gradients": int, "other graphs": int,
                "optimizer state": int (only with optimizer=),
                "room for later graphs": int (only when a graph break made graphopt replan),
                "later graphs' gradients": int (through the backward, after a graph break),
                "its earlier runs": int (a graph run once per block),
                "accumulated gradients": int (with gradient accumulation),
                "DDP gradient buckets" | "FSDP2 gradient shards" | "FSDP2 all-gather reserve" |
                "FSDP2 reduce-scatter reserve": int (what a data-parallel rank holds beside its graphs)},
     "timeline_bytes": [int, ...], "num_forward_steps": int,
     "decisions": [{"node": str, "tensor": str,
                    "action": "keep"|"recompute"|"offload"|"quantize"|"offload-quantized", "bytes": int,
                    "added_ms": float, "reason": str, "source": str|null, "key": str,
                    "bits": int|"fp8"|null, "error": float}, ...],
     "reordering": [{"graph": "forward"|"backward", "method": str, "peak_before_bytes": int,
                     "peak_after_bytes": int, "inductor_reorder": bool}, ...],
     "chunking": [{"region": str, "chunks": int, "full_bytes": int, "chunk_bytes": int,
                   "added_ms": float, "reason": str}, ...],
     "passes": [{"name": str, "report": str}, ...],
     "pruning": null | {"frozen_parameters": [str, ...], "partial_parameters": [str, ...],
                        "saved_bytes_before": int, "saved_bytes_after": int,
                        "backward_flops_before": float, "backward_flops_after": float,
                        "backward_nodes_before": int, "backward_nodes_after": int}}

``bits`` is the quantized width of a "quantize" / "offload-quantized" decision (8, 4 or
2, or "fp8" for float8_e4m3fn codes; null otherwise) and ``error`` its expected relative
squared error (0 for exact decisions); a decision without them loads as exact.
``reordering`` is empty when reordering is off; a plan without it loads as such.
``chunking`` lists the head + cross-entropy regions found under a budget (``chunks`` 1:
left whole, with the reason); a plan without it loads as none.
``passes`` names the passes (graphopt/passes/ ``PIPELINE``) that ran on the graph, in
order, each with what it reported ("disabled" for those ``disable_passes=`` skipped); a
plan without it loads as none.
``pruning`` is null unless ``trainable=`` froze something; a plan without it loads as null.
``key`` names a candidate across retraces and carries its dtype and shape
(``blocks.0.mlp.fc1: addmm #0 float32[8,64]``), so a plan made for other shapes does not
match. ``torch_version`` is the torch that made the plan; ``assumptions`` says what
graphopt assumed where it could not know (an op priced without a FLOP formula, a peak
predicted by simulation because Inductor's code could not be read). Version 1 plans
have neither shapes nor a torch version and are refused with ``PlanMismatchError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from .budget import format_bytes
from .errors import GraphoptError, PlanMismatchError
from .passes import PassRun

SCHEMA = "graphopt.plan/2"
# Schemas of plans an older graphopt wrote, which cannot be checked against a graph.
OLD_SCHEMAS = ("graphopt.plan/1",)
ACTIONS = ("keep", "recompute", "offload", "quantize", "offload-quantized")


def width_label(bits: int | str) -> str:
    """A quantized width as printed: ``int8`` for a bit count, a format by its name (``fp8``)."""
    return f"int{bits}" if isinstance(bits, int) else bits


@dataclasses.dataclass(frozen=True)
class Decision:
    node: str  # FX node name in the joint graph
    tensor: str  # user-facing name: module path and op
    action: str  # one of ACTIONS
    bytes: int
    added_ms: float
    reason: str
    source: str | None = None  # "model.py:41" when known
    key: str = ""  # stable across retracing: what a saved plan is matched by (planner.decision_keys)
    bits: int | str | None = None  # quantized width or "fp8" ("quantize", "offload-quantized")
    error: float = 0.0  # expected relative squared error the decision puts in the tensor

    @property
    def planned_action(self) -> str:
        """The action as the program names it: ``quantize:8``, ``quantize:fp8``, ``offload``, ``keep``."""
        return self.action if self.bits is None else f"{self.action}:{self.bits}"

    @property
    def label(self) -> str:
        """The action as printed: ``quantize:int8``, ``quantize:fp8``, ``offload``."""
        return self.action if self.bits is None else f"{self.action}:{width_label(self.bits)}"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {ACTIONS}")


@dataclasses.dataclass(frozen=True)
class GraphReordering:
    """What memory-aware reordering did to one split graph (peaks include static memory)."""

    graph: str  # "forward" or "backward"
    method: str  # the scheduler whose order was kept, "original" when none beat the given order
    peak_before_bytes: int  # simulated peak in the partitioner's order
    peak_after_bytes: int  # simulated peak in the kept order
    inductor_reorder: bool  # whether Inductor's own reorder_for_peak_memory still runs on it


@dataclasses.dataclass(frozen=True)
class Pruning:
    """What sparse-backward pruning removed from one joint graph (``trainable=``).

    Saved bytes are the forward tensors the backward reads (what a save-everything cut
    keeps); FLOPs are torch's formulas over the backward's ops.
    """

    frozen_parameters: tuple[str, ...]  # get no gradient
    partial_parameters: tuple[str, ...]  # gradient computed on the trained rows only
    saved_bytes_before: int
    saved_bytes_after: int
    backward_flops_before: float
    backward_flops_after: float
    backward_nodes_before: int
    backward_nodes_after: int


@dataclasses.dataclass(frozen=True)
class Chunking:
    """The chunk decision for one head + cross-entropy region (graphopt/chunking.py)."""

    region: str  # "lm_head+cross_entropy"
    chunks: int  # 1: not chunked
    full_bytes: int  # the logits the loss reads, whole
    chunk_bytes: int  # the logits of one chunk (full_bytes when not chunked)
    added_ms: float  # what the chunks add to the step (roofline)
    reason: str


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
    reordering: tuple[GraphReordering, ...] = ()
    pruning: Pruning | None = None
    torch_version: str = ""  # torch.__version__ of the planning process
    assumptions: tuple[str, ...] = ()  # what graphopt assumed where it could not know
    chunking: tuple[Chunking, ...] = ()  # head + loss regions found under a budget
    # The passes of graphopt/passes/ PIPELINE that ran on the graph, in order, with what
    # each reported; those disable_passes= skipped, reported "disabled".
    passes: tuple[PassRun, ...] = ()

    def saved_nodes(self) -> set[str]:
        return {d.node for d in self.decisions if d.action == "keep"}

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["decisions"] = [dataclasses.asdict(d) for d in self.decisions]
        data["timeline_bytes"] = list(self.timeline_bytes)
        data["reordering"] = [dataclasses.asdict(r) for r in self.reordering]
        data["assumptions"] = list(self.assumptions)
        data["chunking"] = [dataclasses.asdict(c) for c in self.chunking]
        data["passes"] = [dataclasses.asdict(p) for p in self.passes]
        return {"schema": SCHEMA, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        if data.get("schema") in OLD_SCHEMAS:
            raise PlanMismatchError(
                f"this plan was saved by an older graphopt ({data['schema']}): its decisions record no shapes or "
                "dtypes, so it cannot be checked against a graph; plan again (graphopt plan --json, or Plan.dumps())"
            )
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a graphopt plan (schema {data.get('schema')!r}, expected {SCHEMA!r})")
        fields = {k: v for k, v in data.items() if k != "schema"}
        fields["decisions"] = tuple(Decision(**d) for d in fields["decisions"])
        fields["timeline_bytes"] = tuple(fields.get("timeline_bytes", ()))
        fields["reordering"] = tuple(GraphReordering(**r) for r in fields.get("reordering", ()))
        fields["assumptions"] = tuple(fields.get("assumptions", ()))
        fields["chunking"] = tuple(Chunking(**c) for c in fields.get("chunking", ()))
        fields["passes"] = tuple(PassRun(**p) for p in fields.get("passes", ()))
        pruning = fields.get("pruning")
        fields["pruning"] = _pruning_from_json(pruning) if pruning else None
        return cls(**fields)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    def __str__(self) -> str:
        return format_plan(self)


def load_plans(source: Any) -> list[Plan]:
    """Plans from a ``Plan``, a list of them, or a JSON file holding one plan
    (``Plan.dumps``) or several (``graphopt plan --json``: ``{"plans": [...]}``)."""
    if isinstance(source, Plan):
        return [source]
    if isinstance(source, (list, tuple)) and all(isinstance(p, Plan) for p in source):
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        raise GraphoptError(f"plan= takes a Plan, a list of Plans or a path to a JSON plan, got {type(source).__name__}")
    try:
        with open(source, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        raise GraphoptError(f"cannot read the plan {os.fspath(source)!r}: {error}") from error
    entries = data.get("plans", [data]) if isinstance(data, dict) else None
    try:
        return [Plan.from_json(entry) for entry in entries]
    except (TypeError, ValueError, KeyError) as error:
        raise GraphoptError(f"{os.fspath(source)!r} is not a graphopt plan: {error}") from error


def format_plan(plan: Plan, *, max_rows: int = 40) -> str:
    budget = format_bytes(plan.budget_bytes) if plan.budget_bytes is not None else "none"
    lines = [
        f"graphopt plan for {plan.graph}: budget {budget}, predicted peak {format_bytes(plan.predicted_peak_bytes)}, "
        f"added time {plan.predicted_added_ms:.2f} ms ({plan.method}, solved in {plan.solve_s:.2f} s)",
        "  static: " + ", ".join(f"{kind} {format_bytes(size)}" for kind, size in plan.memory.items()),
    ]
    kept = [d for d in plan.decisions if d.action == "keep"]
    recomputed = [d for d in plan.decisions if d.action == "recompute"]
    moved = [d for d in plan.decisions if d.action not in ("keep", "recompute")]
    lines.append(
        f"  {len(kept)} tensors kept ({format_bytes(sum(d.bytes for d in kept))}), "
        f"{len(recomputed)} recomputed ({format_bytes(sum(d.bytes for d in recomputed))})"
        + "".join(f", {count} {label} ({format_bytes(size)})" for label, count, size in _by_action(moved))
    )
    lines.extend(f"  assumed: {assumption}" for assumption in plan.assumptions)
    if plan.passes:
        lines.append(format_passes(plan.passes))
    lines.extend(format_chunking(c) for c in plan.chunking)
    if any(d.error for d in plan.decisions):
        lines.append(f"  lossy: expected relative squared error {sum(d.error for d in plan.decisions):.3g} summed over tensors")
    rows = sorted(plan.decisions, key=lambda d: d.bytes, reverse=True)
    for decision in rows[:max_rows]:
        where = f"  [{decision.source}]" if decision.source else ""
        lines.append(
            f"  {decision.label:<9} {format_bytes(decision.bytes):>10}  {decision.tensor}: {decision.reason}{where}"
        )
    if len(rows) > max_rows:
        lines.append(f"  ... {len(rows) - max_rows} smaller decisions")
    lines.extend(format_reordering(r) for r in plan.reordering)
    if plan.pruning is not None:
        lines.append(format_pruning(plan.pruning))
    if plan.timeline_bytes:
        lines.append(format_timeline(plan))
    return "\n".join(lines)


def _by_action(decisions: list[Decision]) -> list[tuple[str, int, int]]:
    """(label, count, bytes) per offload / quantize label, in a stable order."""
    groups: dict[str, list[Decision]] = {}
    for decision in decisions:
        groups.setdefault(decision.label, []).append(decision)
    return [(label, len(group), sum(d.bytes for d in group)) for label, group in sorted(groups.items())]


def format_passes(passes: tuple[PassRun, ...]) -> str:
    """``passes: prune_frozen (2 frozen, 0 partly trained), lower_saves (3 offloaded or quantized), ...``."""
    return "  passes: " + ", ".join(f"{run.name} ({run.report})" if run.report else run.name for run in passes)


def format_chunking(chunking: Chunking) -> str:
    """``chunk x8 lm_head+cross_entropy: 4.2 GB -> 0.53 GB, +1.5 ms (why)``."""
    if chunking.chunks <= 1:
        return f"  chunk x1 {chunking.region}: {format_bytes(chunking.full_bytes)} of logits; {chunking.reason}"
    return (
        f"  chunk x{chunking.chunks} {chunking.region}: {format_bytes(chunking.full_bytes)} -> "
        f"{format_bytes(chunking.chunk_bytes)}, +{chunking.added_ms:.3g} ms ({chunking.reason})"
    )


def format_reordering(reordering: GraphReordering) -> str:
    """One line: the graph's simulated peak before and after reordering, and who orders it."""
    saved = reordering.peak_before_bytes - reordering.peak_after_bytes
    inductor = "Inductor's reorder_for_peak_memory still on" if reordering.inductor_reorder else "Inductor keeps this order"
    return (
        f"  reorder {reordering.graph}: peak {format_bytes(reordering.peak_before_bytes)} -> "
        f"{format_bytes(reordering.peak_after_bytes)} (saves {format_bytes(saved)}, {reordering.method}; {inductor})"
    )


def _pruning_from_json(data: dict[str, Any]) -> Pruning:
    names = ("frozen_parameters", "partial_parameters")
    return Pruning(**{key: tuple(value) if key in names else value for key, value in data.items()})


def format_pruning(pruning: Pruning) -> str:
    """What sparse backward removed: saved bytes and backward FLOPs, before -> after."""
    flops_saved = 1 - pruning.backward_flops_after / pruning.backward_flops_before if pruning.backward_flops_before else 0.0
    return (
        f"  sparse backward: {len(pruning.frozen_parameters)} parameters frozen, {len(pruning.partial_parameters)} "
        f"partly trained; saved tensors {format_bytes(pruning.saved_bytes_before)} -> "
        f"{format_bytes(pruning.saved_bytes_after)}, backward {pruning.backward_flops_before / 1e9:.3g} -> "
        f"{pruning.backward_flops_after / 1e9:.3g} GFLOP ({flops_saved:.0%} less), "
        f"{pruning.backward_nodes_before} -> {pruning.backward_nodes_after} backward ops"
    )


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
