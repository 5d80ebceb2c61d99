"""graphopt: a memory optimizer for PyTorch training graphs.

    cm = graphopt.compile(model, memory_budget="2GB")
    cm(x).sum().backward()
    for plan in graphopt.plans(cm): print(plan)
"""

__version__ = "0.1.0"

from .api import compile, plans  # noqa: E402
from .budget import parse_budget
from .distributed import RankMemory, rank_memory
from .errors import (
    BudgetError,
    BudgetInfeasibleError,
    GraphoptError,
    HardwareError,
    PlanMismatchError,
    RepeatedGraphError,
    ReplanEarlierGraphs,
    ShapeAbovePlanError,
)
from .measure import PeakMemory, measure_peak
from .plan import Decision, Plan

__all__ = [
    "BudgetError",
    "BudgetInfeasibleError",
    "Decision",
    "GraphoptError",
    "HardwareError",
    "PeakMemory",
    "Plan",
    "PlanMismatchError",
    "RankMemory",
    "RepeatedGraphError",
    "ReplanEarlierGraphs",
    "ShapeAbovePlanError",
    "compile",
    "measure_peak",
    "parse_budget",
    "plans",
    "rank_memory",
]
