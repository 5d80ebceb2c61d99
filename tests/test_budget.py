"""Reading memory budgets: what parse_budget accepts, and how it refuses the rest."""

import pytest

import graphopt
from graphopt import BudgetError, parse_budget


@pytest.mark.parametrize(
    "budget, expected",
    [
        ("20GB", 20 * 10**9),
        ("20 GiB", 20 * 2**30),
        ("512MB", 512 * 10**6),
        ("512 MiB", 512 * 2**20),
        ("1.5e9", 1_500_000_000),
        ("1.5GB", 1_500_000_000),
        ("  2gb ", 2 * 10**9),
        ("100kB", 100_000),
        ("4096", 4096),
        ("4096B", 4096),
        (123456, 123456),
        (2**40, 2**40),
        (1.5e9, 1_500_000_000),
    ],
)
def test_parses_bytes_and_units(budget, expected):
    parsed = parse_budget(budget)
    assert parsed == expected
    assert isinstance(parsed, int)


def test_none_means_no_budget():
    assert parse_budget(None) is None


@pytest.mark.parametrize("share, expected", [("80%", 64 * 10**9), ("100%", 80 * 10**9), ("0.5%", 400 * 10**6)])
def test_percent_is_a_share_of_device_memory(share, expected):
    assert parse_budget(share, device_memory_bytes=80 * 10**9) == expected


@pytest.mark.parametrize(
    "budget",
    ["", "   ", "abc", "-5GB", "0", "0GB", 0, -1, True, False, "150%", "0%", "5 parsecs", "GB", "1e999", float("nan"),
     float("inf"), [20]],
)
def test_rejects_what_it_cannot_read(budget):
    with pytest.raises(BudgetError) as caught:
        parse_budget(budget, device_memory_bytes=80 * 10**9)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, graphopt.GraphoptError)
    assert repr(budget) in str(caught.value) or str(budget) in str(caught.value)


def test_percent_without_device_memory_is_an_error():
    with pytest.raises(BudgetError, match="device") as caught:
        parse_budget("80%")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("budget", ["", "abc", "-5GB", "0", True, "5 parsecs"])
def test_error_message_lists_what_is_accepted(budget):
    with pytest.raises(BudgetError) as caught:
        parse_budget(budget)
    message = str(caught.value)
    for accepted in ('"20GB"', '"20 GiB"', '"512MB"', '"1.5e9"', "int", '"80%"'):
        assert accepted in message, (accepted, message)


def test_graphopt_compile_rejects_a_bad_budget_before_compiling():
    import torch

    with pytest.raises(BudgetError):
        graphopt.compile(torch.nn.Linear(2, 2), memory_budget="5 parsecs", compiler="eager")


@pytest.mark.parametrize(
    "needed, shown",
    [(30_183_400_000, "30.19 GB"), (30_180_000_000, "30.18 GB"), (999_999, "1.00 MB"), (999, "999 B"), (1_234_001, "1.24 MB")],
)
def test_a_least_budget_is_rounded_up_to_what_is_printed(needed, shown):
    """A least budget graphopt reports is printed as users type budgets; rounding it to
    the nearest would print one below what is needed ("30.18 GB" for 30.1834 GB)."""
    from graphopt.budget import format_bytes, least_budget_shown

    least = least_budget_shown(needed)
    assert format_bytes(least) == shown
    assert least >= needed and parse_budget(shown) >= needed
