"""A retry budget: retries may be at most a fraction of calls, per dependency.

Why: per-call retry limits do not compose. Three attempts per call triple the
load on a dependency exactly when it is down, and every caller retrying in step
is a retry storm. A budget shared by all callers of one dependency (Finagle's
and Linkerd's idea) caps retries at ``ratio`` of the calls made in the last
``ttl`` seconds, plus a floor of ``min_per_second`` retries per second so that
a quiet dependency can still be retried. A retry the budget refuses fails fast.

Each call deposits one token (:meth:`RetryBudget.deposit`); each retry
withdraws one (:meth:`RetryBudget.try_withdraw`). Tokens expire after ``ttl``
seconds, so a burst of calls an hour ago buys no retries now. The window is
bucketed (see :class:`~.instruments.SlidingWindow`): exact to ``ttl / 10``.

Pure: time comes in as ``now``; not thread-safe (drive it from one thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sentinel_ipc.resilience.instruments import SlidingWindow

__all__ = ["BudgetStatistics", "RetryBudget"]

_DEPOSITS, _WITHDRAWALS = 0, 1


@dataclass(frozen=True, slots=True)
class BudgetStatistics:
    name: str
    at: float
    calls_in_window: int
    retries_in_window: int
    available: int  # retries that would be granted now
    granted_total: int
    refused_total: int


class RetryBudget:
    """Caps retries at ``ratio`` x calls + ``min_per_second`` x ``ttl``, over ``ttl`` s."""

    __slots__ = (
        "_granted",
        "_refused",
        "_reserve",
        "_window",
        "min_per_second",
        "name",
        "ratio",
        "ttl",
    )

    def __init__(
        self,
        name: str = "",
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
    ) -> None:
        if not (ratio >= 0.0 and math.isfinite(ratio)):
            raise ValueError(f"RetryBudget ratio must be a finite number >= 0, got {ratio!r}")
        if not (min_per_second >= 0.0 and math.isfinite(min_per_second)):
            raise ValueError(f"RetryBudget min_per_second must be >= 0, got {min_per_second!r}")
        self.name = name
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._reserve = min_per_second * ttl
        self._window = SlidingWindow(ttl, buckets=10, fields=2)
        self._granted = 0
        self._refused = 0

    def deposit(self, now: float) -> None:
        """Count one call (its first attempt): it earns ``ratio`` of a retry."""
        self._window.add(now, _DEPOSITS)

    def _available(self, now: float) -> float:
        deposits, withdrawals = self._window.totals(now)
        return self._reserve + self.ratio * deposits - withdrawals

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False (and counted) when none is left."""
        if self._available(now) >= 1.0:
            self._window.add(now, _WITHDRAWALS)
            self._granted += 1
            return True
        self._refused += 1
        return False

    def statistics(self, now: float) -> BudgetStatistics:
        deposits, withdrawals = self._window.totals(now)
        return BudgetStatistics(
            name=self.name,
            at=now,
            calls_in_window=deposits,
            retries_in_window=withdrawals,
            available=max(0, math.floor(self._available(now))),
            granted_total=self._granted,
            refused_total=self._refused,
        )
