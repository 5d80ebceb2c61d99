"""Exceptions graphopt raises at users. Each message says what to do next."""

from .torch_private import PassesThroughDynamo


class GraphoptError(PassesThroughDynamo):
    """Base class of every error graphopt raises on purpose.

    Raised while torch.compile runs our backend, it still reaches the user as itself.
    """


class BudgetError(GraphoptError, ValueError):
    """A memory budget that graphopt cannot read."""


class HardwareError(GraphoptError, ValueError):
    """An unknown hardware name or a malformed hardware profile."""


class BudgetInfeasibleError(GraphoptError):
    """No plan keeps the step's peak under the budget.

    ``least_peak_bytes`` is the least peak any plan graphopt found reaches (as
    predicted), ``least_budget_bytes`` the smallest budget graphopt can meet on this
    graph (that peak plus the headroom graphopt keeps for its prediction error), and
    ``breakdown`` says what the least reachable peak is made of (bytes by kind).
    """

    def __init__(self, message: str, *, least_peak_bytes: int, least_budget_bytes: int, breakdown: dict[str, int]):
        super().__init__(message)
        self.least_peak_bytes = least_peak_bytes
        self.least_budget_bytes = least_budget_bytes
        self.breakdown = breakdown


class PlanMismatchError(GraphoptError):
    """A saved plan does not match the graph it is applied to."""


class ReplanEarlierGraphs(GraphoptError):
    """A graph after a graph break fits no plan beside what the earlier graphs keep.

    ``room_after`` maps each earlier graph to the bytes it must leave free between its
    forward and its backward; ``graphopt.compile`` plans the step again with it.
    ``graph`` is the graph that did not fit, ``need_bytes`` what it needs beside what
    the earlier graphs keep, ``cause`` its own ``BudgetInfeasibleError``.
    """

    def __init__(
        self, message: str, *, room_after: dict[str, int], graph: str, need_bytes: int, cause: BudgetInfeasibleError
    ):
        super().__init__(message)
        self.room_after = room_after
        self.graph = graph
        self.need_bytes = need_bytes
        self.cause = cause


class RepeatedGraphError(GraphoptError):
    """Under a memory budget, a compiled graph ran its forward again before the backward
    of its previous run: its saved tensors would be held twice, and its plan counted them
    once (``graphopt.compile`` plans each graph as running once per step)."""


class ShapeAbovePlanError(GraphoptError):
    """Under a memory budget, a graph compiled for symbolic sizes (``dynamic=True``,
    ``mark_dynamic``, or Dynamo's automatic dynamic shapes) was called with a size larger
    than the one its plan was made for, where its peak may exceed the budget."""
