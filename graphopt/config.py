"""graphopt's configuration: one frozen dataclass, passed explicitly."""

from __future__ import annotations

import dataclasses
from typing import Any

from .budget import parse_budget
from .cost_models import HardwareProfile, get_hardware
from .errors import GraphoptError

COMPILERS = ("inductor", "eager")
COST_MODELS = ("roofline", "measured")


@dataclasses.dataclass(frozen=True)
class Options:
    memory_budget_bytes: int | None = None
    hardware: HardwareProfile | None = None
    solver_time_limit_s: float = 30.0
    compiler: str = "inductor"  # "eager": no code generation (fast; for tests and planning)
    cost_model: str = "roofline"  # "measured": time each op on the local device (cached)
    verbose: bool = False
    model_static_bytes: int = 0  # parameters and buffers of the whole model, when known
    # Share of the budget a plan's simulated peak must leave free. Inductor's fused
    # kernels allocate several outputs at once, which the FX-order simulation misses:
    # measured 4.6-6.4% above it on the bench GPT. Without code generation the
    # simulation is the whole model, so no headroom.
    prediction_headroom: float = 0.05

    def cache_key(self) -> str:
        """Every input of a plan, for Inductor's caches (a changed budget must replan)."""
        hardware = self.hardware.to_json() if self.hardware is not None else None
        return repr(
            (
                self.memory_budget_bytes,
                hardware,
                self.solver_time_limit_s,
                self.model_static_bytes,
                self.prediction_headroom,
                self.cost_model,
            )
        )


_ACCEPTED = (
    "memory_budget",
    "hardware",
    "solver_time_limit_s",
    "compiler",
    "verbose",
    "model_static_bytes",
    "prediction_headroom",
    "cost_model",
)
_DEFAULT_HEADROOM = {"inductor": 0.05, "eager": 0.0}


def make_options(settings: dict[str, Any] | None = None, **overrides: Any) -> Options:
    """Options from user-facing names (``memory_budget="20GB"``, ``hardware="h100"``)."""
    merged = {**(settings or {}), **overrides}
    unknown = sorted(set(merged) - set(_ACCEPTED))
    if unknown:
        raise GraphoptError(f"unknown graphopt option(s) {unknown}; accepted: {list(_ACCEPTED)}")
    hardware = get_hardware(merged.get("hardware", "auto"))
    budget = parse_budget(merged.get("memory_budget"), device_memory_bytes=hardware.memory_bytes)
    compiler = merged.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise GraphoptError(f"compiler={compiler!r}; choose one of {COMPILERS}")
    time_limit = float(merged.get("solver_time_limit_s", 30.0))
    if not time_limit > 0:
        raise GraphoptError(f"solver_time_limit_s={time_limit} must be positive")
    cost_model = merged.get("cost_model", "roofline")
    if cost_model not in COST_MODELS:
        raise GraphoptError(f"cost_model={cost_model!r}; choose one of {COST_MODELS}")
    headroom = float(merged.get("prediction_headroom", _DEFAULT_HEADROOM[compiler]))
    if not 0 <= headroom < 1:
        raise GraphoptError(f"prediction_headroom={headroom} must lie in [0, 1)")
    return Options(
        memory_budget_bytes=budget,
        hardware=hardware,
        solver_time_limit_s=time_limit,
        compiler=compiler,
        verbose=bool(merged.get("verbose", False)),
        model_static_bytes=int(merged.get("model_static_bytes", 0)),
        prediction_headroom=headroom,
        cost_model=cost_model,
    )
