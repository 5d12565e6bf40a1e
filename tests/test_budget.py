"""RetryBudget and the SlidingWindow under it (pure, manual clock)."""

from __future__ import annotations

import pytest

from sentinel_ipc.resilience import RetryBudget
from sentinel_ipc.resilience.instruments import SlidingWindow


def test_floor_allows_min_per_second_times_ttl_without_calls() -> None:
    budget = RetryBudget("db", ratio=0.2, min_per_second=10.0, ttl=10.0)
    granted = sum(budget.try_withdraw(0.0) for _ in range(150))
    assert granted == 100
    stats = budget.statistics(0.0)
    assert (stats.granted_total, stats.refused_total, stats.available) == (100, 50, 0)


def test_calls_earn_a_fraction_of_a_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, ttl=10.0)
    for _ in range(1000):
        budget.deposit(1.0)
    assert budget.statistics(1.0).available == 200
    assert sum(budget.try_withdraw(1.0) for _ in range(300)) == 200


def test_tokens_expire_after_ttl() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, ttl=10.0)
    for _ in range(50):
        budget.deposit(0.0)
    assert budget.statistics(9.9).available == 50
    assert budget.statistics(10.0).available == 0  # the bucket of t=0 left the window
    assert not budget.try_withdraw(10.0)


def test_spent_retries_expire_too() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, ttl=10.0)
    assert sum(budget.try_withdraw(0.0) for _ in range(20)) == 10
    assert not budget.try_withdraw(5.0)
    assert budget.try_withdraw(10.0)  # the first ten withdrawals have expired


def test_a_down_dependency_gets_no_retry_storm() -> None:
    """100 calls/s for 60 s, every call failing and wanting 2 retries: retries
    stay within 20 % of calls plus the 10/s floor, instead of 200 %."""
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, ttl=10.0)
    calls = retries = 0
    for tick in range(6000):
        now = tick / 100
        budget.deposit(now)
        calls += 1
        for _ in range(2):
            if budget.try_withdraw(now):
                retries += 1
    assert retries <= 0.2 * calls + 10 * 60 + 100
    assert retries >= 0.2 * calls  # and the budget is actually usable
    assert budget.statistics(60.0).refused_total == 2 * calls - retries


@pytest.mark.parametrize(
    "kwargs", [{"ratio": -0.1}, {"min_per_second": float("nan")}, {"ttl": 0.0}]
)
def test_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget("x", **kwargs)


# --- the window ------------------------------------------------------------------


def test_window_counts_per_field_and_expires_bucket_by_bucket() -> None:
    window = SlidingWindow(10.0, buckets=10, fields=2)
    for t in range(10):
        window.add(float(t), 0)
        window.add(float(t), 1, amount=2)
    assert window.totals(9.5) == (10, 20)
    assert window.totals(10.0) == (9, 18)  # bucket [0, 1) fell out
    assert window.totals(15.2) == (4, 8)
    assert window.total(19.99, 0) == 0
    window.add(19.99)
    assert window.totals(100.0) == (0, 0)  # a jump past the window clears it


def test_window_time_going_backwards_lands_in_the_newest_bucket() -> None:
    window = SlidingWindow(10.0)
    window.add(50.0)
    window.add(3.0)  # stale now: counted, not lost, nothing corrupted
    assert window.total(50.0) == 2
    assert window.total(59.9) == 2
    assert window.total(60.0) == 0


def test_window_clear_and_validation() -> None:
    window = SlidingWindow(1.0)
    window.add(0.0)
    window.clear()
    assert window.total(0.0) == 0
    with pytest.raises(ValueError):
        SlidingWindow(float("inf"))
    with pytest.raises(ValueError):
        SlidingWindow(1.0, buckets=0)
