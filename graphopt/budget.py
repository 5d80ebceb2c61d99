"""Reading memory budgets: ``"20GB"``, ``"20 GiB"``, ``"512MB"``, ``"1.5e9"``, ``2**30``, ``"80%"``."""

from __future__ import annotations

import math

import re

from .errors import BudgetError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z%]*)\s*$", re.IGNORECASE)
ACCEPTED = 'an int of bytes, "1.5e9", "512MB", "20GB", "20 GiB", or a share of device memory such as "80%"'


def parse_budget(budget: int | float | str | None, *, device_memory_bytes: int | None = None) -> int | None:
    """Return the budget in bytes, or None when there is no budget.

    ``device_memory_bytes`` is needed only for percentages.
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise BudgetError(f"memory_budget={budget!r} is a bool; give {ACCEPTED}")
    if isinstance(budget, (int, float)):
        return _positive_bytes(float(budget), budget)
    if not isinstance(budget, str):
        raise BudgetError(f"memory_budget={budget!r} has type {type(budget).__name__}; give {ACCEPTED}")
    match = _PATTERN.match(budget)
    if match is None:
        raise BudgetError(f"cannot read memory_budget={budget!r}; give {ACCEPTED}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise BudgetError(f"memory_budget={budget!r}: a share of device memory must lie in (0%, 100%]")
        if device_memory_bytes is None:
            raise BudgetError(
                f"memory_budget={budget!r} is a share of device memory, but the device's memory is unknown; "
                "give the budget in bytes or name a hardware profile"
            )
        return int(device_memory_bytes * number / 100)
    if unit not in _UNITS:
        raise BudgetError(f"unknown unit {match.group(2)!r} in memory_budget={budget!r}; give {ACCEPTED}")
    return _positive_bytes(number * _UNITS[unit], budget)


def _positive_bytes(value: float, given: object) -> int:
    if value != value or value in (float("inf"), float("-inf")) or value < 1:
        raise BudgetError(f"memory_budget={given!r} must be a positive, finite number of bytes; give {ACCEPTED}")
    return int(value)


def least_budget_shown(num_bytes: float) -> int:
    """The least budget at or above `num_bytes` that `format_bytes` prints exactly: a
    least budget graphopt reports is one a user can type back as printed ("30.19 GB"
    for 30,183,400,000 bytes, where "30.18 GB" would fall short of it)."""
    needed = math.ceil(num_bytes)
    scale, unit = _unit(needed)
    step = 1 if unit == "B" else scale // 100  # format_bytes prints two decimals past bytes
    shown = -(-needed // step) * step
    while parse_budget(format_bytes(shown)) < needed:  # a decimal the float parse rounds down
        shown += step
    return shown


def format_bytes(num_bytes: float) -> str:
    """Human-readable decimal units, as users write budgets ("1.23 GB")."""
    sign = "-" if num_bytes < 0 else ""
    scale, unit = _unit(abs(float(num_bytes)))
    value = abs(float(num_bytes)) / scale
    return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"


def _unit(num_bytes: float) -> tuple[int, str]:
    """The decimal unit `format_bytes` shows `num_bytes` in, and its size in bytes."""
    scale = 1
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 * scale:
            return scale, unit
        scale *= 1000
    return scale, "TB"
